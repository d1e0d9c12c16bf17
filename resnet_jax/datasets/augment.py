"""On-device batching, augmentation and preprocessing of uint8 NHWC images.

The datasets stay on the accelerator as uint8; each batch is gathered, augmented
and scaled there with ``jax.random`` inside jit, so no per-batch host work is
needed::

    images = random_crop_flip(rng, images_uint8, pad=4, flip=True)
    x = to_float(images, mean=None, std=None)   # [0, 1], no normalisation
    batch = train_batch(images, labels, order, start, rng, step, size=100, prep=prep)

Every image gets its own crop offsets (0..2*pad in each axis, over a zero-padded
copy, like ``torchvision.transforms.RandomCrop(32, padding=4)``) and its own coin
for the horizontal flip. Test images only go through :func:`to_float`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import struct
from jax.sharding import NamedSharding


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


@struct.dataclass
class Preprocess:
    """Static settings of the on-device batch functions."""

    pad: int = struct.field(pytree_node=False)
    flip: bool = struct.field(pytree_node=False)
    mean: tuple[float, ...] | None = struct.field(pytree_node=False)
    std: tuple[float, ...] | None = struct.field(pytree_node=False)

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> Preprocess:
        norm = config.data.normalize
        return cls(
            pad=config.data.pad,
            flip=config.data.flip,
            mean=tuple(config.data.mean) if norm else None,
            std=tuple(config.data.std) if norm else None,
        )


def epoch_order(order_rng: jax.Array, epoch: int, num_examples: int, shuffle: bool) -> jax.Array:
    """Training order of an epoch: a fresh permutation, or the stored order."""
    if not shuffle:
        return jnp.arange(num_examples, dtype=jnp.int32)
    return jax.random.permutation(jax.random.fold_in(order_rng, epoch), num_examples).astype(
        jnp.int32
    )


def train_batch(
    images: jax.Array,
    labels: jax.Array,
    order: jax.Array,
    start: jax.Array,
    rng: jax.Array,
    step: jax.Array,
    *,
    size: int,
    prep: Preprocess,
    sharding: NamedSharding | None = None,
) -> dict[str, jax.Array]:
    """Gathers ``order[start:start+size]``, augments it (key ``rng`` folded with
    ``step``) and scales it to float; pure, to be called inside jit."""
    idx = jax.lax.dynamic_slice(order, (start,), (size,))
    x = random_crop_flip(jax.random.fold_in(rng, step), images[idx], prep.pad, prep.flip)
    batch = {'image': to_float(x, prep.mean, prep.std), 'label': labels[idx]}
    if sharding is not None:
        batch = jax.lax.with_sharding_constraint(batch, sharding)
    return batch


@functools.partial(jax.jit, static_argnames=('size', 'prep', 'sharding'))
def eval_batch(
    images: jax.Array,
    labels: jax.Array,
    mask: jax.Array,
    start: jax.Array,
    *,
    size: int,
    prep: Preprocess,
    sharding: NamedSharding | None = None,
) -> dict[str, jax.Array]:
    """Slice ``[start, start+size)`` of the padded test set, scaled to float."""
    sl = lambda a: jax.lax.dynamic_slice_in_dim(a, start, size)
    batch = {
        'image': to_float(sl(images), prep.mean, prep.std),
        'label': sl(labels),
        'mask': sl(mask),
    }
    if sharding is not None:
        batch = jax.lax.with_sharding_constraint(batch, sharding)
    return batch


def train_batch_sizes(
    num_examples: int, batch_size: int, drop_remainder: bool, num_devices: int = 1
) -> list[int]:
    """Sizes of an epoch's batches; a last partial one is kept unless dropped.

    With several devices the partial batch is cut to a multiple of the device
    count (each device needs an equal share).
    """
    full, rest = divmod(num_examples, batch_size)
    sizes = [batch_size] * full
    rest -= rest % num_devices
    if rest and not drop_remainder:
        sizes.append(rest)
    return sizes


def pad_test_set(
    images: np.ndarray, labels: np.ndarray, batch_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pads the test set to whole batches and returns (images, labels, mask)."""
    n = len(labels)
    padded = math.ceil(n / batch_size) * batch_size
    extra = padded - n
    images = np.concatenate([images, np.zeros((extra,) + images.shape[1:], images.dtype)])
    labels = np.concatenate([labels, np.zeros((extra,), labels.dtype)])
    mask = np.arange(padded) < n
    return images, labels, mask
