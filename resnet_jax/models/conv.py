"""A 2-D convolution whose gradients are written as canonical forward convolutions.

    y = conv.conv2d(x, w, stride=2, padding=1)   # x: NHWC, w: HWIO (PyTorch-style padding)

Same values and gradients as ``lax.conv_general_dilated`` (checked in
tests/test_conv.py); what differs is how the gradients reach XLA. JAX's own
transpose rules emit the weight gradient as a convolution with permuted
dimension labels (``f01b_i01o->01bf``: the batch is the contracted feature, the
output gradient the 32x32 "kernel"). XLA's CPU backend rewrites such a
convolution into the canonical NHWC/HWIO form (transposes around it) and runs
it with a library kernel — except inside a ``while`` loop (``lax.scan``), where
it is left as is and emitted as a naive element-by-element loop, many times
slower (BENCHMARKS.md). Here both gradients are stated in the canonical form from the
start, with the transposes explicit, so the same fast kernels run with or
without a loop around the step:

* input gradient: the output gradient dilated by the stride, padded, and
  convolved with the spatially flipped kernel whose in/out features are swapped;
* weight gradient: a convolution whose batch is the input's channels, whose
  features are the batch, and whose kernel is the output gradient (dilated by
  the stride).

Two shapes get faster forms still (measured in BENCHMARKS.md): the weight
gradient of 3x3 kernels as im2col patches times the output gradient, one matrix
product per cache-sized batch chunk (XLA's convolution kernel for it scales
badly with the batch, most at large batches), and the input
gradient of 3x3 stride-2 convolutions as four small stride-1 convolutions, one
per output phase, instead of one over a gradient dilated with zeros.
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


# Patch elements (images x output pixels x 9 x channels) per chunk of the
# im2col weight gradient: ~4 MB of float32, so a chunk's patches stay in cache.
DW_CHUNK_ELEMENTS = 1 << 20


def _taps(xp: jax.Array, stride: int, out: tuple[int, int]) -> list[jax.Array]:
    """The 9 strided views of a padded input that a 3x3 kernel's taps read."""
    ho, wo = out
    return [
        xp[:, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride]
        for i in range(3)
        for j in range(3)
    ]


def _weight_grad_im2col(x: jax.Array, g: jax.Array, stride: int) -> jax.Array:
    """dw of a 3x3, padding-1 conv: patches (rows: pixels, columns: 9 taps x Cin)
    times the output gradient, one matrix product per batch chunk (in a scan)."""
    n, _, _, c = x.shape
    _, ho, wo, co = g.shape
    per_image = ho * wo * 9 * c
    size = max(1, DW_CHUNK_ELEMENTS // per_image)
    chunk = max(d for d in range(1, n + 1) if n % d == 0 and d <= size)

    def product(x, g):
        xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        patches = jnp.concatenate(_taps(xp, stride, (ho, wo)), axis=-1).reshape(-1, 9 * c)
        return lax.dot_general(patches, g.reshape(-1, co), (((0,), (0,)), ((), ())))

    if chunk == n:
        dw = product(x, g)
    else:
        xs = x.reshape(n // chunk, chunk, *x.shape[1:])
        gs = g.reshape(n // chunk, chunk, *g.shape[1:])
        dw = lax.scan(
            lambda acc, xg: (acc + product(*xg), None),
            jnp.zeros((9 * c, co), jnp.promote_types(x.dtype, jnp.float32)),
            (xs, gs),
        )[0]
    return dw.reshape(3, 3, c, co)


def _input_grad_phases(g: jax.Array, w: jax.Array, size: tuple[int, int]) -> jax.Array:
    """dx of a 3x3, stride-2, padding-1 conv of an even-sized input, as four stride-1
    convolutions of the output gradient, one per output phase, interleaved.

    (The dilated form multiplies three zeros for every value.)
    """
    n, ho, wo, _ = g.shape
    wt = jnp.swapaxes(w, 2, 3)  # (3, 3, Cout, Cin)
    gp = jnp.pad(g, ((0, 0), (0, 1), (0, 1), (0, 0)))

    def valid(inp, k):
        return lax.conv_general_dilated(inp, k, (1, 1), 'VALID', dimension_numbers=_DIMENSIONS)

    even_even = valid(g, wt[1:2, 1:2])
    even_odd = valid(gp[:, :ho], jnp.stack([wt[1, 2], wt[1, 0]])[None])
    odd_even = valid(gp[:, :, :wo], jnp.stack([wt[2, 1], wt[0, 1]])[:, None])
    odd_odd = valid(
        gp, jnp.stack([jnp.stack([wt[2, 2], wt[2, 0]]), jnp.stack([wt[0, 2], wt[0, 0]])])
    )
    rows = [jnp.stack([even_even, even_odd], 3), jnp.stack([odd_even, odd_odd], 3)]
    return jnp.stack(rows, 2).reshape(n, *size, w.shape[2])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def canonical_conv2d(x: jax.Array, w: jax.Array, stride: int = 1, padding: int = 0) -> jax.Array:
    """:func:`conv2d` with both gradients stated as canonical NHWC/HWIO convolutions."""
    return _forward(x, w, stride, padding)


def _conv2d_fwd(x, w, stride, padding):
    return _forward(x, w, stride, padding), (x, w)


def _conv2d_bwd(stride, padding, residuals, g):
    x, w = residuals
    size = x.shape[1:3]
    three = w.shape[:2] == (3, 3) and padding == 1
    if three and stride == 2 and size[0] % 2 == 0 and size[1] % 2 == 0:
        dx = _input_grad_phases(g, w, size)
    else:
        dx = _input_grad(g, w, size, stride, padding)
    if three:
        dw = _weight_grad_im2col(x, g, stride)
    else:
        dw = _weight_grad(x, g, w.shape[0], stride, padding)
    return dx.astype(x.dtype), dw.astype(w.dtype)


canonical_conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)
