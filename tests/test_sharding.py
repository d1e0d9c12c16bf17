"""Data parallelism: 8 fake CPU devices give the same results as 1 device.

What does the same arithmetic on each example (the forward pass of the eval step)
matches bit for bit. What sums over the batch (the mean gradient, batch-norm
statistics) is summed in another order on 8 devices: one step matches within the
error of a reordered float32 sum, a whole run within the float noise of its steps
(``assert_within_float_noise`` in tests/conftest.py).
"""

import textwrap

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from resnet_jax.training import loop
    from resnet_jax.training import train
    from resnet_jax.rundir import workdir as workdir_lib
    from tests.conftest import assert_within_float_noise, make_tiny_config, train_nudged
    from tests import fake_data
    import functools, tempfile, types

    EPS = float(np.finfo(np.float32).eps)
    assert jax.device_count() == 8, jax.devices()
    config = make_tiny_config('')
    # SGD: Adam's first steps (about lr * sign(g)) would amplify float noise in g ~ 0.
    config.optimizer, config.learning_rate = 'sgd', 0.1

    # One step on a global batch of 16: sharded 2 per device vs on one device.
    x = jax.random.uniform(jax.random.PRNGKey(1), (16, 32, 32, 3))
    y = jnp.arange(16, dtype=jnp.int32) % 10
    forward = jax.jit(lambda s, b: s.apply_fn(s.variables(), b['image'], train=False))
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
      mesh = train.make_mesh(devices)
      state = train.create_train_state(config, jax.random.PRNGKey(0), 4)
      state = jax.device_put(state, NamedSharding(mesh, P()))
      batch = jax.device_put({'image': x, 'label': y}, NamedSharding(mesh, P('data')))
      logits = np.asarray(forward(state, batch))
      state, metrics = train.train_step(state, batch)
      assert len(batch['image'].sharding.device_set) == len(devices)
      results.append((logits, state, metrics.compute()))
    (l1, s1, m1), (l8, s8, m8) = results
    # Each example's logits are the same sums in the same order: exactly equal.
    np.testing.assert_array_equal(l1, l8)
    # One step sums over the batch in another order: the mean gradient over 16
    # examples, and batch-norm statistics over their 16 * 32 * 32 pixels. A reordered
    # float32 sum is off by a few eps of the magnitudes summed, and a weight moves by
    # lr times such a sum: a few ulps of the largest weights (the batch-norm scales,
    # about 1). So each value matches to 16 * eps relative, and to 8 ulps of 1.
    def close(a, b):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=16 * EPS, atol=8 * EPS)
    jax.tree_util.tree_map(close, s1.params, s8.params)
    jax.tree_util.tree_map(close, s1.batch_stats, s8.batch_stats)
    close(m1['loss'], m8['loss'])

    # A whole run over all 8 devices matches the same run on 1 device within the
    # float noise of its steps (tests/conftest.py, NUDGE), measured on 1 device.
    fake = fake_data.write_cifar_py(tempfile.mkdtemp(), n_train_per_batch=16, n_test=50)
    config = make_tiny_config(fake.path)
    config.num_epochs = 2
    config.optimizer, config.learning_rate = 'sgd', 0.1
    records = []
    for n in (1, 8):
      workdir = tempfile.mkdtemp()
      _, summary = loop.train_and_evaluate(config, workdir, mesh=train.make_mesh(jax.devices()[:n]))
      assert summary['status'] == 'completed'
      records.append(workdir_lib.read_metrics(workdir))
    one_device = types.SimpleNamespace(
        train_and_evaluate=functools.partial(
            loop.train_and_evaluate, mesh=train.make_mesh(jax.devices()[:1])
        )
    )
    nudged = train_nudged(one_device, config, tempfile.mkdtemp())
    keys = ('train_loss', 'test_loss', 'train_accuracy', 'test_accuracy')
    # 2 epochs of 80 images in batches of 32: 6 steps. One test image may flip.
    assert_within_float_noise(records[1], records[0], nudged, 6, keys, flip=1 / 50)
    print('OK')
""")


def test_eight_devices_match_one(cli):
    env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
    proc = cli.script(SCRIPT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith('OK')
