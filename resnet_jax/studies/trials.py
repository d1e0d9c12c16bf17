"""Training a worker's claimed trials: each an ordinary run in its own folder.

A claimed trial samples its point (:func:`prepare`), trains it into
``workdir/<folder name>`` with the study's metric reported after every epoch
(so that the pruner can stop it), and ends with its run's outcome told to the
study (:func:`train_trials`). A folder that already finished the point is not
trained again; a group of trials that train together (``vectorize``) is one
program. An interrupted worker gives its trials back to the queue.
"""

from __future__ import annotations

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

logger = logging.getLogger('resnet_jax')


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
    name = search_space.folder_name(overrides)
    run = TrialRun(trial, overrides, name, os.path.join(workdir, name))
    trial.set_user_attr('run', name)
    try:
        run.config = search_space.apply_overrides(spec.base, overrides)
        run_folders.check_overrides(run.run_dir, overrides)
    except validation.ConfigError as e:
        run.error = f'{name}: {e}'
    return run


def _epoch_callback(run: TrialRun, spec: search_space.Spec) -> Callable[[dict[str, Any]], bool]:
    """Reports an epoch's metric to the trial; True when the pruner stops the run."""

    def on_epoch(record: dict[str, Any]) -> bool:
        value = record.get(spec.metric)
        if not validation.is_finite_number(value):
            return False
        run.trial.report(float(value), int(record['epoch']))
        if int(record['epoch']) >= run.config.num_epochs:
            return False  # Trained to the end: completed, whatever the pruner says.
        return run.trial.should_prune()

    return on_epoch


def _tell(
    study: Any, run: TrialRun, summary: Mapping[str, Any] | None, spec: search_space.Spec
) -> None:
    """Ends a trial with its run's outcome."""
    from optuna.trial import TrialState  # pylint: disable=g-import-not-at-top

    status = summary.get('status', 'failed') if summary else 'failed'
    run.status = status
    trial = run.trial
    trial.set_user_attr('run_status', status)
    if summary:
        for key in ('epochs_completed', 'pruned_at_epoch', 'test_accuracy', 'val_accuracy'):
            if summary.get(key) is not None:
                trial.set_user_attr(key, summary[key])
    error = run.error or (summary or {}).get('error')
    run.error = str(error) if error else None
    if error:
        trial.set_user_attr('error', str(error)[:500])
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


def train_trials(study: Any, runs: list[TrialRun], spec: search_space.Spec) -> None:
    """Trains claimed trials (together if more than one) and tells the study their outcome."""
    summaries: list[dict[str, Any] | None] = [None] * len(runs)
    todo = []
    for i, run in enumerate(runs):
        if run.error:
            logger.error('trial %d: %s', run.trial.number, run.error)
            run_folders.record_failure(run.run_dir, run.config, run.error)
            summaries[i] = {'status': 'failed', 'error': run.error}
        elif (done := run_folders.finished_summary(run.run_dir, run.config)) is not None:
            logger.info(
                'trial %d %s: already %s, not trained again',
                run.trial.number,
                run.name,
                done['status'],
            )
            report_epoch = _epoch_callback(run, spec)  # The pruner sees its history.
            for record in workdir_lib.read_metrics(run.run_dir):
                report_epoch(record)
            summaries[i] = done
        else:
            todo.append(i)
    if todo:
        results = _train([runs[i] for i in todo], study, spec)
        for i, result in zip(todo, results, strict=True):
            summaries[i] = result
    for run, summary in zip(runs, summaries, strict=True):
        _tell(study, run, summary, spec)


def _train(group: Sequence[TrialRun], study: Any, spec: search_space.Spec) -> list[dict[str, Any]]:
    """Trains ``group`` as one program; the runs' summaries (a failure recorded as one).

    A run folder another process is training (the same point drawn twice) is
    waited for: its result then counts for this trial too.
    """
    from resnet_jax.training import loop  # pylint: disable=g-import-not-at-top  # Heavy.

    for run in group:
        logger.info('trial %d %s: training', run.trial.number, run.name)
    while True:
        try:
            _, results = loop.train_runs(
                [r.config for r in group],
                [r.run_dir for r in group],
                on_epoch=[_epoch_callback(r, spec) for r in group],
            )
            return results
        except locks.WorkdirBusy as e:
            logger.info('%s; waiting for it', e)
            time.sleep(spec.poll_seconds)
        except Exception as e:  # pylint: disable=broad-except  # Record it and go on.
            bad_input = isinstance(e, (validation.ConfigError, datasets.DataError))
            message = str(e) if bad_input else f'{type(e).__name__}: {e}'
            if bad_input:
                logger.error('trial %s failed: %s', group[0].name, message)
            else:
                logger.exception('trial %s failed: %s', group[0].name, message)
            for r in group:
                run_folders.record_failure(r.run_dir, r.config, message)
            return [{'status': 'failed', 'error': message} for _ in group]
        except BaseException:  # Interrupted: checkpoints are saved; the trials wait for a worker.
            optuna_study.give_back(study, [r.trial for r in group])
            raise
