"""Sweeps: the product of value lists over config fields, one run per point.

A sweep is a config with a ``sweep`` section whose list (or tuple) entries are
the axes; nested sections name nested fields::

    config.sweep = ml_collections.ConfigDict()
    config.sweep.batch_size = (100, 500, 1000)
    config.sweep.learning_rate = (0.1, 0.01, 0.001)
    config.sweep.shuffle = (True, False)
    config.sweep.data = ml_collections.ConfigDict({'train_subset': (5000, 0)})

    runs = sweep.expand(config)                         # 18 x 2 Run objects
    statuses = sweep.run_sweep(config, 'runs/paper')    # trains, then writes the report

Axes are taken in sorted name order (how ``ConfigDict`` lists its keys), values
in the order given. Each run trains in ``workdir/<name>`` where the name lists
its overrides (``batch_size=100,learning_rate=0.01,shuffle=True``). Finished
runs are skipped, interrupted ones resume from their checkpoints, a failing or
diverging run is recorded in its ``summary.json`` and the sweep goes on.
``shard=(i, n)`` runs only every n-th run starting at i, so n processes can
share one sweep workdir.

``config.sweep.repeats = k`` repeats every point with k seeds: it is a ``seed``
axis of ``config.seed, config.seed + 1, ..., config.seed + k - 1`` (so run names
list ``seed=...``), and the report gives each cell (the other axes' values) as
mean ± sd over its seeds with a 95% interval (:mod:`resnet_jax.report`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
from typing import Any

import ml_collections

from resnet_jax import datasets, validation
from resnet_jax import workdir as workdir_lib

logger = logging.getLogger('resnet_jax')

MANIFEST_FILE = workdir_lib.MANIFEST_FILE
# Entries of config.sweep that are options of the sweep, not axes: vectorize=True
# trains runs that differ only in VECTORIZABLE fields together as one program
# (resnet_jax/loop.py); repeats=k adds a seed axis (see above).
OPTIONS = ('vectorize', 'repeats')
SEED_AXIS = 'seed'


@dataclasses.dataclass(frozen=True)
class Run:
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


def run_name(overrides: dict[str, Any]) -> str:
    """The folder name of a run: ``name=value`` pairs joined by commas."""
    return ','.join(f'{k}={_format(v)}' for k, v in overrides.items())


def base_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """An unlocked copy of ``config`` without its sweep section."""
    base = ml_collections.ConfigDict(config.to_dict())
    if 'sweep' in base:
        del base['sweep']
    return base


def expand(config: ml_collections.ConfigDict) -> list[Run]:
    """Every run of the sweep, each config validated."""
    grid = axes(config)
    base = base_config(config)
    runs = []
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
            validation.validate_config(run_config)
        except validation.ConfigError as e:
            raise validation.ConfigError(f'run {run_name(overrides)}: {e}') from None
        runs.append(Run(index, run_name(overrides), overrides, run_config))
    return runs


def parse_shard(text: str) -> tuple[int, int]:
    """``'i/n'`` -> ``(i, n)`` with ``0 <= i < n``."""
    try:
        i, n = (int(part) for part in text.split('/'))
    except ValueError:
        raise validation.ConfigError(f'--sweep_shard must look like i/n, got {text!r}') from None
    if n < 1 or not 0 <= i < n:
        raise validation.ConfigError(f'--sweep_shard={text}: need 0 <= i < n')
    return i, n


def shard_runs(runs: list[Run], shard: tuple[int, int]) -> list[Run]:
    """The runs of shard ``i`` of ``n``: every n-th run starting at i."""
    i, n = shard
    return [run for run in runs if run.index % n == i]


def write_manifest(config: ml_collections.ConfigDict, workdir: str, runs: list[Run]) -> None:
    """``workdir/sweep.json``: the axes (with ``seed`` for ``repeats``), the sweep's
    options, every run and the base config."""
    os.makedirs(workdir, exist_ok=True)
    sweep = config.get('sweep', ml_collections.ConfigDict())
    manifest = {
        'axes': axes(config),
        'options': {name: sweep[name] for name in OPTIONS if name in sweep},
        'runs': [{'name': r.name, 'overrides': r.overrides} for r in runs],
        'base_config': base_config(config).to_dict(),
    }
    workdir_lib.write_json(os.path.join(workdir, MANIFEST_FILE), manifest)


def _skipped(run: Run, workdir: str) -> bool:
    """Whether ``run`` completed earlier with the same config (then logged as skipped)."""
    path = os.path.join(workdir, run.name, workdir_lib.SUMMARY_FILE)
    summary = workdir_lib.read_json_object(path)
    done = summary is not None and summary.get('status') == 'completed'
    if done and summary.get('config') == workdir_lib.config_json(run.config):
        logger.info('run %d %s: already completed, skipped', run.index, run.name)
        return True
    return False


def _record_failure(runs: list[Run], workdir: str, what: str, error: Exception) -> dict[str, str]:
    """Logs that ``what`` failed with ``error`` and records it in each run's summary."""
    from resnet_jax import distributed  # pylint: disable=g-import-not-at-top

    if isinstance(error, (validation.ConfigError, datasets.DataError)):
        message = str(error)  # Bad input: one line is the whole story.
        logger.error('%s failed: %s', what, message)
    else:
        message = f'{type(error).__name__}: {error}'
        logger.exception('%s failed: %s', what, message)
    if distributed.is_primary():
        for run in runs:
            path = os.path.join(workdir, run.name, workdir_lib.SUMMARY_FILE)
            summary = workdir_lib.read_json_object(path) or {}
            config = workdir_lib.config_json(run.config)
            summary.update(status='failed', error=message, config=config)
            workdir_lib.write_json(path, summary)
    return {run.name: 'failed' for run in runs}


