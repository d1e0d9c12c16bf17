"""Model variants: parameter counts, padding, BatchNorm settings, FLOPs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import models
from resnet_jax.models import resnet


@pytest.mark.parametrize(
    'name,expected',
    [
        ('paper', 195_738),  # The study's own number.
        ('resnet18', 11_173_962),
        ('resnet34', 21_282_122),
    ],
)
def test_parameter_counts(name, expected):
    model = models.create_model(name)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
    )
    assert models.count_params(shapes['params']) == expected


def test_paper_architecture_shapes():
    model = models.create_model('paper')
    v = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
    )
    p = v['params']
    assert p['stem_conv']['kernel'].shape == (3, 3, 3, 16)
    # Stage 2 and 3 open with a 3x3 conv + BN shortcut; stage 1 has none.
    assert 'shortcut_conv' not in p['BasicBlock_0']
    assert p['BasicBlock_2']['shortcut_conv']['kernel'].shape == (3, 3, 16, 32)
    assert p['BasicBlock_4']['shortcut_conv']['kernel'].shape == (3, 3, 32, 64)
    assert 'shortcut_conv' not in p['BasicBlock_3']
    assert p['head']['kernel'].shape == (64, 10)
    assert 'bias' in p['head'] and 'bias' not in p['stem_conv']
    assert set(v) == {'params', 'batch_stats'}


def test_stride2_padding_matches_pytorch_by_hand():
    """resnet.Conv, 3x3 stride 2 on a 4x4 input: padding 1 on every side (PyTorch).

    Flax's 'SAME' would pad (0, 1) here and read different pixels.
    """
    x = jnp.arange(16, dtype=jnp.float32).reshape(1, 4, 4, 1)
    conv = resnet.Conv(1, (3, 3), (2, 2), padding=resnet._pad(3))
    kernel = jnp.ones((3, 3, 1, 1))
    y = conv.apply({'params': {'kernel': kernel}}, x)[0, :, :, 0]
    # Padded input has a zero border; output (i, j) sums rows 2i-1..2i+1, cols 2j-1..2j+1.
    img = np.arange(16, dtype=np.float32).reshape(4, 4)
    padded = np.pad(img, 1)
    expected = np.array(
        [[padded[2 * i : 2 * i + 3, 2 * j : 2 * j + 3].sum() for j in range(2)] for i in range(2)]
    )
    np.testing.assert_array_equal(np.asarray(y), expected)
    assert expected[0, 0] == 0 + 1 + 4 + 5  # Top-left window sees padding.


def test_conv_refuses_what_it_does_not_compute():
    x = jnp.zeros((1, 4, 4, 1))
    for kwargs in (
        dict(kernel_size=(3, 1)),
        dict(kernel_size=(3, 3), strides=(1, 2)),
        dict(kernel_size=(3, 3), use_bias=True),
    ):
        with pytest.raises(ValueError, match='square kernels, equal strides and no bias'):
            resnet.Conv(1, **kwargs).init(jax.random.PRNGKey(0), x)


def test_batchnorm_settings_match_pytorch():
    model = models.create_model('paper')
    x = jax.random.uniform(jax.random.PRNGKey(1), (8, 32, 32, 3))
    v = models.init_variables(model, jax.random.PRNGKey(0))
    apply = jax.jit(
        lambda v, x: model.apply(
            v, x, train=True, mutable=['batch_stats', 'intermediates'], capture_intermediates=True
        )
    )
    _, updates = apply(v, x)
    # Stem BN running mean after one step: 0.9 * 0 + 0.1 * batch mean (PyTorch momentum 0.1).
    stem = resnet.Conv(16, (3, 3), padding=resnet._pad(3))
    h = np.asarray(stem.apply({'params': v['params']['stem_conv']}, x), np.float64)
    np.testing.assert_allclose(
        updates['batch_stats']['stem_bn']['mean'],
        0.1 * h.mean(axis=(0, 1, 2)),
        rtol=1e-5,
        atol=1e-7,
    )
    # Training normalises with the batch statistics and PyTorch's epsilon 1e-5
    # (scale 1, bias 0 at the start).
    mean, var = h.mean(axis=(0, 1, 2)), h.var(axis=(0, 1, 2))
    (normalised,) = updates['intermediates']['stem_bn']['__call__']
    np.testing.assert_allclose(normalised, (h - mean) / np.sqrt(var + 1e-5), rtol=1e-3, atol=1e-4)
    # Tiny activations, where epsilon dominates the variance: 1e-5, not flax's default 1e-6.
    _, small = apply(v, 1e-3 * x)
    h_small = 1e-3 * h
    (normalised,) = small['intermediates']['stem_bn']['__call__']
    expected = (h_small - h_small.mean(axis=(0, 1, 2))) / np.sqrt(
        h_small.var(axis=(0, 1, 2)) + 1e-5
    )
    np.testing.assert_allclose(normalised, expected, rtol=1e-3, atol=1e-6)
    assert np.abs(expected).max() < 0.5  # Far from unit variance: epsilon matters here.


def test_forward_shapes_and_dtype():
    """Shapes and dtypes only (jax.eval_shape: nothing is compiled); that the
    convolutions run in bfloat16 is checked on a trained run in test_loop.py."""
    model = models.create_model('paper', num_classes=7, dtype='bfloat16')
    x = jnp.zeros((2, 32, 32, 3))
    v = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x[:1], train=False))
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(v['params']))
    logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), v, x)
    assert logits.shape == (2, 7) and logits.dtype == jnp.float32


def test_flops_per_image():
    model = models.create_model('paper')
    v = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
    )
    # 28.75M multiply-accumulates in convolutions + 640 in the head, less those
    # of the zero padding (XLA skips them), plus BatchNorm, ReLU and pooling.
    flops = models.flops_per_image(model, v)
    assert 0.9 * 2 * 28_754_560 < flops < 2 * 28_754_560
    assert models.flops_per_image(model, v, image_size=64) == pytest.approx(4 * flops, rel=0.05)


def test_unknown_names():
    with pytest.raises(ValueError, match='unknown model'):
        models.create_model('resnet9')
    with pytest.raises(ValueError, match='unknown dtype'):
        models.create_model('paper', dtype='float16')
