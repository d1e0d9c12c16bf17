"""On-device augmentation and preprocessing of uint8 NHWC batches.

The study's training transform, done with ``jax.random`` inside jit so no
per-batch host work is needed::

    images = random_crop_flip(rng, images_uint8, pad=4, flip=True)
    x = to_float(images, mean=None, std=None)   # [0, 1], no normalisation

Every image gets its own crop offsets (0..2*pad in each axis, over a zero-padded
copy, like ``torchvision.transforms.RandomCrop(32, padding=4)``) and its own coin
for the horizontal flip. Test images only go through :func:`to_float`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def crop_offsets(rng: jax.Array, batch: int, pad: int) -> jax.Array:
    """Per-image (row, column) crop offsets, uniform in ``[0, 2 * pad]``."""
    return jax.random.randint(rng, (batch, 2), 0, 2 * pad + 1)


def crop(images: jax.Array, offsets: jax.Array, pad: int) -> jax.Array:
    """Crops each zero-padded image at its offset back to the input size."""
    _, h, w, c = images.shape
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

    def one(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))

    return jax.vmap(one)(padded, offsets)


def flip(images: jax.Array, coins: jax.Array) -> jax.Array:
    """Mirrors left-right the images whose coin is True."""
    return jnp.where(coins[:, None, None, None], images[:, :, ::-1, :], images)


def random_crop_flip(
    rng: jax.Array, images: jax.Array, pad: int, flip_images: bool = True
) -> jax.Array:
    """The study's training augmentation: pad-``pad`` random crop, random flip."""
    crop_rng, flip_rng = jax.random.split(rng)
    if pad > 0:
        images = crop(images, crop_offsets(crop_rng, images.shape[0], pad), pad)
    if flip_images:
        images = flip(images, jax.random.bernoulli(flip_rng, 0.5, (images.shape[0],)))
    return images


def to_float(
    images: jax.Array, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> jax.Array:
    """Scales uint8 pixels to [0, 1] and, if given, normalises per channel."""
    x = images.astype(jnp.float32) / 255.0
    if mean is not None and std is not None:
        x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    return x