def run_one(run: Run, workdir: str) -> str:
    """Trains one run (or skips it); returns its status."""
    from resnet_jax import loop  # pylint: disable=g-import-not-at-top  # Heavy.

    if _skipped(run, workdir):
        return 'completed'
    logger.info('run %d %s: training', run.index, run.name)
    try:
        _, summary = loop.train_and_evaluate(run.config, os.path.join(workdir, run.name))
    except workdir_lib.WorkdirBusy as e:
        logger.warning('run %d %s: skipped, %s', run.index, run.name, e)
        return 'busy'
    except Exception as e:  # pylint: disable=broad-except  # Record it and go on.
        return _record_failure([run], workdir, f'run {run.index} {run.name}', e)[run.name]
    return summary['status']


def run_group(runs: list[Run], workdir: str) -> dict[str, str]:
    """Trains ``runs`` together (:func:`resnet_jax.loop.train_runs`); returns their statuses.

    If one of their workdirs is busy (another shard trains it), the runs are
    trained one by one instead, which skips the busy one.
    """
    from resnet_jax import loop  # pylint: disable=g-import-not-at-top  # Heavy.

    names = ', '.join(run.name for run in runs)
    logger.info('runs %s: training together (vectorised)', names)
    run_dirs = [os.path.join(workdir, run.name) for run in runs]
    try:
        _, summaries = loop.train_runs([run.config for run in runs], run_dirs)
    except workdir_lib.WorkdirBusy as e:
        logger.warning('runs %s: %s; training them one by one', names, e)
        return {run.name: run_one(run, workdir) for run in runs}
    except Exception as e:  # pylint: disable=broad-except  # Record it and go on.
        return _record_failure(runs, workdir, f'vectorised runs {names}', e)
    return {run.name: summary['status'] for run, summary in zip(runs, summaries, strict=True)}


def _run_vectorized(runs: list[Run], workdir: str) -> dict[str, str]:
    """Runs ``runs``, those differing only in vectorisable fields together."""
    statuses = {run.name: 'completed' for run in runs if _skipped(run, workdir)}
    pending = [run for run in runs if run.name not in statuses]
    for group in group_runs([run.config for run in pending]):
        members = [pending[i] for i in group]
        if len(members) == 1:
            statuses[members[0].name] = run_one(members[0], workdir)
        else:
            statuses.update(run_group(members, workdir))
    return {run.name: statuses[run.name] for run in runs}


def run_sweep(
    config: ml_collections.ConfigDict, workdir: str, shard: tuple[int, int] = (0, 1)
) -> dict[str, str]:
    """Runs this shard's runs of the sweep, then writes the report; ``{run name: status}``."""
    from resnet_jax import distributed  # pylint: disable=g-import-not-at-top

    runs = expand(config)
    if distributed.is_primary():
        write_manifest(config, workdir, runs)
    mine = shard_runs(runs, shard)
    axes_text = ', '.join(axes(config))
    message = 'sweep of %d runs over %s; shard %d/%d runs %d of them'
    logger.info(message, len(runs), axes_text, *shard, len(mine))
    if config.sweep.get('vectorize', False):
        statuses = _run_vectorized(mine, workdir)
    else:
        statuses = {run.name: run_one(run, workdir) for run in mine}
    if distributed.is_primary():
        write_report(workdir)
    return statuses


def write_report(workdir: str) -> dict[str, str]:
    """Writes the sweep report; a failure to plot is a warning, not an error."""
    from resnet_jax import report  # pylint: disable=g-import-not-at-top

    try:
        paths = report.write_report(workdir)
    except ImportError as e:
        logger.warning('report not written: %s', e)
        return {}
    for kind, path in paths.items():
        logger.info('report %s: %s', kind, path)
    return paths


# Config fields in which the runs of one group may differ: they train together
# as one program (resnet_jax/loop.py).
VECTORIZABLE = ('learning_rate', 'shuffle', 'seed')


def group_key(config: ml_collections.ConfigDict) -> str:
    """The config without its vectorisable fields: runs with equal keys share a program."""
    fields = workdir_lib.config_json(config)
    for name in (*VECTORIZABLE, 'sweep'):
        fields.pop(name, None)
    return json.dumps(fields, sort_keys=True)


def group_runs(configs: list[ml_collections.ConfigDict]) -> list[list[int]]:
    """Indices of ``configs`` grouped by :func:`group_key`, in first-seen order."""
    groups: dict[str, list[int]] = {}
    for i, config in enumerate(configs):
        groups.setdefault(group_key(config), []).append(i)
    return list(groups.values())
