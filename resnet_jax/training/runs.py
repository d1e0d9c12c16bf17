"""One run of a training group: its state, its workdir's records and its summary.

    run = runs.new_run(config, workdir, dataset=0, steps_per_epoch=..., replicated=..., ...)
    runs.resume(run)          # the newest readable checkpoint, the writers
    ...                       # resnet_jax.training.loop trains the group
    runs.close(run)
    summary = runs.finish(run, num_params, flops, data, mesh)

A run resumes from its newest readable checkpoint; a torn ``metrics.jsonl`` or
TensorBoard's missing epochs are rebuilt. A run whose loss or parameters stop
being finite is marked ``diverged`` (its last good checkpoint is kept); an
epoch callback may stop it as ``pruned``. Every run ends with ``summary.json``.
"""

# No `from __future__ import annotations`: clu reads Metrics annotations at run time.
import dataclasses
import importlib.metadata
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding

from resnet_jax import datasets, validation
from resnet_jax.rundir import locks, writers
from resnet_jax.rundir import workdir as workdir_lib
from resnet_jax.training import checkpoints, distributed, train

logger = logging.getLogger('resnet_jax')


@dataclasses.dataclass
class Run:
    """One run of a group and everything the loop keeps for it."""

    config: ml_collections.ConfigDict
    workdir: str
    manager: ocp.CheckpointManager
    state: train.TrainState
    order_rng: jax.Array
    dataset: int  # Which of the group's distinct training sets it trains on.
    epoch: int = 0  # Completed epochs when the group starts.
    position: int = 0  # Batches of the next epoch already trained.
    partial: train.TrainMetrics | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    records: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    writer: writers.MetricLogger | None = None
    status: str = 'incomplete'  # -> 'completed', 'diverged' or 'pruned'
    error: str | None = None
    changed: bool = False  # Whether this invocation trained it or repaired its records.
    # Called with each epoch's record (restored ones too); True stops the run as 'pruned'.
    on_epoch: Callable[[dict[str, Any]], bool] | None = None
    pruned_epoch: int | None = None
    lanes: int = 1  # The runs of its group, trained as one program.
    started: float = 0.0  # When this invocation started (``time.time()``).
    held: locks.Held | None = None  # Its workdir's lock (None on other processes).
    # Raises locks.OwnershipLost once the run is another process's (a study's retried trial).
    fence: Callable[[], None] | None = None
    # This start's first compiled call: (epoch, seconds incl. compiling, images).
    first_call: tuple[int, float, int] | None = None

    @property
    def active(self) -> bool:
        return self.status == 'incomplete'

    @property
    def prefix(self) -> str:
        """How log lines name the run: not at all when it trains alone."""
        return f'{self.workdir}: ' if self.lanes > 1 else ''


def check_owned(run: Run) -> None:
    """Raises :class:`~resnet_jax.rundir.locks.OwnershipLost` if ``run`` is no longer
    this process's to write: called before every write into its workdir."""
    if run.held is not None:
        run.held.check()
    if run.fence is not None:
        run.fence()


def any_active(runs: list[Run]) -> bool:
    """Whether any of ``runs`` is still training."""
    return any(run.active for run in runs)


def new_run(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    dataset: int,
    steps_per_epoch: int,
    replicated: NamedSharding,
    lanes: int,
    started: float,
    on_epoch: Callable[[dict[str, Any]], bool] | None = None,
) -> Run:
    """A run's initial state (``replicated`` over the global mesh: a restore reads
    into its layout) and its checkpoint manager."""
    init_rng, order_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    state = jax.device_put(train.create_train_state(config, init_rng, steps_per_epoch), replicated)
    manager = checkpoints.checkpoint_manager(workdir, config.keep_checkpoints)
    return Run(
        config,
        workdir,
        manager,
        state,
        order_rng,
        dataset,
        on_epoch=on_epoch,
        lanes=lanes,
        started=started,
    )


def close(run: Run) -> None:
    """Closes a run's checkpoint manager (waiting for its saves) and its writers."""
    checkpoints.close_quietly(run.manager)
    if run.writer is not None:
        run.writer.close()


