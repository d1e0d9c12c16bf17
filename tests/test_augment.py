"""On-device augmentation: crop offsets, zero padding, flips; epoch orders, batches, batch
sizes and the padded test set."""

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.datasets import augment


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


def test_shuffle_off_uses_the_stored_order_every_epoch():
    rng = jax.random.PRNGKey(0)
    np.testing.assert_array_equal(augment.epoch_order(rng, 1, 10, False), np.arange(10))
    a, b = (np.asarray(augment.epoch_order(rng, e, 1000, True)) for e in (1, 2))
    assert sorted(a) == list(range(1000)) and not np.array_equal(a, b)
    np.testing.assert_array_equal(a, augment.epoch_order(rng, 1, 1000, True))


def test_train_batch_gathers_in_order_and_augments_on_device():
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3), np.uint8))
    labels = jnp.arange(10, dtype=jnp.int32)
    order = jnp.array([9, 8, 7, 6, 5, 4, 3, 2, 1, 0], jnp.int32)
    prep = augment.Preprocess(pad=0, flip=False, mean=None, std=None)
    batch = augment.train_batch(
        images, labels, order, jnp.int32(2), jax.random.PRNGKey(0), jnp.int32(0), size=4, prep=prep
    )
    np.testing.assert_array_equal(batch['label'], [7, 6, 5, 4])
    np.testing.assert_allclose(batch['image'], np.asarray(images)[[7, 6, 5, 4]] / 255.0, rtol=1e-6)
    prep = augment.Preprocess(pad=4, flip=True, mean=None, std=None)
    aug = augment.train_batch(
        images, labels, order, jnp.int32(2), jax.random.PRNGKey(0), jnp.int32(0), size=4, prep=prep
    )
    assert not np.allclose(aug['image'], batch['image'])


def test_train_batch_sizes_keep_or_drop_the_remainder():
    assert augment.train_batch_sizes(50_000, 500, False) == [500] * 100
    assert augment.train_batch_sizes(105, 25, False) == [25] * 4 + [5]
    assert augment.train_batch_sizes(105, 25, True) == [25] * 4
    assert augment.train_batch_sizes(105, 24, False, num_devices=8) == [24] * 4 + [8]


def test_pad_test_set_masks_the_padding():
    images = np.ones((25, 32, 32, 3), np.uint8)
    labels = np.arange(25, dtype=np.int32)
    pi, pl, mask = augment.pad_test_set(images, labels, 10)
    assert pi.shape[0] == pl.shape[0] == mask.shape[0] == 30
    assert mask.sum() == 25 and not mask[25:].any() and (pi[25:] == 0).all()
