"""Running a study (a grid or a search): Optuna trials that are ordinary runs.

A config with a ``search`` section is a search. Each trial samples the fields of
``config.search.space``, trains the resulting config into its own run folder
under the workdir (metrics, TensorBoard, checkpoints, summary: what a single run
writes) and reports ``config.search.metric`` after every epoch, so that a pruner
can stop it early::

    config.search = search_space.default_section()
    config.search.space.learning_rate = search_space.float_param(1e-4, 0.1, log=True)
    config.search.space.batch_size = search_space.categorical((100, 500, 1000))
    config.search.space.momentum = search_space.float_param(0.5, 0.99, when=('optimizer', 'sgd'))
    config.search.num_trials = 12
    config.search.sampler = 'tpe'                     # or 'random', 'qmc', 'grid' (studies.samplers)
    config.search.pruner = 'successive_halving'       # or 'none', 'median', 'hyperband'
    config.search.metric = 'val_accuracy'             # needs config.data.validation_size > 0

    statuses = search.run_study(config, 'runs/search')  # {run folder: status}

A grid (``sampler='grid'``, and every ``sweep`` section, see
:func:`search_space.spec_from_sweep`) enqueues each of its points exactly once;
with ``vectorize`` a worker takes the points that train together as one group.
Every worker started on the same workdir joins the same study
(:mod:`~resnet_jax.studies.optuna_study`: its storage, claiming, heartbeats) and
takes the next trials when it has finished its own
(:mod:`~resnet_jax.studies.trials`: training them); a trial whose worker died is
retried by a live worker or a later rerun, and its run folder resumes from its
last checkpoint. The command line then writes the study's reports
(:mod:`resnet_jax.reports.sweep_report` for a grid's ``sweep.json``,
:mod:`resnet_jax.reports.study_report` for every study).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time

import ml_collections

from resnet_jax.rundir import workdir as workdir_lib
from resnet_jax.studies import optuna_study, preflight, search_space
from resnet_jax.studies import sweep as sweep_lib
from resnet_jax.studies import trials as trials_lib

logger = logging.getLogger('resnet_jax')

# A worker stops when this many trials in a row failed with the same error:
# a failure every trial shares (a config that cannot train, a broken data
# path) is not paid for num_trials times.
SAME_FAILURES_TO_STOP = 3


class StudyStopped(Exception):
    """Trials in a row failed with the same error: the worker stopped (exit code 1)."""


def _failures_in_a_row(earlier: list[str], runs: list[trials_lib.TrialRun]) -> list[str]:
    """The same error messages in a row, ``earlier``'s followed by this claim's.

    A claim whose runs all failed with one message continues the row (or starts
    a new one); anything else ends it.
    """
    errors = {r.error or '' for r in runs}
    if any(r.status != 'failed' for r in runs) or len(errors) != 1:
        return []
    (error,) = errors
    return [*earlier, error] if earlier and earlier[-1] == error else [error]


def run_worker(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
    """Joins the study of ``config`` in ``workdir`` and trains trials until none is left.

    Waits while other workers' trials run (a trial whose worker dies is retried
    once its heartbeat is stale). Returns the status of
    each run this worker ended, by folder name.
    """
    import optuna  # pylint: disable=g-import-not-at-top

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = search_space.spec_from_config(config)
    study = optuna_study.open_study(spec, workdir)
    worker = f'{socket.gethostname()}:{os.getpid()}'
    logger.info(
        'study %r (%s sampler, %s pruner, %s %s) in %s; worker %s',
        study.study_name,
        spec.sampler,
        spec.pruner,
        spec.direction,
        spec.metric,
        search_space.redact(optuna_study.storage_url(spec.storage, workdir)),
        worker,
    )
    retry = optuna_study.Retry(
        optuna_study.storage_url(spec.storage, workdir), spec.storage_retry_seconds
    )
    statuses: dict[str, str] = {}
    failures: list[str] = []
    while True:
        with contextlib.suppress(Exception):  # Another worker may fail the same trial.
            optuna.storages.fail_stale_trials(study)
        with optuna_study.claim_lock(workdir):
            trials = retry(optuna_study.claim, study, spec)
        if not trials:
            if retry(optuna_study.others_running, study):
                time.sleep(spec.poll_seconds)
                continue
            break
        runs = [retry(trials_lib.prepare, trial, spec, workdir) for trial in trials]
        storage = study._storage  # pylint: disable=protected-access
        trial_ids = [t._trial_id for t in trials]  # pylint: disable=protected-access
        with optuna_study.heartbeat(storage, trial_ids, spec.heartbeat_seconds):
            trials_lib.train_trials(study, runs, spec, retry)
        statuses.update({r.name: r.status for r in runs if r.status != trials_lib.LOST})
        failures = _failures_in_a_row(failures, runs)
        if len(failures) >= SAME_FAILURES_TO_STOP:
            raise StudyStopped(
                f'{len(failures)} trials in a row failed with the same error, so this worker '
                f'stopped (fix it and rerun the command): {failures[-1]}'
            )
    return statuses


def ended_runs(spec: search_space.Spec, workdir: str) -> dict[str, str]:
    """The status of every run the study's trials ended, by folder (a retry's last)."""
    import optuna  # pylint: disable=g-import-not-at-top

    url = optuna_study.storage_url(spec.storage, workdir)
    study = optuna.load_study(
        study_name=optuna_study.study_name(spec, workdir),
        storage=optuna_study.open_storage(url, spec),
    )
    ended = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    return {
        optuna_study.trial_run(t): optuna_study.trial_status(t)
        for t in ended
        if optuna_study.trial_run(t) and optuna_study.trial_status(t)
    }


def run_study(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
    """Runs the study of ``config`` in ``workdir`` as one worker: ``{run folder: status}``.

    A ``sweep`` section is a grid study: its ``sweep.json`` is written and the
    status of every point is returned (``'pending'`` for one no worker has
    ended yet). A ``search`` section returns every run of the study that has
    ended (by this worker or earlier ones), so that a rerun reports the same. Start
    the same command several times (or ``--workers=N``) to share the study.
    A config that cannot fit the data raises before anything is created;
    :class:`StudyStopped` when trials keep failing with the same error.
    """
    spec = search_space.spec_from_config(config)
    preflight.check_data(spec)  # Before anything is created.
    if not sweep_lib.is_sweep(config):
        statuses = run_worker(config, workdir)
        return {**ended_runs(spec, workdir), **statuses}
    points = sweep_lib.expand(config)
    sweep_lib.write_manifest(config, workdir, points)
    logger.info('sweep of %d runs over %s', len(points), ', '.join(sweep_lib.axes(config)))
    statuses = run_worker(config, workdir)
    for point in points:  # Points other workers (or earlier invocations) ended.
        if point.name not in statuses:
            path = os.path.join(workdir, point.name, workdir_lib.SUMMARY_FILE)
            try:
                summary = workdir_lib.read_summary(path) or {}
            except workdir_lib.RecordError as e:
                logger.warning('%s', e)
                summary = {'status': 'unreadable'}
            statuses[point.name] = summary.get('status', 'pending')
    return {point.name: statuses[point.name] for point in points}
