"""A 2-D convolution whose gradients are written as canonical forward convolutions.

    y = conv.conv2d(x, w, stride=2, padding=1)   # x: NHWC, w: HWIO (PyTorch-style padding)

Same values and gradients as ``lax.conv_general_dilated`` (checked in
tests/test_conv.py); what differs is how the gradients reach XLA. JAX's own
transpose rules emit the weight gradient as a convolution with permuted
dimension labels (``f01b_i01o->01bf``: the batch is the contracted feature, the
output gradient the 32x32 "kernel"). XLA's CPU backend rewrites such a
convolution into the canonical NHWC/HWIO form (transposes around it) and runs
it with a library kernel — except inside a ``while`` loop (``lax.scan``), where
it is left as is and emitted as a naive element-by-element loop: 30-45x slower
(BENCHMARKS.md). Here both gradients are stated in the canonical form from the
start, with the transposes explicit, so the same fast kernels run with or
without a loop around the step:

* input gradient: the output gradient dilated by the stride, padded, and
  convolved with the spatially flipped kernel whose in/out features are swapped;
* weight gradient: a convolution whose batch is the input's channels, whose
  features are the batch, and whose kernel is the output gradient (dilated by
  the stride).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

_DIMENSIONS = ('NHWC', 'HWIO', 'NHWC')


def _forward(x: jax.Array, w: jax.Array, stride: int, padding: int) -> jax.Array:
    return lax.conv_general_dilated(
        x,
        w,
        (stride, stride),
        ((padding, padding), (padding, padding)),
        dimension_numbers=_DIMENSIONS,
    )


def _input_grad(g: jax.Array, w: jax.Array, size: tuple[int, int], stride: int, padding: int):
    """d(conv)/dx: a stride-1 convolution of the stride-dilated output gradient."""
    k = w.shape[0]
    pads = []
    for n, out in zip(size, g.shape[1:3], strict=True):
        low = k - 1 - padding
        pads.append((low, n - (out - 1) * stride - 1 + padding))
    flipped = jnp.swapaxes(w[::-1, ::-1], 2, 3)  # HW(O)(I): O becomes the input feature.
    return lax.conv_general_dilated(
        g, flipped, (1, 1), pads, lhs_dilation=(stride, stride), dimension_numbers=_DIMENSIONS
    )


def _weight_grad(x: jax.Array, g: jax.Array, k: int, stride: int, padding: int):
    """d(conv)/dw: channels as the batch, the batch as the features, g as the kernel."""
    h, w_ = x.shape[1:3]
    pads = [
        (padding, k + (out - 1) * stride - n - padding)
        for n, out in zip((h, w_), g.shape[1:3], strict=True)
    ]
    lhs = jnp.transpose(x, (3, 1, 2, 0))  # (Cin, H, W, N)
    rhs = jnp.transpose(g, (1, 2, 0, 3))  # (Ho, Wo, N, Cout)
    dw = lax.conv_general_dilated(
        lhs, rhs, (1, 1), pads, rhs_dilation=(stride, stride), dimension_numbers=_DIMENSIONS
    )  # (Cin, k, k, Cout)
    return jnp.transpose(dw, (1, 2, 0, 3))


def conv2d(x: jax.Array, w: jax.Array, stride: int = 1, padding: int = 0) -> jax.Array:
    """``lax.conv_general_dilated(x, w, (stride,)*2, ((padding,)*2,)*2)``, NHWC/HWIO.

    Square kernels, equal strides and symmetric padding (PyTorch's ``padding=``).
    On CPUs the gradients come from :func:`canonical_conv2d`; elsewhere from
    JAX's own rules (GPU compilers pattern-match those into their backward
    convolution kernels).
    """
    if jax.default_backend() == 'cpu':
        return canonical_conv2d(x, w, stride, padding)
    return _forward(x, w, stride, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def canonical_conv2d(x: jax.Array, w: jax.Array, stride: int = 1, padding: int = 0) -> jax.Array:
    """:func:`conv2d` with both gradients stated as canonical NHWC/HWIO convolutions."""
    return _forward(x, w, stride, padding)


def _conv2d_fwd(x, w, stride, padding):
    return _forward(x, w, stride, padding), (x, w)


def _conv2d_bwd(stride, padding, residuals, g):
    x, w = residuals
    dx = _input_grad(g, w, x.shape[1:3], stride, padding).astype(x.dtype)
    dw = _weight_grad(x, g, w.shape[0], stride, padding).astype(w.dtype)
    return dx, dw


canonical_conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)
