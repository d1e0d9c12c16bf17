"""Around the compiled calls of an epoch: resume point, progress, checks, records, checkpoints.

:func:`resnet_jax.training.loop.train_runs` trains each epoch of a group of runs as

    first, partial, seconds = epochs.resume_point(runs, epoch)
    states, total, done = steps.train_epoch(
        states, data.images, data.labels, epochs.orders(runs, data, epoch), plan.sizes, ...,
        after_call=epochs.between_calls(runs, epoch, plan, stop))
    epochs.finish_epoch(runs, states, total, data, epoch, done, seconds, plan, stop)

and ends the group with :func:`end_group`. What the runs share comes in three
pieces: :class:`DeviceData` (the data on the device), :class:`BatchPlan` (how it
is batched and placed) and the stop flag (:class:`resnet_jax.training.signals.StopSignals`).
"""

# No `from __future__ import annotations`: clu reads Metrics annotations at run time.
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from typing import Any, NoReturn

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from resnet_jax.datasets import augment
from resnet_jax.training import runs as runs_lib
from resnet_jax.training import signals, steps, train

logger = logging.getLogger('resnet_jax')


@dataclasses.dataclass(frozen=True)
class DeviceData:
    """A group's data on the device, read by every run."""

    images: jax.Array  # The distinct training sets, concatenated: (sets x N, H, W, C) uint8.
    labels: jax.Array  # (sets x N,)
    num_train: int  # N: a run on training set d reads images[d * N + order].
    test: tuple[jax.Array, jax.Array, jax.Array]  # Padded: (images, labels, mask).
    validation: tuple[jax.Array, jax.Array, jax.Array] | None  # Held-out training images.


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """How a group's data is batched and where its batches and states live."""

    sizes: list[int]  # The training batch sizes of an epoch.
    eval_batch_size: int
    prep: augment.Preprocess
    sharding: NamedSharding  # Batches: split over the ``data`` mesh axis.
    replicated: NamedSharding  # States and data: on every device.


