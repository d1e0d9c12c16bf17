"""Training a worker's claimed trials: each an ordinary run in its own folder.

A claimed trial samples its point (:func:`prepare`), trains it into
``workdir/<folder name>`` with the study's metric reported after every epoch
(so that the pruner can stop it), and ends with its run's outcome told to the
study (:func:`train_trials`). A folder that already finished the point is not
trained again; a group of trials that train together (``vectorize``) is one
program. An interrupted worker gives its trials back to the queue.
Its parts for one trial (:func:`prepare`, :func:`epoch_reporter`,
:func:`replay_finished`, :func:`record_outcome`) also make a run the objective of
an Optuna loop of one's own (:mod:`~resnet_jax.studies.objective`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections

from resnet_jax import datasets, validation
from resnet_jax.rundir import locks
from resnet_jax.rundir import workdir as workdir_lib
from resnet_jax.studies import optuna_study, run_folders, search_space
from resnet_jax.studies import sweep as sweep_lib

logger = logging.getLogger('resnet_jax')

LOST = 'lost'  # A run this worker stopped because another worker now trains its trial.


@dataclasses.dataclass
class TrialRun:
    """A claimed trial and the run that trains it."""

    trial: Any
    overrides: dict[str, Any]
    name: str
    run_dir: str
    config: ml_collections.ConfigDict | None = None
    status: str = 'failed'
    error: str | None = None


def prepare(trial: Any, spec: search_space.Spec, workdir: str) -> TrialRun:
    """The run of a claimed trial: its point sampled, its folder claimed (or the error)."""
    overrides = search_space.sample(trial, spec.params, spec.base)
    name = sweep_lib.run_name(overrides)
    run = TrialRun(trial, overrides, name, os.path.join(workdir, name))
    trial.set_user_attr('run', name)
    try:
        run.config = run_folders.apply_overrides(spec.base, overrides)
        run_folders.check_overrides(run.run_dir, overrides)
    except validation.ConfigError as e:
        run.error = f'{name}: {e}'
    return run


def epoch_reporter(
    trial: Any, metric: str, num_epochs: int, call: Callable[..., Any] | None = None
) -> Callable[[dict[str, Any]], bool]:
    """An ``on_epoch`` callback that reports each epoch's ``metric`` to ``trial``.

    Returns True when the pruner stops the run; never at epoch ``num_epochs``
    (a run trained to the end is completed, whatever the pruner says). ``call``
    makes the calls into the study (``call(trial.report, value, epoch)``): a
    :class:`optuna_study.Retry`, or None to call directly.
    """

    def direct(f: Callable[..., Any], *args: Any) -> Any:
        return f(*args)

    call = call or direct

    def on_epoch(record: dict[str, Any]) -> bool:
        value = record.get(metric)
        if not validation.is_finite_number(value):
            return False
        call(trial.report, float(value), int(record['epoch']))
        if int(record['epoch']) >= num_epochs:
            return False
        return bool(call(trial.should_prune))

    return on_epoch


def _epoch_callback(
    run: TrialRun, spec: search_space.Spec, retry: optuna_study.Retry
) -> Callable[[dict[str, Any]], bool]:
    """Reports an epoch's metric to the trial; True when the pruner stops the run.

    A trial another worker has meanwhile failed and retried raises
    :class:`locks.OwnershipLost`; a storage that stays away raises
    :class:`optuna_study.StorageUnavailable` (the epoch is checkpointed first).
    """
    import optuna  # pylint: disable=g-import-not-at-top

    report = epoch_reporter(run.trial, spec.metric, run.config.num_epochs, retry)

    def on_epoch(record: dict[str, Any]) -> bool:
        try:
            return report(record)
        except optuna.exceptions.UpdateFinishedTrialError:
            raise locks.OwnershipLost(_lost(run)) from None

    return on_epoch


def _lost(run: TrialRun) -> str:
    return (
        f'trial {run.trial.number} was failed in the study while this worker was away (its '
        'heartbeat went stale) and is retried by another worker'
    )


def _fence(run: TrialRun, study: Any) -> Callable[[], None]:
    """Raises :class:`locks.OwnershipLost` once the study no longer runs ``run``'s trial.

    Asked before each write into the run's folder. When the storage does not
    answer, the folder's lock (checked by the training loop) decides.
    """

    def check() -> None:
        if optuna_study.still_running(study, run.trial) is False:
            raise locks.OwnershipLost(_lost(run))

    return check


def _take_over_abandoned(study: Any, group: Sequence[TrialRun]) -> bool:
    """Takes over the group's folder locks held for trials the study has failed.

    Their holders (a paused worker, say) lost their trials when their heartbeats
    went stale; they find out before they write again. Returns whether any was taken.
    """
    took = False
    for run in group:
        owner = locks.holder(run.run_dir)
        if owner is None or optuna_study.folder_in_use(study, run.name, [r.trial for r in group]):
            continue
        with contextlib.suppress(locks.WorkdirBusy):
            if locks.take_over(run.run_dir, owner):
                logger.info(
                    'trial %d %s: its folder was locked by %r for a trial the study has failed '
                    '(a stale heartbeat): taken over',
                    run.trial.number,
                    run.name,
                    owner,
                )
                took = True
    return took


def _tell(
    study: Any,
    run: TrialRun,
    summary: Mapping[str, Any] | None,
    spec: search_space.Spec,
    retry: optuna_study.Retry,
) -> None:
    """Ends a trial with its run's outcome (the storage retried while it does not answer)."""
    import optuna  # pylint: disable=g-import-not-at-top

    try:
        retry(_tell_outcome, study, run, summary, spec)
    except optuna.exceptions.UpdateFinishedTrialError:
        logger.warning('trial %d %s: not told: %s', run.trial.number, run.name, _lost(run))


