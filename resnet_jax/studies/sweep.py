"""Sweeps: the product of value lists over config fields, one run per point.

A sweep is a config with a ``sweep`` section whose list (or tuple) entries are
the axes; nested sections name nested fields::

    config.sweep = ml_collections.ConfigDict()
    config.sweep.batch_size = (100, 500, 1000)
    config.sweep.learning_rate = (0.1, 0.01, 0.001)
    config.sweep.shuffle = (True, False)
    config.sweep.data = ml_collections.ConfigDict({'train_subset': (5000, 0)})

    points = sweep.expand(config)                       # 18 x 2 grid points

Axes are taken in sorted name order (how ``ConfigDict`` lists its keys), values
in the order given. Each run trains in ``workdir/<name>`` where the name lists
its overrides (``batch_size=100,learning_rate=0.01,shuffle=True``). Finished
runs are skipped, interrupted ones resume from their checkpoints, a failing or
diverging run is recorded in its ``summary.json`` and the sweep goes on.
A sweep runs as a grid study (:func:`resnet_jax.studies.search.run_study`): any
number of workers (the same command started again, or ``--workers=N``) share its
points; the command line then writes its report
(:func:`resnet_jax.reports.sweep_report.write_sweep_report`).

``config.sweep.repeats = k`` repeats every point with k seeds: it is a ``seed``
axis of ``config.seed, config.seed + 1, ..., config.seed + k - 1`` (so run names
list ``seed=...``), and the report gives each cell (the other axes' values) as
mean ± sd over its seeds with a 95% interval (:mod:`resnet_jax.reports.sweep_report`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import ml_collections

from resnet_jax import validation
from resnet_jax.rundir import workdir as workdir_lib
from resnet_jax.training import checks

logger = logging.getLogger('resnet_jax')

MANIFEST_FILE = workdir_lib.MANIFEST_FILE
# Entries of config.sweep that are options of the sweep, not axes: vectorize=True
# trains runs that differ only in loop.VECTORIZABLE fields together as one program
# (resnet_jax.training.loop); repeats=k adds a seed axis (see above).
OPTIONS = ('vectorize', 'repeats')
SEED_AXIS = 'seed'


@dataclasses.dataclass(frozen=True)
class Point:
    """One point of a sweep."""

    index: int
    name: str
    overrides: dict[str, Any]
    config: ml_collections.ConfigDict


def is_sweep(config: ml_collections.ConfigDict) -> bool:
    """Whether ``config`` has a ``sweep`` section with at least one axis."""
    return 'sweep' in config and bool(axes(config))


def axes(config: ml_collections.ConfigDict) -> dict[str, list[Any]]:
    """``{dotted field name: values}`` of the sweep section, in sorted order.

    ``repeats=k`` is the axis ``seed`` (``config.seed`` ... ``config.seed + k - 1``).
    """
    found: dict[str, list[Any]] = {}

    def walk(node: Any, prefix: str) -> None:
        for key, value in node.items():
            name = prefix + key
            if name in OPTIONS:
                check_option(name, value)
            elif isinstance(value, ml_collections.ConfigDict):
                walk(value, name + '.')
            elif isinstance(value, (list, tuple)):
                found[name] = list(value)
            else:
                raise validation.ConfigError(
                    f'config.sweep.{name} must be a list of values, got {value!r}'
                )

    sweep = config.get('sweep', ml_collections.ConfigDict())
    walk(sweep, '')
    for name, values in found.items():
        if not values:
            raise validation.ConfigError(f'config.sweep.{name} is empty')
    repeats = sweep.get('repeats')
    if repeats is not None:
        if SEED_AXIS in found:
            raise validation.ConfigError(
                f'config.sweep.repeats={repeats} and config.sweep.seed are both set: '
                'repeats already sweeps the seeds config.seed, config.seed + 1, ...; keep one'
            )
        found[SEED_AXIS] = repeat_seeds(config.get('seed', 0), repeats)
        found = dict(sorted(found.items(), key=lambda item: item[0].split('.')[0]))
    return found


def check_option(name: str, value: Any) -> None:
    """Raises ``ConfigError`` unless ``value`` is valid for the sweep option ``name``."""
    if name == 'repeats':  # None (e.g. config_dict.placeholder(int)): not set.
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 1
        ):
            raise validation.ConfigError(
                f'config.sweep.repeats must be an integer >= 1 (runs per point, one per '
                f'seed), got {value!r}'
            )
    elif not isinstance(value, bool):
        raise validation.ConfigError(f'config.sweep.{name} must be True or False, got {value!r}')


def repeat_seeds(base_seed: Any, repeats: int) -> list[int]:
    """The seed axis of ``config.sweep.repeats``: ``base_seed, ..., base_seed + repeats - 1``."""
    if not isinstance(base_seed, int) or isinstance(base_seed, bool) or base_seed < 0:
        raise validation.ConfigError(
            f'config.sweep.repeats counts seeds from config.seed, which must be an '
            f'integer >= 0, got {base_seed!r}'
        )
    return [base_seed + i for i in range(repeats)]


def _format(value: Any) -> str:
    text = repr(value) if isinstance(value, float) else str(value)
    return text.replace(os.sep, '_').replace(',', '_')


def run_name(overrides: Mapping[str, Any]) -> str:
    """The name and folder of the run of a point: its ``field=value`` pairs joined by
    commas, readable and always distinct.

    Every place that names a run (a grid's points and ``sweep.json``, a search's
    trials and their ``run`` user attribute, the reports) uses this one function.
    Values that cannot be written as they are (path separators, commas, very long
    names) are written simplified, with a hash of the exact values appended, so two
    distinct points never share a folder.
    """
    name = ','.join(f'{k}={_format(v)}' for k, v in overrides.items())
    exact = ','.join(
        f'{k}={v!r}' if isinstance(v, float) else f'{k}={v}' for k, v in overrides.items()
    )
    if name != exact or len(name) > 150:
        digest = hashlib.sha256(json.dumps(list(overrides.items())).encode()).hexdigest()[:10]
        name = f'{name[:120]}-{digest}'
    return name


def base_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """An unlocked copy of ``config`` without its sweep section."""
    base = ml_collections.ConfigDict(config.to_dict())
    if 'sweep' in base:
        del base['sweep']
    return base


def expand(config: ml_collections.ConfigDict) -> list[Point]:
    """Every point of the sweep, each config validated."""
    grid = axes(config)
    base = base_config(config)
    points = []
    for index, values in enumerate(itertools.product(*grid.values())):
        overrides = dict(zip(grid, values, strict=True))
        run_config = ml_collections.ConfigDict(base.to_dict())
        for field, value in overrides.items():
            try:
                validation.set_field(run_config, field, value)
            except validation.ConfigError:
                error = f'config.sweep.{field}: config has no field {field}'
                raise validation.ConfigError(error) from None
            except TypeError as e:
                raise validation.ConfigError(f'config.sweep.{field}={value!r}: {e}') from None
        try:
            checks.validate_config(run_config)
        except validation.ConfigError as e:
            raise validation.ConfigError(f'run {run_name(overrides)}: {e}') from None
        points.append(Point(index, run_name(overrides), overrides, run_config))
    return points


def write_manifest(config: ml_collections.ConfigDict, workdir: str, points: list[Point]) -> None:
    """``workdir/sweep.json``: the axes (with ``seed`` for ``repeats``), the sweep's
    options, every point's run and the base config."""
    os.makedirs(workdir, exist_ok=True)
    sweep = config.get('sweep', ml_collections.ConfigDict())
    manifest = {
        'axes': axes(config),
        'options': {name: sweep[name] for name in OPTIONS if name in sweep},
        'runs': [{'name': p.name, 'overrides': p.overrides} for p in points],
        'base_config': base_config(config).to_dict(),
    }
    workdir_lib.write_json(os.path.join(workdir, MANIFEST_FILE), manifest)


def group_runs(configs: list[ml_collections.ConfigDict]) -> list[list[int]]:
    """Indices of ``configs`` that train together (:func:`resnet_jax.training.loop.group_key`),
    grouped in first-seen order."""
    from resnet_jax.training import loop  # pylint: disable=g-import-not-at-top  # Heavy.

    groups: dict[str, list[int]] = {}
    for i, config in enumerate(configs):
        groups.setdefault(loop.group_key(config), []).append(i)
    return list(groups.values())
