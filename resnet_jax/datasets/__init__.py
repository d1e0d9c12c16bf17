"""CIFAR-10 into host arrays, and its batching and augmentation on the device.

    from resnet_jax import datasets
    data = datasets.load_for_config(config)     # a Dataset: uint8 NHWC images, int32 labels

Holds :mod:`~resnet_jax.datasets.base` (:class:`Dataset`, :class:`DataError`,
the :data:`SOURCES` registry), one module per source
(:mod:`~resnet_jax.datasets.cifar`, :mod:`~resnet_jax.datasets.image_folder`,
:mod:`~resnet_jax.datasets.tfds_source`, each registering itself in
:data:`SOURCES`), :mod:`~resnet_jax.datasets.loading` (picks the source, holds
out the validation split) and :mod:`~resnet_jax.datasets.augment` (batches
gathered, cropped, flipped and scaled on the device). Imports only the base
modules (:mod:`resnet_jax.registry`, :mod:`resnet_jax.validation`).
"""

# The sources register themselves in SOURCES when imported: all of them, here.
from resnet_jax.datasets import cifar, image_folder, tfds_source  # noqa: F401
from resnet_jax.datasets.base import SOURCES, DataError, Dataset
from resnet_jax.datasets.loading import (
    detect_source,
    hold_out_validation,
    load_dataset,
    load_for_config,
)

__all__ = [
    'SOURCES',
    'DataError',
    'Dataset',
    'detect_source',
    'hold_out_validation',
    'load_dataset',
    'load_for_config',
]