def record_outcome(
    trial: Any, summary: Mapping[str, Any] | None, error: str | None = None
) -> tuple[str, str | None]:
    """Records a run's outcome on its trial's user attributes: its status and error.

    ``run_status``, the summary's epochs and accuracies, and ``error`` (``error``,
    else the summary's). Returns the status (``'failed'`` without a summary) and the error.
    """
    status = summary.get('status', 'failed') if summary else 'failed'
    trial.set_user_attr('run_status', status)
    if summary:
        for key in ('epochs_completed', 'pruned_at_epoch', 'test_accuracy', 'val_accuracy'):
            if summary.get(key) is not None:
                trial.set_user_attr(key, summary[key])
    error = error or (summary or {}).get('error')
    if error:
        trial.set_user_attr('error', str(error)[:500])
    return status, str(error) if error else None


def _tell_outcome(
    study: Any, run: TrialRun, summary: Mapping[str, Any] | None, spec: search_space.Spec
) -> None:
    from optuna.trial import TrialState  # pylint: disable=g-import-not-at-top

    trial = run.trial
    run.status = (summary or {}).get('status', 'failed')  # Even if the study is not told.
    status, run.error = record_outcome(trial, summary, run.error)
    value = (summary or {}).get(spec.metric)
    if status == 'completed' and validation.is_finite_number(value):
        study.tell(trial, float(value))
    elif status == 'pruned':
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, state=TrialState.FAIL)
    logger.info(
        'trial %d %s: %s%s',
        trial.number,
        run.name,
        status,
        f' ({spec.metric} {value:.4f})' if validation.is_finite_number(value) else '',
    )


def replay_finished(
    run: TrialRun, on_epoch: Callable[[dict[str, Any]], bool]
) -> dict[str, Any] | None:
    """The summary of ``run``'s folder if it already finished the point, else None.

    A finished run is not trained again: ``on_epoch`` sees its recorded epochs
    (so that the pruner sees its history).
    """
    done = run_folders.finished_summary(run.run_dir, run.config)
    if done is not None:
        logger.info(
            'trial %d %s: already %s, not trained again', run.trial.number, run.name, done['status']
        )
        for record in workdir_lib.read_metrics(run.run_dir):
            on_epoch(record)
    return done


