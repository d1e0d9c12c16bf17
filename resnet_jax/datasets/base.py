"""What every data source shares: the :class:`Dataset`, its errors and the source registry.

The sources (:mod:`resnet_jax.datasets.cifar`, :mod:`~resnet_jax.datasets.image_folder`,
:mod:`~resnet_jax.datasets.tfds_source`) import this module and register a
loader in :data:`SOURCES`; :mod:`resnet_jax.datasets.loading` picks one.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from resnet_jax.registry import Registry

# Data sources by name: ``load(path, data_config, image_size, seed) -> Dataset``,
# registered beside each reader; 'auto' picks one (:func:`detect_source`).
SOURCES: Registry[Callable[[str, Any, int, int], Dataset]] = Registry('data source')
CIFAR_IMAGE_SIZE = 32

EXPECTED_LAYOUTS = (
    'a CIFAR-10 copy (cifar-10-batches-py/ or cifar-10-batches-bin/, or their .tar.gz '
    'archives), an image folder with train/<class>/ and test/<class>/, or a TensorFlow '
    'Datasets data dir holding cifar10/'
)


class DataError(ValueError):
    """Bad or missing dataset input; the message is one sentence for the user."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A whole dataset in host memory (images NHWC uint8, labels int32).

    Images are 32x32 except from an image folder of another data.image_size.
    """

    train_images: np.ndarray  # (N, 32, 32, 3) uint8
    train_labels: np.ndarray  # (N,) int32
    test_images: np.ndarray  # (M, 32, 32, 3) uint8
    test_labels: np.ndarray  # (M,) int32
    class_names: tuple[str, ...]
    source: str  # 'tfds' | 'cifar' | 'folder'
    path: str  # Where it was read from ('' for tfds default dir).
    # Training images held out for model selection (config.data.validation_size).
    validation_images: np.ndarray | None = None  # (V, 32, 32, 3) uint8
    validation_labels: np.ndarray | None = None  # (V,) int32

    def __post_init__(self):
        n = self.num_classes
        if self.validation_images is None:
            shape = (0, *self.train_images.shape[1:])
            object.__setattr__(self, 'validation_images', np.zeros(shape, np.uint8))
            object.__setattr__(self, 'validation_labels', np.zeros((0,), np.int32))
        for split in ('train', 'test', 'validation'):
            images, labels = getattr(self, f'{split}_images'), getattr(self, f'{split}_labels')
            shape = images.shape
            if images.dtype != np.uint8 or len(shape) != 4 or shape[2:] != (shape[1], 3):
                raise DataError(
                    f'{split} images must be uint8 of shape (n, s, s, 3), '
                    f'not {images.dtype} {shape}'
                )
            if labels.dtype != np.int32 or labels.shape != shape[:1]:
                raise DataError(
                    f'{split} labels must be int32 of shape {shape[:1]}, '
                    f'not {labels.dtype} {labels.shape}'
                )
            if labels.size and (labels.min() < 0 or labels.max() >= n):
                raise DataError(
                    f'{split} labels must lie in [0, {n}) for {n} classes, but range over '
                    f'[{labels.min()}, {labels.max()}]'
                )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@contextlib.contextmanager
def os_errors_as_data_errors() -> Iterator[None]:
    """Turns file-system errors (permissions, vanished files) into DataError."""
    try:
        yield
    except OSError as e:
        where = f' {e.filename}' if e.filename else ''
        raise DataError(f'cannot read{where}: {e.strerror or e}') from e