class Progress:
    """Logs steps/s and the epoch's ETA at most every ``every_seconds``."""

    def __init__(
        self,
        epoch: int,
        total_steps: int,
        every_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._epoch, self._total, self._every = epoch, total_steps, every_seconds
        self._clock = clock
        self._start = self._last = clock()
        self._first = 0  # Steps done when the clock (re)started.

    def restart(self, step: int) -> float:
        """Starts the rate (and so the ETA) again after ``step`` steps, leaving out
        what came before (the first call's compilation); returns the seconds since
        the start."""
        now = self._clock()
        took, self._start, self._last, self._first = now - self._start, now, now, step
        return took

    def maybe_report(self, step: int, sync: Any) -> str | None:
        """``step`` steps are dispatched; ``sync`` is blocked on before timing."""
        if self._clock() - self._last < self._every or step >= self._total:
            return None
        jax.block_until_ready(sync)
        now = self._clock()
        self._last = now
        rate = (step - self._first) / max(now - self._start, 1e-9)
        eta = (self._total - step) / max(rate, 1e-9)
        message = (
            f'epoch {self._epoch}: step {step}/{self._total}, {rate:.2f} steps/s, ETA {eta:.0f}s'
        )
        logger.info(message)
        return message


def resume_point(
    runs: list[runs_lib.Run], epoch: int
) -> tuple[int, train.TrainMetrics | None, float]:
    """Where ``epoch`` starts for runs resumed at the same point: the first batch,
    the metrics of the batches before it and their seconds (0, None, 0.0 at its start)."""
    run = runs[0]
    if epoch != run.epoch + 1 or not run.position:
        return 0, None, 0.0
    partial = train.stack([r.partial for r in runs])
    return run.position, partial, float(run.meta.get('partial_seconds', 0.0))


def orders(runs: list[runs_lib.Run], data: DeviceData, epoch: int) -> jax.Array:
    """Each run's order of the epoch, as indices into the group's training sets."""
    return jnp.stack(
        [
            augment.epoch_order(run.order_rng, epoch, data.num_train, run.config.shuffle)
            + run.dataset * data.num_train
            for run in runs
        ]
    )


def between_calls(
    runs: list[runs_lib.Run], epoch: int, plan: BatchPlan, stop: signals.StopSignals
) -> Callable[[int, int, train.TrainMetrics], bool]:
    """The ``after_call`` of :func:`resnet_jax.training.steps.train_epoch`.

    It reports progress, checks every ``check_finite_every_steps`` steps that
    the runs are finite, and stops once none is active or on a signal.
    """
    config = runs[0].config
    every = config.check_finite_every_steps
    progress = Progress(epoch, len(plan.sizes), config.progress_every_seconds)

    def after_call(i: int, done: int, total: train.TrainMetrics) -> bool:
        if runs[0].first_call is None:  # Compiled in this call: timed apart.
            jax.block_until_ready(total)
            took = progress.restart(done)
            for run in runs:
                run.first_call = (epoch, took, sum(plan.sizes[i:done]))
        progress.maybe_report(done, total)
        if every and done // every != i // every:
            runs_lib.check_finite(runs, total, epoch, done)
            if not runs_lib.any_active(runs):
                return True
        return stop.agreed() is not None

    return after_call


def tests_due(config: Any, epoch: int) -> bool:
    """Whether the test set is evaluated after ``epoch`` (``config.eval_test``; 'auto'
    has been resolved for a study's trials, so here it is every epoch)."""
    return config.get('eval_test', 'auto') != 'end' or epoch == config.num_epochs


class Evaluation:
    """An epoch's evaluations of every run of a group: validation (None without a
    split) and test, computed when first asked for (:func:`tests_due`, or a run
    its study stops now)."""

    def __init__(self, states: train.TrainState, data: DeviceData, plan: BatchPlan, due: bool):
        self._states, self._data, self._plan = states, data, plan
        self._tests: list[dict[str, float]] | None = None
        self.due = due
        self.val = self._run(data.validation) if data.validation is not None else None
        if due:
            self.tests()

    def _run(self, split: tuple[jax.Array, jax.Array, jax.Array]) -> list[dict[str, float]]:
        plan = self._plan
        return steps.evaluate(self._states, split, plan.eval_batch_size, plan.prep, plan.sharding)

    def tests(self) -> list[dict[str, float]]:
        """Every run's test metrics (evaluated once)."""
        if self._tests is None:
            self._tests = self._run(self._data.test)
        return self._tests


def evaluate(
    states: train.TrainState, data: DeviceData, plan: BatchPlan, epoch: int, config: Any
) -> Evaluation:
    """Every run's validation metrics, and its test metrics where due after ``epoch``."""
    return Evaluation(states, data, plan, tests_due(config, epoch))


def finish_epoch(
    runs: list[runs_lib.Run],
    states: train.TrainState,
    total: train.TrainMetrics,
    data: DeviceData,
    epoch: int,
    done: int,
    seconds: float,
    plan: BatchPlan,
    stop: signals.StopSignals,
) -> None:
    """Evaluates the trained epoch and ends it (:func:`end_epoch`), or checkpoints
    mid-epoch (:func:`interrupt`) after a signal, which may also come now."""
    evaluation = (
        evaluate(states, data, plan, epoch, runs[0].config) if stop.agreed() is None else None
    )
    if evaluation is None or stop.agreed() is not None:
        interrupt(runs, states, total, epoch, done, seconds, plan, stop)
    end_epoch(runs, states, total, evaluation, epoch, seconds, plan)


def interrupt(
    runs: list[runs_lib.Run],
    states: train.TrainState,
    total: train.TrainMetrics,
    epoch: int,
    done: int,
    seconds: float,
    plan: BatchPlan,
    stop: signals.StopSignals,
) -> NoReturn:
    """Checkpoints every active run mid-epoch after a signal, then raises
    :class:`resnet_jax.training.signals.Interrupted`."""
    finite = np.asarray(train.runs_finite((states.params, states.batch_stats)))
    for r, run in enumerate(runs):
        if run.active:
            runs_lib.check_owned(run)
            run.changed = True
            state, metrics = train.unstack(states, r), train.unstack(total, r)
            runs_lib.save(run, state, finite[r], epoch - 1, done, metrics, seconds)
    where = (
        'checkpoints saved in each run'
        if runs[0].lanes > 1
        else f'checkpoint saved in {runs[0].manager.directory}'
    )
    raise signals.Interrupted(
        stop.signum,
        f'stopped in epoch {epoch} after {done}/{len(plan.sizes)} steps; {where}; rerun the '
        'same command to resume',
    )


def end_epoch(
    runs: list[runs_lib.Run],
    states: train.TrainState,
    total: train.TrainMetrics,
    evaluation: Evaluation,
    epoch: int,
    seconds: float,
    plan: BatchPlan,
) -> None:
    """Writes each active run's epoch record; checkpoints where due, or where pruned.

    A run whose evaluated loss (test, else validation) is not finite diverges instead.
    """
    config = runs[0].config
    save = epoch % config.checkpoint_every_epochs == 0 or epoch == config.num_epochs
    callbacks = any(run.on_epoch is not None for run in runs)
    rates = np.asarray(train.applied_learning_rate(states))  # Of each run's last update.
    finite = (
        np.asarray(train.runs_finite((states.params, states.batch_stats)))
        if save or callbacks
        else None
    )
    for r, run in enumerate(runs):
        tests = evaluation.tests()[r] if evaluation.due else None
        vals = evaluation.val[r] if evaluation.val is not None else None
        _check_evaluated(run, tests, vals, epoch)
        if not run.active:
            continue
        record = train.EpochRecord(
            epoch=epoch,
            **_metrics('train', train.unstack(total, r).compute()),
            **(_metrics('test', tests) if tests is not None else _NO_TEST),
            learning_rate=float(rates[r]),
            epoch_seconds=seconds,
            **_speed(run.first_call, epoch, sum(plan.sizes), seconds),
            **(_metrics('val', vals) if vals is not None else {}),
        ).asdict()
        ok = bool(finite[r]) if finite is not None else True  # Computed where it is read.
        later = None if tests is not None else (lambda r=r: evaluation.tests()[r])
        _write_epoch(run, record, lambda r=r: train.unstack(states, r), ok, save, later)


_NO_TEST = {'test_loss': None, 'test_accuracy': None}  # Left out of the record.


def _check_evaluated(
    run: runs_lib.Run, tests: dict[str, Any] | None, vals: dict[str, Any] | None, epoch: int
) -> None:
    """Diverges an active run whose evaluated loss is not finite."""
    split, scores = ('test', tests) if tests is not None else ('validation', vals)
    if run.active and scores is not None and not math.isfinite(scores['loss']):
        runs_lib.diverge(run, f'non-finite {split} loss in epoch {epoch}')


def _speed(
    first_call: tuple[int, float, int] | None, epoch: int, images: int, seconds: float
) -> dict[str, float]:
    """The epoch's ``images_per_second`` and, in the epoch of the first compiled call,
    ``compile_seconds``: that call's seconds and images are left out of the rate
    (unless it was the whole epoch)."""
    if first_call is None or first_call[0] != epoch:
        return {'images_per_second': images / seconds}
    _, compiled, compiled_images = first_call
    rest = seconds - compiled
    if images > compiled_images and rest > 0:
        return {'images_per_second': (images - compiled_images) / rest, 'compile_seconds': compiled}
    return {'images_per_second': images / seconds, 'compile_seconds': compiled}


def _write_epoch(
    run: runs_lib.Run,
    record: dict[str, Any],
    state: Callable[[], train.TrainState],
    finite: bool,
    save: bool,
    test: Callable[[], dict[str, Any]] | None = None,
) -> None:
    """Writes a run's epoch record and its checkpoint (if ``save``), and asks its callback.

    The record and the checkpoint come first: a callback that fails (a study
    whose storage is away) leaves the epoch written and checkpointed. A pruned
    run gets a checkpoint of its epoch. ``test`` (the test set is evaluated only
    at the end): the run's test metrics, asked for when the callback stops the
    run now, so that its last record holds them; the callback is then asked first.
    """
    if test is not None and run.on_epoch is not None:
        _write_epoch_ending_early(run, record, state, finite, save, test)
        return
    epoch = record['epoch']
    _append(run, record)
    if save:
        runs_lib.save(run, state(), finite, epoch, 0, None, 0.0, record)
    if not run.active:  # Diverged while saving.
        return
    try:
        pruned = runs_lib.pruned(run, record)
    except Exception:
        if not save:
            runs_lib.save(run, state(), finite, epoch, 0, None, 0.0, record)
        raise
    if pruned and not save:
        runs_lib.save(run, state(), finite, epoch, 0, None, 0.0, record)
    if pruned:
        logger.info('%spruned after epoch %d', run.prefix, epoch)


def _write_epoch_ending_early(
    run: runs_lib.Run,
    record: dict[str, Any],
    state: Callable[[], train.TrainState],
    finite: bool,
    save: bool,
    test: Callable[[], dict[str, Any]],
) -> None:
    """:func:`_write_epoch` for a run whose callback may stop it before its test
    set is due: the callback first, then the record (with the test metrics if it
    stopped the run) and the checkpoint. A callback that fails leaves the epoch
    written and checkpointed."""
    epoch = record['epoch']
    runs_lib.check_owned(run)
    try:
        pruned = runs_lib.pruned(run, record)
    except Exception:
        _append(run, record)
        runs_lib.save(run, state(), finite, epoch, 0, None, 0.0, record)
        raise
    if pruned:
        record.update(_metrics('test', test()))
    _append(run, record)
    if save or pruned:
        runs_lib.save(run, state(), finite, epoch, 0, None, 0.0, record)
    if pruned:
        logger.info('%spruned after epoch %d', run.prefix, epoch)


def _append(run: runs_lib.Run, record: dict[str, Any]) -> None:
    """Appends ``record`` to the run's records, ``metrics.jsonl`` and TensorBoard."""
    runs_lib.check_owned(run)
    run.records.append(record)
    run.changed = True
    run.writer.write(record)


def _metrics(prefix: str, metrics: dict[str, Any]) -> dict[str, float]:
    """``{prefix_loss, prefix_accuracy}`` of a run's computed metrics, as floats."""
    return {f'{prefix}_{k}': float(metrics[k]) for k in ('loss', 'accuracy')}


def end_group(runs: list[runs_lib.Run], states: train.TrainState) -> None:
    """Hands each run its final state and status; a run that ended gets its HParams."""
    num_epochs = runs[0].config.num_epochs
    for r, run in enumerate(runs):
        run.state = train.unstack(states, r)
        if not run.active:
            run.changed = True
        if run.active and run.records and run.records[-1]['epoch'] == num_epochs:
            run.status = 'completed'
        runs_lib.write_hparams(run)
