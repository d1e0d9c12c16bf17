"""CIFAR-10 from disk (or TensorFlow Datasets) into host numpy arrays.

    from resnet_jax import datasets
    data = datasets.load_dataset(config.data, seed=config.seed)
    data.train_images   # (50000, 32, 32, 3) uint8, NHWC
    data.train_labels   # (50000,) int32
    data.class_names    # ('airplane', 'automobile', ...)

``config.data.source`` picks where the images come from:

* ``'cifar'`` (:mod:`resnet_jax.datasets.cifar`): the official CIFAR-10 python
  (``cifar-10-batches-py/``) or binary (``cifar-10-batches-bin/``) version. ``data.path`` is the batches folder, its
  parent (as torchvision and keras leave it) or the official ``.tar.gz`` archive,
  read without unpacking. Pickles are read with an unpickler that refuses
  anything but numpy arrays, so a tampered file cannot run code.
* ``'folder'`` (:mod:`resnet_jax.datasets.image_folder`):
  ``path/{train,test}/<class>/*.{png,jpg,jpeg}``; classes are the
  sorted subfolder names. Images must be ``data.image_size`` pixels square and
  become 8-bit RGB. Large folders are decoded in spawned
  processes (a calling script needs the ``if __name__ == '__main__':`` guard),
  then cached as ``.npz`` under ``$RESNET_JAX_CACHE`` (default
  ``~/.cache/resnet_jax``), keyed on the folder's path and its files' names,
  sizes and modification times. Folders store images class by class, so the
  training set is put once into a fixed order drawn from ``seed``.
* ``'tfds'`` (:mod:`resnet_jax.datasets.tfds_source`): TensorFlow Datasets' ``cifar10`` through its ArrayRecord data
  source, without TensorFlow; ``data.path`` is the TFDS data dir ('' for the
  default). An unprepared dataset is downloaded only if ``data.download`` is on,
  the network answers and TensorFlow is installed (tfds needs it to prepare
  cifar10); otherwise a :class:`~resnet_jax.datasets.base.DataError` says how to point at a local copy.
* ``'auto'``: :func:`detect_source` picks one from ``data.path``.

The training set keeps its stored order (batches 1..5 for CIFAR files, the
seeded order for folders); ``data.train_subset > 0`` keeps a seeded subset in
that order. Every problem with the input raises :class:`~resnet_jax.datasets.base.DataError` with a
one-sentence message.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from typing import Any

import ml_collections
import numpy as np

from resnet_jax.datasets import base, cifar, tfds_source

logger = logging.getLogger('resnet_jax')


def detect_source(path: str) -> str:
    """Returns the source ('cifar' | 'folder' | 'tfds') of what lies at ``path``.

    '' is the default TFDS data dir. Raises DataError when ``path`` does not
    exist, cannot be read, or holds none of the known layouts.
    """
    if not path:
        return 'tfds'
    path = os.path.expanduser(path)
    with base.os_errors_as_data_errors():
        if not os.path.exists(path):
            raise base.DataError(f'data path does not exist: {path}')
        if os.path.isdir(path) and not os.listdir(path):
            raise base.DataError(
                f'data path {path} is an empty folder; expected {base.EXPECTED_LAYOUTS}'
            )
        if cifar.find_cifar(path):
            return 'cifar'
        if all(os.path.isdir(os.path.join(path, s)) for s in ('train', 'test')):
            return 'folder'
        if os.path.isdir(os.path.join(path, tfds_source.TFDS_NAME)):
            return 'tfds'
    raise base.DataError(
        f'data path {path} holds no dataset this project reads; expected {base.EXPECTED_LAYOUTS}'
    )


def load_dataset(data_config: Any, seed: int) -> base.Dataset:
    """Loads the dataset ``data_config`` (``config.data``) describes.

    ``data_config`` has ``source`` ('auto' | 'tfds' | 'cifar' | 'folder'),
    ``path`` ('' = default), ``train_subset`` (0 = all), ``image_size`` (image
    folders; default 32) and ``download`` (tfds; default True). ``seed`` seeds
    the image-folder training order and the training subset. Raises DataError
    when the input is missing, unreadable or malformed.
    """
    start = time.perf_counter()
    path = os.path.expanduser(data_config.path)
    image_size = getattr(data_config, 'image_size', base.CIFAR_IMAGE_SIZE)
    with base.os_errors_as_data_errors():
        source = _resolve_source(data_config.source, path, image_size)
        dataset = base.SOURCES.get(source)(path, data_config, image_size, seed)
    dataset = hold_out_validation(
        dataset,
        getattr(data_config, 'validation_size', 0),
        getattr(data_config, 'validation_seed', 0),
    )
    if dataset.source == 'folder':  # Folders hold images class by class: a seeded order.
        dataset = _shuffle_train(dataset, seed)
    dataset = _train_subset(dataset, data_config.train_subset, seed)
    if len(dataset.validation_labels):
        logger.info('Held out %d training images for validation.', len(dataset.validation_labels))
    logger.info(
        'Loaded %d train + %d test images of %d classes (%s: %s) in %.1f s.',
        len(dataset.train_labels),
        len(dataset.test_labels),
        dataset.num_classes,
        dataset.source,
        dataset.path or 'default TFDS data dir',
        time.perf_counter() - start,
    )
    return dataset


def _resolve_source(source: str, path: str, image_size: int) -> str:
    """The source to read: ``source``, or the one :func:`detect_source` finds for 'auto'.

    Raises DataError for an unknown source, an image size only image folders
    can have, or a source that needs ``data.path`` without one.
    """
    if source == 'auto':
        source = detect_source(path)
    if source not in base.SOURCES:
        raise base.DataError(
            f"data.source must be 'auto' or one of {base.SOURCES.names()}, not {source!r}"
        )
    if source != 'folder' and image_size != base.CIFAR_IMAGE_SIZE:
        raise base.DataError(
            f'data.image_size={image_size} needs an image folder: '
            f'{source} images are {base.CIFAR_IMAGE_SIZE}x{base.CIFAR_IMAGE_SIZE}'
        )
    if 'data.path' in base.SOURCES.fields(source) and not path:
        raise base.DataError(f'data.source={source} needs data.path')
    return source


def _shuffle_train(dataset: base.Dataset, seed: int) -> base.Dataset:
    """``dataset`` with its training set in an order drawn from ``seed``."""
    order = np.random.default_rng(seed).permutation(len(dataset.train_labels))
    return dataclasses.replace(
        dataset,
        train_images=dataset.train_images[order],
        train_labels=dataset.train_labels[order],
    )


def _train_subset(dataset: base.Dataset, size: int, seed: int) -> base.Dataset:
    """``dataset`` with ``size`` training images drawn with ``seed``, in stored order (0: all)."""
    n = len(dataset.train_labels)
    if not size:
        return dataset
    if not 0 < size <= n:
        raise base.DataError(
            f'data.train_subset={size} must lie in [0, {n}], the size of the training set'
        )
    keep = np.sort(np.random.default_rng(seed).choice(n, size, replace=False))
    images, labels = dataset.train_images[keep], dataset.train_labels[keep]
    return dataclasses.replace(dataset, train_images=images, train_labels=labels)


def validation_indices(labels: np.ndarray, size: int, seed: int, num_classes: int) -> np.ndarray:
    """Sorted indices of ``size`` images balanced over the classes, drawn with ``seed``.

    Every class gives ``size // num_classes`` images, the first ``size %
    num_classes`` classes one more. The draw depends only on the labels, the
    size and the seed: every run of a study (whatever its own seed) holds out
    the same images.
    """
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(num_classes):
        want = size // num_classes + (1 if c < size % num_classes else 0)
        members = np.flatnonzero(labels == c)
        if want > len(members):
            raise base.DataError(
                f'data.validation_size={size} needs {want} images of class {c}, but the '
                f'training set has {len(members)}'
            )
        chosen.append(rng.choice(members, want, replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros((0,), np.int64)


def hold_out_validation(dataset: base.Dataset, size: int, seed: int) -> base.Dataset:
    """``dataset`` with ``size`` training images moved to its validation split.

    Balanced over the classes and seeded by ``seed`` (``config.data.validation_seed``)
    alone (:func:`validation_indices`); the training images keep their order.
    """
    n = len(dataset.train_labels)
    if not size:
        return dataset
    if not 0 < size < n:
        raise base.DataError(
            f'data.validation_size={size} must lie in [0, {n}), below the size of the training set'
        )
    held = validation_indices(dataset.train_labels, size, seed, dataset.num_classes)
    keep = np.ones(n, bool)
    keep[held] = False
    return dataclasses.replace(
        dataset,
        train_images=dataset.train_images[keep],
        train_labels=dataset.train_labels[keep],
        validation_images=dataset.train_images[held],
        validation_labels=dataset.train_labels[held],
    )


def load_for_config(config: Any) -> base.Dataset:
    """A run config's dataset (``config.data``, ``image_size``, ``seed``).

    The last dataset loaded is kept and reused: the runs of a sweep load it once.
    """
    data = dict(json.loads(config.data.to_json()), image_size=config.image_size)
    return _load_cached(json.dumps(data, sort_keys=True), config.seed)


@functools.lru_cache(maxsize=1)
def _load_cached(data_json: str, seed: int) -> base.Dataset:
    return load_dataset(ml_collections.ConfigDict(json.loads(data_json)), seed)