def resume(run: Run) -> None:
    """Restores a run's newest readable checkpoint, if any, and opens its writers.

    Its ``config.json`` is written only once the checkpoint has been read, and
    not at all when the run has nothing left to train: a finished run is left
    as it is. The record of the checkpoint's epoch, if ``metrics.jsonl`` lost it
    (a torn last line), is rebuilt from the checkpoint, and epochs missing from
    TensorBoard's files are written again.
    """
    workdir, config = run.workdir, run.config
    check_owned(run)
    restored = checkpoints.restore_latest_good(workdir, run.manager, run.state)
    if restored is not None:
        run.state, run.meta, partial = restored
        run.epoch, run.position = int(run.meta['epoch']), int(run.meta.get('position', 0))
        run.partial = partial if run.position else None
        if run.epoch > config.num_epochs:
            raise validation.ConfigError(
                f'{workdir} holds a run trained for {run.epoch} epochs, more than num_epochs='
                f'{config.num_epochs}; nothing was changed'
            )
    primary = distributed.is_primary()
    finished = run.epoch == config.num_epochs and not run.position
    config_path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
    if primary and not (finished and os.path.exists(config_path)):
        workdir_lib.write_config(workdir, config)
    run.records = writers.truncate_metrics(workdir, run.epoch, write=primary)
    run.writer = writers.MetricLogger(workdir, enabled=primary)
    rebuild_record(run)
    restored_epochs = run.writer.restore_tensorboard(run.records)
    if restored_epochs:
        logger.warning(
            '%sTensorBoard lacked epoch(s) %s of metrics.jsonl: written again',
            run.prefix,
            ', '.join(map(str, restored_epochs)),
        )
    if finished:
        logger.info('%sthe run is complete (%d epochs): nothing to train', run.prefix, run.epoch)
    elif restored is not None:
        where = f' (step {run.position} of epoch {run.epoch + 1})' if run.position else ''
        logger.info('%sresuming after epoch %d%s', run.prefix, run.epoch, where)
        warn_on_another_layout(run)
    for record in run.records:  # The callback sees the restored epochs too.
        if run.active and pruned(run, record):
            run.changed = True
            logger.info('%spruned after epoch %d', run.prefix, record['epoch'])


def pruned(run: Run, record: dict[str, Any]) -> bool:
    """Asks the run's epoch callback about ``record``; marks the run pruned if it says so."""
    if run.on_epoch is None or not run.on_epoch(record):
        return False
    run.status, run.pruned_epoch = 'pruned', int(record['epoch'])
    return True


def rebuild_record(run: Run) -> None:
    """Appends the checkpointed epoch's record if ``metrics.jsonl`` lacks it.

    Every end-of-epoch checkpoint holds its epoch's record in its ``meta``.
    """
    record = run.meta.get('record')
    last = run.records[-1]['epoch'] if run.records else 0
    if run.position or not run.epoch or last >= run.epoch or not isinstance(record, dict):
        return
    where = f'the checkpoint of epoch {run.epoch} in {run.manager.directory}'
    record = workdir_lib.check_record(dict(record), where)
    if record['epoch'] != run.epoch:
        return
    run.records.append(record)
    run.writer.write(record, log=False)
    run.changed = True
    logger.warning(
        '%sthe record of epoch %d was missing from metrics.jsonl: rebuilt from its checkpoint',
        run.prefix,
        run.epoch,
    )


def diverge(run: Run, message: str) -> None:
    """Stops a run as ``diverged`` with ``message``."""
    run.status, run.error = 'diverged', message
    logger.error('%s%s: this run stops; its last good checkpoint is kept', run.prefix, message)


def save(
    run: Run,
    state: train.TrainState,
    finite: bool,
    epoch_done: int,
    position: int,
    metrics: train.TrainMetrics | None,
    seconds: float,
    record: dict[str, Any] | None = None,
) -> None:
    """Checkpoints a run, unless its parameters stopped being finite (then it diverges).

    At an epoch's end ``record`` is its epoch record, kept in the checkpoint.
    """
    if not finite:
        diverge(run, 'non-finite parameters or batch statistics')
        return
    meta = {
        'epoch': epoch_done,
        'position': position,
        'partial_seconds': seconds,
        'wall_seconds': float(run.meta.get('wall_seconds', 0.0)) + time.time() - run.started,
        'layout': layout(),
    }
    if record is not None:
        meta['record'] = workdir_lib.json_safe(record)
    checkpoints.save(run.manager, state, meta, metrics)


def check_finite(runs: list[Run], total: train.TrainMetrics, epoch: int, done: int) -> None:
    """Marks runs whose loss or gradients stopped being finite (one host sync)."""
    for run, ok in zip(runs, np.asarray(train.metrics_finite(total)), strict=True):
        if run.active and not ok:
            diverge(run, f'non-finite loss or gradients in epoch {epoch} (by step {done})')


# A run's final numbers in TensorBoard's HParams tab: the last epoch's value of every
# metric a study may select on, the best accuracies and the epochs trained.
HPARAM_METRICS = (
    'train_loss',
    'train_accuracy',
    'test_loss',
    'test_accuracy',
    'best_test_accuracy',
    'val_loss',
    'val_accuracy',
    'best_val_accuracy',
    'epochs_completed',
)


def operational(key: str) -> bool:
    """Whether config field ``key`` (dotted) says only how a run is carried out, not
    what it computes: a field a resumed run may change
    (:data:`~resnet_jax.rundir.workdir.RESUMABLE_CHANGES`, where ``section.*``
    covers a section), except ``num_epochs``, which sets how long it trains."""
    return key != 'num_epochs' and any(
        key == field or (field.endswith('.*') and key.startswith(field[:-1]))
        for field in workdir_lib.RESUMABLE_CHANGES
    )


def hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config's scalar fields, dotted (``data.train_subset``), for TensorBoard;
    :func:`operational` ones are left out."""
    flat = workdir_lib.flatten(workdir_lib.config_json(config))
    return {
        k: v
        for k, v in flat.items()
        if isinstance(v, (bool, int, float, str)) and not operational(k)
    }


def final_metrics(records: list[dict[str, Any]]) -> dict[str, float]:
    """A run's :data:`HPARAM_METRICS` for TensorBoard's HParams tab, as ``hparam/NAME``;
    those it lacks (no validation split, no finite value) are left out."""
    numbers = writers.summarize(records)
    return {
        f'hparam/{k}': float(numbers[k])
        for k in HPARAM_METRICS
        if validation.is_finite_number(numbers.get(k))
    }


def end_recorded(run: Run) -> bool:
    """Whether the run's ``summary.json`` records this end already: the same status
    after the same epochs (a rerun of a run that ended before)."""
    try:
        old = workdir_lib.read_summary(os.path.join(run.workdir, workdir_lib.SUMMARY_FILE))
    except workdir_lib.RecordError:
        return False
    done = run.records[-1]['epoch'] if run.records else 0
    return old is not None and (old.get('status'), old.get('epochs_completed')) == (
        run.status,
        done,
    )


def write_hparams(run: Run) -> None:
    """Writes an ended run's HParams (hyperparameters, status, final metrics) once:
    not while it trains, nor again when a rerun finds the same end."""
    if run.active or end_recorded(run):
        return
    check_owned(run)
    run.writer.write_hparams(hparams(run.config), final_metrics(run.records), run.status)


def finish(
    run: Run,
    num_params: int,
    flops: float,
    data: datasets.Dataset,
    mesh: Mesh,
) -> dict[str, Any]:
    """Writes a run's ``summary.json`` and returns it.

    A run this invocation did not change (a rerun of a finished run) keeps its
    summary as it is; that summary is returned.
    """
    path = os.path.join(run.workdir, workdir_lib.SUMMARY_FILE)
    if not run.changed and run.status == 'completed':
        old = workdir_lib.read_summary(path)
        done = writers.summarize(run.records)['epochs_completed']
        same = old is not None and old.get('epochs_completed') == done
        if same and old.get('status') == 'completed':
            logger.info('%s%s is complete and was left as it is', run.prefix, run.workdir)
            return old
    summary = {
        'config': workdir_lib.config_json(run.config),
        'num_params': num_params,
        'flops_per_image': flops,
        **writers.summarize(run.records),
        'wall_seconds': float(run.meta.get('wall_seconds', 0.0)) + time.time() - run.started,
        'data': {
            'source': data.source,
            'path': data.path,
            'num_train': int(len(data.train_labels)),
            'num_test': int(len(data.test_labels)),
        },
        'devices': [str(d) for d in mesh.devices.flat],
        'versions': versions(),
        'layout': layout(),
        'status': run.status,
    }
    if run.lanes > 1:
        summary['vectorized_lanes'] = run.lanes
    if run.error:
        summary['error'] = run.error
    if run.pruned_epoch is not None:
        summary['pruned_at_epoch'] = run.pruned_epoch
    if distributed.is_primary():
        check_owned(run)
        workdir_lib.write_json(path, summary)
    if run.records and validation.is_finite_number(summary['test_accuracy']):
        logger.info(
            '%s%s: final test accuracy %.2f%%, best %.2f%% (epoch %s), %.0fs',
            run.prefix,
            run.status,
            100 * summary['test_accuracy'],
            100 * summary['best_test_accuracy'],
            summary['best_epoch'],
            summary['wall_seconds'],
        )
    elif run.records:
        logger.info('%s%s, %.0fs', run.prefix, run.status, summary['wall_seconds'])
    return summary


# The packages whose versions a run's summary records.
VERSIONED_PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint')


def versions() -> dict[str, str | None]:
    """``{package: version}`` of :data:`VERSIONED_PACKAGES` (None where not installed)."""
    found = {}
    for name in VERSIONED_PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def layout() -> dict[str, Any]:
    """What a run's float results depend on beyond its config: the devices, the CPU
    cores this process may use (XLA's CPU thread pools size themselves by them) and
    ``XLA_FLAGS``."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    return {
        'device_kind': jax.devices()[0].device_kind,
        'device_count': jax.device_count(),
        'cpu_cores': cores,
        'xla_flags': os.environ.get('XLA_FLAGS', ''),
    }


def warn_on_another_layout(run: Run) -> None:
    """Warns when ``run`` resumes under another :func:`layout` than its checkpoint's
    (checkpoints written before the layout was recorded say nothing)."""
    saved, now = run.meta.get('layout'), layout()
    if not isinstance(saved, dict) or saved == now:
        return
    changed = ', '.join(
        f'{k}: {saved.get(k)!r} -> {v!r}' for k, v in now.items() if saved.get(k) != v
    )
    logger.warning(
        '%sresuming under another layout (%s): the result will not be bit-identical to a '
        'run trained in one layout',
        run.prefix,
        changed,
    )
