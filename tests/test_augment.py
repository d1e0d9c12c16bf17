"""On-device augmentation: crop offsets, zero padding, flips, test untouched."""

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import augment


def _images(n=4, size=32):
    return (np.arange(n * size * size * 3) % 251 + 1).astype(np.uint8).reshape(n, size, size, 3)


def test_crop_at_every_offset_matches_numpy():
    images = _images(1)
    padded = np.pad(images[0], ((4, 4), (4, 4), (0, 0)))
    for dy in range(9):
        for dx in range(9):
            out = augment.crop(jnp.asarray(images), jnp.array([[dy, dx]]), 4)
            np.testing.assert_array_equal(out[0], padded[dy : dy + 32, dx : dx + 32])


def test_padding_is_zero():
    images = _images(1)
    out = np.asarray(augment.crop(jnp.asarray(images), jnp.array([[0, 0]]), 4))
    assert (out[0, :4] == 0).all() and (out[0, :, :4] == 0).all()
    np.testing.assert_array_equal(out[0, 4:, 4:], images[0, :28, :28])


def test_offsets_cover_0_to_8_and_are_per_image():
    offsets = np.asarray(augment.crop_offsets(jax.random.PRNGKey(0), 5000, 4))
    assert offsets.min() == 0 and offsets.max() == 8
    assert set(np.unique(offsets)) == set(range(9))
    assert len({tuple(o) for o in offsets[:50]}) > 20  # Not one offset per batch.


def test_flip_mirrors_only_chosen_images():
    images = jnp.asarray(_images(2))
    out = np.asarray(augment.flip(images, jnp.array([True, False])))
    np.testing.assert_array_equal(out[0], np.asarray(images)[0, :, ::-1])
    np.testing.assert_array_equal(out[1], np.asarray(images)[1])


def test_random_crop_flip_is_deterministic_and_varied():
    images = jnp.asarray(_images(64))
    a = augment.random_crop_flip(jax.random.PRNGKey(1), images, 4)
    b = augment.random_crop_flip(jax.random.PRNGKey(1), images, 4)
    c = augment.random_crop_flip(jax.random.PRNGKey(2), images, 4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.dtype == jnp.uint8 and a.shape == images.shape


def test_no_augmentation_when_disabled():
    images = jnp.asarray(_images(8))
    out = augment.random_crop_flip(jax.random.PRNGKey(0), images, 0, flip_images=False)
    np.testing.assert_array_equal(out, images)


def test_to_float_scales_without_normalisation_by_default():
    x = augment.to_float(jnp.array([[[[0, 255, 51]]]], jnp.uint8))
    np.testing.assert_allclose(np.asarray(x), [[[[0.0, 1.0, 0.2]]]], rtol=1e-6)
    y = augment.to_float(jnp.array([[[[0, 255, 51]]]], jnp.uint8), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    np.testing.assert_allclose(np.asarray(y), [[[[-1.0, 1.0, -0.6]]]], rtol=1e-6)
