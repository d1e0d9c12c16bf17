"""Data parallelism: 8 fake CPU devices give the same results as 1 device."""

import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow  # Every test here trains or starts the CLI.

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from resnet_jax.training import loop
    from resnet_jax.training import train
    from tests.conftest import make_tiny_config
    from tests import fake_data
    import sys, tempfile

    assert jax.device_count() == 8, jax.devices()
    config = make_tiny_config('')
    # SGD: Adam's first steps (about lr * sign(g)) would amplify float noise in g ~ 0.
    config.optimizer, config.learning_rate = 'sgd', 0.1

    # One step on a global batch of 16: sharded 2 per device vs on one device.
    x = jax.random.uniform(jax.random.PRNGKey(1), (16, 32, 32, 3))
    y = jnp.arange(16, dtype=jnp.int32) % 10
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
      mesh = train.make_mesh(devices)
      state = train.create_train_state(config, jax.random.PRNGKey(0), 4)
      state = jax.device_put(state, NamedSharding(mesh, P()))
      batch = jax.device_put({'image': x, 'label': y}, NamedSharding(mesh, P('data')))
      for _ in range(3):
        state, metrics = train.train_step(state, batch)
      assert len(batch['image'].sharding.device_set) == len(devices)
      results.append((state, metrics.compute()))
    (s1, m1), (s8, m8) = results
    tol = dict(rtol=1e-4, atol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, **tol),
                           s1.params, s8.params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, **tol),
                           s1.batch_stats, s8.batch_stats)
    np.testing.assert_allclose(m1['loss'], m8['loss'], **tol)

    # A whole run over all 8 devices matches the same run on 1 device.
    fake = fake_data.write_cifar_py(tempfile.mkdtemp(), n_train_per_batch=16, n_test=50)
    config = make_tiny_config(fake.path)
    config.num_epochs = 2
    config.optimizer, config.learning_rate = 'sgd', 0.1
    summaries = []
    for n in (1, 8):
      mesh = train.make_mesh(jax.devices()[:n])
      _, summary = loop.train_and_evaluate(config, tempfile.mkdtemp(), mesh=mesh)
      summaries.append(summary)
    assert summaries[0]['status'] == summaries[1]['status'] == 'completed'
    for key in ('train_loss', 'test_loss', 'train_accuracy', 'test_accuracy'):
      np.testing.assert_allclose(summaries[0][key], summaries[1][key], rtol=1e-4, atol=1e-5)
    print('OK')
""")


def test_eight_devices_match_one():
    env = dict(
        os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=8'
    )
    proc = subprocess.run(
        [sys.executable, '-c', SCRIPT],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith('OK')
