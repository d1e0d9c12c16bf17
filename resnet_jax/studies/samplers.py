"""A study's samplers and pruners, one registry each (``config.search.sampler``, ``.pruner``).

    from resnet_jax import validation
    from resnet_jax.studies import samplers

    @samplers.SAMPLERS.register('halton', fields={'halton_scramble': validation.BOOL})
    def halton(spec, seed):                     # -> an optuna sampler
        import optuna
        return optuna.samplers.QMCSampler(
            qmc_type='halton', scramble=spec.options['halton_scramble'], seed=spec.seed)

    @samplers.PRUNERS.register('threshold', fields={'prune_below': validation.POSITIVE})
    def threshold(spec):                        # -> an optuna pruner
        import optuna
        return optuna.pruners.ThresholdPruner(lower=spec.options['prune_below'])

A sampler is a function of the study's spec
(:class:`resnet_jax.studies.search_space.Spec`) and the seed of one draw: a
worker makes a sampler for each new trial, seeded from ``config.search.seed``
and the number of trials before it (``optuna_study.draw_seed``). A pruner is a
function of the spec, made once when the study is opened. ``fields`` are the
``config.search`` options an entry reads, each with its check (see
:mod:`resnet_jax.validation`); the shipped options are attributes of the spec
(``spec.startup_trials``, ``spec.min_epochs``, ``spec.reduction_factor``),
any other declared one is in ``spec.options``. The ``grid`` sampler is never
asked: a grid's points are all enqueued. Optuna is imported inside the
factories only, so that validating a config does not load it.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from resnet_jax import validation
from resnet_jax.registry import Registry

# (spec, seed of the draw) -> an optuna.samplers.BaseSampler.
SAMPLERS: Registry[Callable[[Any, int], Any]] = Registry('sampler')
# (spec) -> an optuna.pruners.BasePruner.
PRUNERS: Registry[Callable[[Any], Any]] = Registry('pruner')

GRID = 'grid'  # The sampler whose points are all enqueued: it is never asked.

_STARTUP_TRIALS = {'startup_trials': functools.partial(validation.check_int, minimum=0)}
_MIN_EPOCHS = {'min_epochs': validation.COUNT}
_REDUCTION_FACTOR = {'reduction_factor': functools.partial(validation.check_int, minimum=2)}


@SAMPLERS.register('tpe', fields=_STARTUP_TRIALS)
def tpe(spec: Any, seed: int) -> Any:
    """TPE after ``startup_trials`` random ones; running trials count as bad results
    (its constant liar), so that parallel workers spread out."""
    import optuna  # pylint: disable=g-import-not-at-top

    return optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=spec.startup_trials, constant_liar=True
    )


@SAMPLERS.register('random')
def random(spec: Any, seed: int) -> Any:
    """Each field drawn independently and uniformly (log-uniformly on a log scale)."""
    del spec
    import optuna  # pylint: disable=g-import-not-at-top

    return optuna.samplers.RandomSampler(seed=seed)


@SAMPLERS.register('qmc')
def qmc(spec: Any, seed: int) -> Any:
    """A scrambled Sobol sequence, scrambled by the study's seed.

    The study's storage holds how far along the sequence the draws are, so every
    worker takes the next point. The first trial (before any has ended, the
    space is unknown) is drawn at random with the draw's seed.
    """
    import optuna  # pylint: disable=g-import-not-at-top

    # Drawing one point at a time never makes a power of 2: SciPy warns every draw.
    warnings.filterwarnings('ignore', message='The balance properties of Sobol')
    return optuna.samplers.QMCSampler(
        qmc_type='sobol',
        scramble=True,
        seed=spec.seed,
        independent_sampler=optuna.samplers.RandomSampler(seed=seed),
    )


@SAMPLERS.register(GRID)
def grid(spec: Any, seed: int) -> Any:
    """Every point of a grid, each once: the points are enqueued, so this is never asked."""
    return random(spec, seed)


@PRUNERS.register('none')
def none(spec: Any) -> Any:
    """Never prunes."""
    del spec
    import optuna  # pylint: disable=g-import-not-at-top

    return optuna.pruners.NopPruner()


@PRUNERS.register('median', fields={**_STARTUP_TRIALS, **_MIN_EPOCHS})
def median(spec: Any) -> Any:
    """Stops a trial below the median of the earlier trials at the same epoch, from
    epoch ``min_epochs`` on, once ``startup_trials`` trials have ended."""
    import optuna  # pylint: disable=g-import-not-at-top

    return optuna.pruners.MedianPruner(
        n_startup_trials=spec.startup_trials, n_warmup_steps=spec.min_epochs - 1
    )


@PRUNERS.register('successive_halving', fields={**_MIN_EPOCHS, **_REDUCTION_FACTOR})
def successive_halving(spec: Any) -> Any:
    """Keeps the best ``1 / reduction_factor`` at each rung, the first at ``min_epochs``."""
    import optuna  # pylint: disable=g-import-not-at-top

    return optuna.pruners.SuccessiveHalvingPruner(
        min_resource=spec.min_epochs, reduction_factor=spec.reduction_factor
    )


@PRUNERS.register('hyperband', fields={**_MIN_EPOCHS, **_REDUCTION_FACTOR})
def hyperband(spec: Any) -> Any:
    """Successive halving in brackets, from ``min_epochs`` to the run's ``num_epochs``."""
    import optuna  # pylint: disable=g-import-not-at-top

    return optuna.pruners.HyperbandPruner(
        min_resource=spec.min_epochs,
        max_resource=spec.base.num_epochs,
        reduction_factor=spec.reduction_factor,
    )


def declared_fields() -> tuple[str, ...]:
    """Every ``config.search`` option some registered sampler or pruner reads."""
    names = dict.fromkeys(
        field
        for registry in (SAMPLERS, PRUNERS)
        for name in registry.names()
        for field in registry.fields(name)
    )
    return tuple(names)


def read_options(values: Mapping[str, Any]) -> dict[str, Any]:
    """The ``config.search`` options (``values``) that the chosen sampler and pruner read.

    Each is checked as its entry declares: :class:`~resnet_jax.validation.ConfigError`
    naming the first that is missing or bad.
    """
    view = {'search': dict(values)}
    read: dict[str, Any] = {}
    for kind, registry in (('sampler', SAMPLERS), ('pruner', PRUNERS)):
        name = values[kind]
        for field, check in registry.fields(name).items():
            if values.get(field) is None:
                raise validation.ConfigError(
                    f'config.search.{field} is missing ({kind} {name!r} reads it)'
                )
            check(view, f'search.{field}')
            value = values[field]
            read[field] = value.to_dict() if hasattr(value, 'to_dict') else value
    return read
