"""Optimisers and learning-rate schedules, one registry each.

    tx = optim.create_optimizer(config, steps_per_epoch=500)   # config.optimizer, config.schedule
    schedule = optim.create_learning_rate_schedule(config, steps_per_epoch=500)

A new optimiser is one registered function of the config and a learning rate
(a number or a schedule) that declares the config fields it reads::

    @optim.OPTIMIZERS.register('rmsprop', fields={'rmsprop_decay': validation.UNIT})
    def rmsprop(config, learning_rate):
        return optax.rmsprop(learning_rate, decay=config.rmsprop_decay)

A schedule is a registered function ``(config, steps_per_epoch, learning_rate)
-> optax.Schedule`` in the same way. The optimiser's state holds two learning
rates (``optax.inject_hyperparams``): the run's base rate
(``opt_state.hyperparams['learning_rate']``, so runs that differ only in it
share one optimiser and train together), and the rate the schedule gave the
last update (``opt_state.inner_state.hyperparams['learning_rate']``), which
is what a run logs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import optax

from resnet_jax import validation
from resnet_jax.registry import Registry

LearningRate = float | jax.Array | optax.Schedule

OPTIMIZERS: Registry[Callable[[Any, LearningRate], optax.GradientTransformation]] = Registry(
    'optimizer'
)
SCHEDULES: Registry[Callable[[Any, int, float | jax.Array], optax.Schedule]] = Registry('schedule')

_ADAM_FIELDS = {
    'adam_b1': validation.UNIT,
    'adam_b2': validation.UNIT,
    'adam_eps': validation.POSITIVE,
    'weight_decay': validation.NONNEGATIVE,
}


def _with_l2(config: Any, tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``weight_decay`` as an L2 term added to the gradient (PyTorch's ``weight_decay``)."""
    if config.weight_decay:
        return optax.chain(optax.add_decayed_weights(config.weight_decay), tx)
    return tx


@OPTIMIZERS.register('adam', fields=_ADAM_FIELDS)
def adam(config: Any, learning_rate: LearningRate) -> optax.GradientTransformation:
    """Adam (the study's), with ``weight_decay`` as L2 on the gradient."""
    tx = optax.adam(learning_rate, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps)
    return _with_l2(config, tx)


@OPTIMIZERS.register(
    'sgd',
    fields={
        'momentum': validation.UNIT,
        'nesterov': validation.BOOL,
        'weight_decay': validation.NONNEGATIVE,
    },
)
def sgd(config: Any, learning_rate: LearningRate) -> optax.GradientTransformation:
    """SGD with (Nesterov) momentum (0: none), ``weight_decay`` as L2 on the gradient."""
    tx = optax.sgd(learning_rate, momentum=config.momentum or None, nesterov=config.nesterov)
    return _with_l2(config, tx)


@OPTIMIZERS.register(
    'adagrad',
    fields={
        'adagrad_initial_accumulator': validation.NONNEGATIVE,
        'adagrad_eps': validation.POSITIVE,
        'weight_decay': validation.NONNEGATIVE,
    },
)
def adagrad(config: Any, learning_rate: LearningRate) -> optax.GradientTransformation:
    """Adagrad, ``weight_decay`` as L2 on the gradient."""
    tx = optax.adagrad(
        learning_rate,
        initial_accumulator_value=config.adagrad_initial_accumulator,
        eps=config.adagrad_eps,
    )
    return _with_l2(config, tx)


@OPTIMIZERS.register('adamw', fields=_ADAM_FIELDS)
def adamw(config: Any, learning_rate: LearningRate) -> optax.GradientTransformation:
    """Adam with decoupled ``weight_decay``."""
    return optax.adamw(
        learning_rate,
        b1=config.adam_b1,
        b2=config.adam_b2,
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
    )


@SCHEDULES.register(
    'piecewise',
    fields={
        'num_epochs': validation.COUNT,
        'decay_every_epochs': validation.COUNT,
        'decay_factor': validation.POSITIVE,
    },
)
def piecewise(config: Any, steps_per_epoch: int, lr: float | jax.Array) -> optax.Schedule:
    """The study's: divided by ``decay_factor`` every ``decay_every_epochs``."""
    every = config.decay_every_epochs * steps_per_epoch
    boundaries = range(every, config.num_epochs * steps_per_epoch, every)
    return optax.piecewise_constant_schedule(lr, {b: 1.0 / config.decay_factor for b in boundaries})


@SCHEDULES.register('cosine', fields={'num_epochs': validation.COUNT})
def cosine(config: Any, steps_per_epoch: int, lr: float | jax.Array) -> optax.Schedule:
    """Cosine decay to 0 over the run."""
    return optax.cosine_decay_schedule(lr, config.num_epochs * steps_per_epoch)


@SCHEDULES.register('constant')
def constant(config: Any, steps_per_epoch: int, lr: float | jax.Array) -> optax.Schedule:
    """The base learning rate throughout."""
    del config, steps_per_epoch
    return optax.constant_schedule(lr)


def create_learning_rate_schedule(
    config: ml_collections.ConfigDict,
    steps_per_epoch: int,
    learning_rate: float | jax.Array | None = None,
) -> optax.Schedule:
    """``config.schedule`` from ``learning_rate`` (default ``config.learning_rate``).

    Epochs are converted to steps with ``steps_per_epoch``.
    """
    lr = config.learning_rate if learning_rate is None else learning_rate
    return SCHEDULES.get(config.schedule)(config, steps_per_epoch, lr)


def create_optimizer(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.GradientTransformation:
    """The optax optimiser named by ``config.optimizer`` following ``config.schedule``.

    The base learning rate is ``opt_state.hyperparams['learning_rate']``; the
    scheduled rate of the last update is :func:`applied_learning_rate`.
    """
    make_optimizer = functools.partial(OPTIMIZERS.get(config.optimizer), config)

    def make(learning_rate):
        schedule = create_learning_rate_schedule(config, steps_per_epoch, learning_rate)
        return optax.inject_hyperparams(make_optimizer)(learning_rate=schedule)

    return optax.inject_hyperparams(make)(learning_rate=config.learning_rate)


def base_learning_rate(opt_state: Any) -> jax.Array:
    """The base learning rate of an optimiser state (stacked states: one per run)."""
    return opt_state.hyperparams['learning_rate']


def applied_learning_rate(opt_state: Any) -> jax.Array:
    """The learning rate the schedule gave the last update (before any: the first step's)."""
    return opt_state.inner_state.hyperparams['learning_rate']


def optimizer_key(config: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
    """The fields that define a config's optimiser, the base learning rate aside.

    (The base rate is optimiser state: runs differing only in it share one.)
    """
    fields = {'optimizer', 'schedule'}
    fields |= set(OPTIMIZERS.fields(config.optimizer)) | set(SCHEDULES.fields(config.schedule))
    return tuple((k, validation.get_field(config, k)) for k in sorted(fields))


@functools.lru_cache(maxsize=64)
def _cached(key: tuple[tuple[str, Any], ...], steps_per_epoch: int) -> optax.GradientTransformation:
    config = ml_collections.ConfigDict({})
    for field, value in key:
        validation.set_field(config, field, value, create=True)
    config.learning_rate = 1.0
    return create_optimizer(config, steps_per_epoch)


def cached_optimizer(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.GradientTransformation:
    """:func:`create_optimizer`, one object for all configs with the same :func:`optimizer_key`."""
    return _cached(optimizer_key(config), steps_per_epoch)
