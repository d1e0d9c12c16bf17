"""Sweeps: the product of value lists over config fields, one run per point.

A sweep is a config with a ``sweep`` section whose list (or tuple) entries are
the axes; nested sections name nested fields::

    config.sweep = ml_collections.ConfigDict()
    config.sweep.batch_size = (100, 500, 1000)
    config.sweep.learning_rate = (0.1, 0.01, 0.001)
    config.sweep.shuffle = (True, False)
    config.sweep.data = ml_collections.ConfigDict({'train_subset': (5000, 0)})

    runs = sweep.expand(config)                       # 18 x 2 Run objects
    failed = sweep.run_sweep(config, 'runs/paper')    # trains, then writes the report

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
# Entries of config.sweep that are options of the sweep, not axes:
# vectorize=True trains runs that differ only in learning rate, shuffle or seed
# together as one vmapped program (resnet_jax/loop.py); repeats=k adds a
# seed axis of k seeds counted from config.seed.
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


def _override(config: ml_collections.ConfigDict, field: str, value: Any) -> None:
    try:
        validation.set_field(config, field, value)
    except validation.ConfigError:
        raise validation.ConfigError(f'config.sweep.{field}: config has no field {field}') from None
    except TypeError as e:
        raise validation.ConfigError(f'config.sweep.{field}={value!r}: {e}') from None


def expand(config: ml_collections.ConfigDict) -> list[Run]:
    """Every run of the sweep, each config validated."""
    grid = axes(config)
    base = base_config(config)
    runs = []
    for index, values in enumerate(itertools.product(*grid.values())):
        overrides = dict(zip(grid, values, strict=True))
        run_config = ml_collections.ConfigDict(base.to_dict())
        for field, value in overrides.items():
            _override(run_config, field, value)
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


def _finished(run: Run, run_dir: str) -> bool:
    """Completed earlier with the same config."""
    summary = workdir_lib.read_json_object(os.path.join(run_dir, workdir_lib.SUMMARY_FILE))
    if summary is None:
        return False
    same = summary.get('config') == workdir_lib.config_json(run.config)
    return summary.get('status') == 'completed' and same


def _record_failure(run: Run, run_dir: str, status: str, error: str) -> None:
    from resnet_jax import distributed  # pylint: disable=g-import-not-at-top

    if not distributed.is_primary():
        return
    summary_path = os.path.join(run_dir, workdir_lib.SUMMARY_FILE)
    summary = workdir_lib.read_json_object(summary_path) or {}
    summary.update(status=status, error=error, config=workdir_lib.config_json(run.config))
    workdir_lib.write_json(summary_path, summary)


def run_one(run: Run, workdir: str) -> str:
    """Trains one run (or skips it); returns its status."""
    from resnet_jax import loop  # pylint: disable=g-import-not-at-top  # Heavy.

    run_dir = os.path.join(workdir, run.name)
    if _finished(run, run_dir):
        logger.info('run %d %s: already completed, skipped', run.index, run.name)
        return 'completed'
    logger.info('run %d %s: training', run.index, run.name)
    try:
        _, summary = loop.train_and_evaluate(run.config, run_dir)
    except workdir_lib.WorkdirBusy as e:
        logger.warning('run %d %s: skipped, %s', run.index, run.name, e)
        return 'busy'
    except KeyboardInterrupt:
        raise
    except (validation.ConfigError, datasets.DataError) as e:
        message = str(e)  # Bad input: one line is the whole story.
        logger.error('run %d %s failed: %s', run.index, run.name, message)
        _record_failure(run, run_dir, 'failed', message)
        return 'failed'
    except Exception as e:  # pylint: disable=broad-except  # Record it and go on.
        message = f'{type(e).__name__}: {e}'
        logger.exception('run %d %s failed: %s', run.index, run.name, message)
        _record_failure(run, run_dir, 'failed', message)
        return 'failed'
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
    except KeyboardInterrupt:
        raise
    except (validation.ConfigError, datasets.DataError) as e:
        return _record_group_failure(runs, run_dirs, str(e), traceback=False)
    except Exception as e:  # pylint: disable=broad-except  # Record it and go on.
        return _record_group_failure(runs, run_dirs, f'{type(e).__name__}: {e}', traceback=True)
    return {run.name: summary['status'] for run, summary in zip(runs, summaries, strict=True)}


def _record_group_failure(
    runs: list[Run], run_dirs: list[str], message: str, traceback: bool
) -> dict[str, str]:
    log = logger.exception if traceback else logger.error
    log('vectorised runs %s failed: %s', ', '.join(run.name for run in runs), message)
    for run, run_dir in zip(runs, run_dirs, strict=True):
        _record_failure(run, run_dir, 'failed', message)
    return {run.name: 'failed' for run in runs}


def _run_vectorized(runs: list[Run], workdir: str) -> dict[str, str]:
    """Runs ``runs``, those differing only in vectorisable fields together."""
    statuses: dict[str, str] = {}
    pending = []
    for run in runs:
        if _finished(run, os.path.join(workdir, run.name)):
            logger.info('run %d %s: already completed, skipped', run.index, run.name)
            statuses[run.name] = 'completed'
        else:
            pending.append(run)
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
    """Runs this shard's runs of the sweep, then writes the report.

    Returns ``{run name: status}`` for this shard's runs.
    """
    from resnet_jax import distributed  # pylint: disable=g-import-not-at-top

    runs = expand(config)
    if distributed.is_primary():
        write_manifest(config, workdir, runs)
    mine = shard_runs(runs, shard)
    logger.info(
        'sweep of %d runs over %s; shard %d/%d runs %d of them',
        len(runs),
        ', '.join(axes(config)),
        shard[0],
        shard[1],
        len(mine),
    )
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
