"""A run config's checks: before anything is loaded, and once the data is known.

    checks.validate_config(config)                  # ConfigError naming the first bad field
    checks.check_data_fits(config, data, num_devices)

The choices of model, optimiser, schedule and data source, and the fields each
of them reads, come from their registries; the checks themselves are the
primitives of :mod:`resnet_jax.validation`.
"""

from __future__ import annotations

import os

import ml_collections

from resnet_jax import datasets, models, validation
from resnet_jax.training import optim

# The values of config.eval_test: when the test set is evaluated.
EVAL_TEST = ('auto', 'every_epoch', 'end')


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises :class:`~resnet_jax.validation.ConfigError` on the first invalid field."""
    validation.validate_distributed(config)
    validation.check_registered(config, models.MODELS, 'model')
    validation.check_choice(config, 'dtype', sorted(models.DTYPES))
    validation.check_registered(config, optim.OPTIMIZERS, 'optimizer')
    validation.check_registered(config, optim.SCHEDULES, 'schedule')
    if 'eval_test' in config:  # Absent from configs recorded before it existed.
        validation.check_choice(config, 'eval_test', EVAL_TEST)
    validation.check_choice(config, 'data.source', ('auto', *datasets.SOURCES.names()))
    if config.data.source != 'auto':
        validation.check_registered(config, datasets.SOURCES, 'data.source')
    for field in (
        'num_epochs',
        'batch_size',
        'eval_batch_size',
        'num_classes',
        'image_size',
        'checkpoint_every_epochs',
        'keep_checkpoints',
    ):
        validation.check_int(config, field, 1)
    for field in (
        'data.train_subset',
        'data.validation_size',
        'data.validation_seed',
        'data.pad',
        'seed',
        'check_finite_every_steps',
        'steps_per_call',
    ):
        validation.check_int(config, field, 0)
    for field in ('learning_rate', 'progress_every_seconds'):
        validation.check_positive(config, field)
    if config.data.normalize:
        for field in ('data.mean', 'data.std'):
            value = validation.get_field(config, field)
            if len(value) != 3 or not all(validation.is_number(v) for v in value):
                raise validation.ConfigError(f'config.{field} must be 3 numbers, got {value!r}')
        if min(config.data.std) <= 0:
            raise validation.ConfigError(f'config.data.std must be > 0, got {config.data.std!r}')
    path = validation.get_field(config, 'data.path')
    if path and not os.path.exists(os.path.expanduser(path)):
        raise validation.ConfigError(f'data path does not exist: {path}')


def check_data_fits(
    config: ml_collections.ConfigDict, data: datasets.Dataset, num_devices: int
) -> None:
    """:class:`ConfigError` if the batch or the class count does not fit the data."""
    if config.batch_size > len(data.train_labels):
        raise validation.ConfigError(
            f'config.batch_size={config.batch_size} is larger than the training set '
            f'({len(data.train_labels)} images)'
        )
    if config.batch_size % num_devices:
        raise validation.ConfigError(
            f'config.batch_size={config.batch_size} is not divisible by the '
            f'{num_devices} devices it is sharded over'
        )
    if data.num_classes > config.num_classes:
        raise validation.ConfigError(
            f'the dataset has {data.num_classes} classes but config.num_classes='
            f'{config.num_classes}'
        )
