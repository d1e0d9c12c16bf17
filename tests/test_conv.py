"""conv.conv2d: lax's values and gradients, in a form XLA's CPU backend runs fast in loops."""

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from resnet_jax import models
from resnet_jax.configs import default
from resnet_jax.datasets import augment
from resnet_jax.models import conv
from resnet_jax.training import steps, train


@pytest.mark.parametrize(
    'size,cin,cout,k,stride,padding',
    [
        (32, 16, 16, 3, 1, 1),
        (32, 16, 32, 3, 2, 1),  # The paper net's stride-2 convs and shortcuts.
        (9, 4, 6, 3, 2, 1),  # Odd size: the last row is not reached by the stride.
        (16, 64, 8, 3, 2, 1),  # 64 channels: dx by phases, dw in 6 chunks.
        (8, 3, 5, 1, 2, 0),  # ResNet-18's 1x1 shortcuts.
        (7, 2, 3, 3, 1, 0),
    ],
)
# Every shape path in float32 among the unit tests; their bfloat16 repeats in the full suite.
@pytest.mark.parametrize('dtype', [jnp.float32, pytest.param(jnp.bfloat16, marks=pytest.mark.slow)])
def test_values_and_gradients_equal_lax(size, cin, cout, k, stride, padding, dtype, monkeypatch):
    monkeypatch.setattr(conv, 'DW_CHUNK_ELEMENTS', 1 << 16)  # Several chunks at batch 6.
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (6, size, size, cin), dtype)
    w = (jax.random.normal(kw, (k, k, cin, cout)) * 0.2).astype(dtype)

    def reference(x, w):
        pads = ((padding, padding), (padding, padding))
        return lax.conv_general_dilated(
            x, w, (stride, stride), pads, dimension_numbers=('NHWC', 'HWIO', 'NHWC')
        )

    y, ref_vjp = jax.vjp(reference, x, w)
    y2, vjp = jax.vjp(lambda x, w: conv.canonical_conv2d(x, w, stride, padding), x, w)
    g = jax.random.normal(kg, y.shape, dtype)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.float32(y2), np.float32(y), rtol=tol, atol=tol)
    for got, want in zip(vjp(g), ref_vjp(g), strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        scale = float(jnp.abs(want.astype(jnp.float32)).max())
        np.testing.assert_allclose(np.float32(got), np.float32(want), atol=tol * scale)


@pytest.mark.slow  # Compiles a scanned training program (tens of seconds).
def test_scanned_train_steps_have_only_canonical_convolutions():
    """XLA's CPU backend runs non-canonical convolutions inside loops element by
    element (30-45x slower): the scanned step must have none."""
    config = default.get_config()
    config.batch_size = 8
    state = train.create_train_state(config, jax.random.PRNGKey(0), 4)
    images = jnp.zeros((16, 32, 32, 3), jnp.uint8)
    labels = jnp.zeros((16,), jnp.int32)
    compiled = steps.scan_updates.single.lower(
        state,
        jnp.arange(16, dtype=jnp.int32),
        images,
        labels,
        jnp.int32(0),
        size=8,
        count=2,
        prep=augment.Preprocess.from_config(config),
        sharding=None,
    ).compile()
    found = re.findall(r'convolution\(.*?dim_labels=([^,}\s]+)', compiled.as_text())
    assert found and set(found) == {'b01f_01io->b01f'}, collections.Counter(found)


def test_parameter_names_are_flax_convs():
    """Checkpoints and the PyTorch weight transfer rely on flax's Conv_N names."""
    model = models.create_model('paper')
    variables = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
    )
    params = variables['params']
    assert set(params['BasicBlock_0']) == {'Conv_0', 'Conv_1', 'BatchNorm_0', 'BatchNorm_1'}
    assert params['BasicBlock_2']['shortcut_conv']['kernel'].shape == (3, 3, 16, 32)