def failure_message(error: Exception) -> str:
    """A failed run's error as recorded: bad input as its message, else with its type."""
    if isinstance(error, (validation.ConfigError, datasets.DataError)):
        return str(error)
    return f'{type(error).__name__}: {error}'


def train_trials(
    study: Any, runs: list[TrialRun], spec: search_space.Spec, retry: optuna_study.Retry
) -> None:
    """Trains claimed trials (together if more than one) and tells the study their outcome.

    A storage that stays away raises :class:`optuna_study.StorageUnavailable`
    once the runs are checkpointed; their folders keep their status.
    """
    summaries: list[dict[str, Any] | None] = [None] * len(runs)
    todo = []
    for i, run in enumerate(runs):
        if run.error:
            logger.error('trial %d: %s', run.trial.number, run.error)
            run_folders.record_failure(run.run_dir, run.config, run.error)
            summaries[i] = {'status': 'failed', 'error': run.error}
        elif (done := replay_finished(run, _epoch_callback(run, spec, retry))) is not None:
            summaries[i] = done
        else:
            todo.append(i)
    if todo:
        results = _train([runs[i] for i in todo], study, spec, retry)
        for i, result in zip(todo, results, strict=True):
            summaries[i] = result
    for run, summary in zip(runs, summaries, strict=True):
        if summary and summary.get('status') == LOST:
            run.status = LOST  # Another worker trains it now: nothing to tell.
        else:
            _tell(study, run, summary, spec, retry)


def _train(
    group: Sequence[TrialRun], study: Any, spec: search_space.Spec, retry: optuna_study.Retry
) -> list[dict[str, Any]]:
    """Trains ``group`` as one program; the runs' summaries (a failure recorded as one).

    A run folder another process is training (the same point drawn twice) is
    waited for: its result then counts for this trial too; one locked for a
    trial the study has failed is taken over at once. A group this worker lost
    (:class:`locks.OwnershipLost`) stops without writing anything more: its
    summaries say :data:`LOST`.
    """
    from resnet_jax.training import loop  # pylint: disable=g-import-not-at-top  # Heavy.

    for run in group:
        logger.info('trial %d %s: training', run.trial.number, run.name)
    while True:
        try:
            _, results = loop.train_runs(
                [r.config for r in group],
                [r.run_dir for r in group],
                on_epoch=[_epoch_callback(r, spec, retry) for r in group],
                fence=[_fence(r, study) for r in group],
            )
            return results
        except optuna_study.StorageUnavailable:  # Not the run's fault: it keeps its status.
            optuna_study.give_back(study, [r.trial for r in group])  # If the storage is back.
            raise
        except locks.OwnershipLost as e:
            logger.warning('%s: this worker stops it and goes on: %s', group[0].name, e)
            optuna_study.give_back(study, [r.trial for r in group])
            return [{'status': LOST} for _ in group]
        except locks.WorkdirBusy as e:
            if not _take_over_abandoned(study, group):
                logger.info('%s; waiting for it', e)
                time.sleep(spec.poll_seconds)
        except Exception as e:  # pylint: disable=broad-except  # Record it and go on.
            message = failure_message(e)
            if isinstance(e, (validation.ConfigError, datasets.DataError)):
                logger.error('trial %s failed: %s', group[0].name, message)
            else:
                logger.exception('trial %s failed: %s', group[0].name, message)
            for r in group:
                run_folders.record_failure(r.run_dir, r.config, message)
            return [{'status': 'failed', 'error': message} for _ in group]
        except BaseException:  # Interrupted: checkpoints are saved; the trials wait for a worker.
            optuna_study.give_back(study, [r.trial for r in group])
            raise
