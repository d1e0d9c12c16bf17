"""Hyperparameter searches: Optuna studies whose trials are ordinary runs.

A config with a ``search`` section is a study. Each trial samples the fields of
``config.search.space``, trains the resulting config into its own run folder
under the workdir (metrics, TensorBoard, checkpoints, summary: what a single run
writes) and reports ``config.search.metric`` after every epoch, so that a pruner
can stop it early::

    config.search = search_space.default_section()
    config.search.space.learning_rate = search_space.float_param(1e-4, 0.1, log=True)
    config.search.space.batch_size = search_space.categorical((100, 500, 1000))
    config.search.space.momentum = search_space.float_param(0.5, 0.99, when=('optimizer', 'sgd'))
    config.search.num_trials = 12
    config.search.sampler = 'tpe'                     # or 'random', 'grid'
    config.search.pruner = 'successive_halving'       # or 'none', 'median', 'hyperband'
    config.search.metric = 'val_accuracy'             # needs config.data.validation_size > 0

    statuses = search.run_worker(config, 'runs/search')  # {run folder: status}

The study lives in an Optuna storage: ``workdir/study.db`` (SQLite) by default,
or any URL Optuna accepts (``config.search.storage``, e.g. PostgreSQL for
workers on several machines that share the workdir). Every worker started on
the same workdir joins the same study and takes the next trial when it has
finished one; a trial whose worker died (its heartbeat stopped) is retried by a
live worker or a later rerun, and its run folder resumes from its last
checkpoint. A grid (``sampler='grid'``, and every ``sweep`` section, see
:func:`search_space.spec_from_sweep`) enqueues each of its points exactly once; with
``vectorize`` a worker takes the points that train together as one group.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import ml_collections

from resnet_jax import datasets, validation
from resnet_jax.rundir import locks
from resnet_jax.rundir import workdir as workdir_lib
from resnet_jax.studies import search_space
from resnet_jax.studies import sweep as sweep_lib

logger = logging.getLogger('resnet_jax')

# Optuna flags the heartbeat API as experimental and warns when it is used
# outside Study.optimize (this module runs its own ask-and-tell loop).
warnings.filterwarnings('ignore', message='.*is experimental.*')
warnings.filterwarnings('ignore', message='.*experimental feature.*')
warnings.filterwarnings('ignore', message='Heartbeat of storage is supposed to be used.*')
warnings.filterwarnings('ignore', message='The number of trials is too small to compute.*')

SEARCH_FILE = 'search.json'  # The study's description in its workdir.
STUDY_DB = 'study.db'  # The default storage: SQLite in the workdir.
OVERRIDES_FILE = 'overrides.json'  # The fields a run folder's point sets.
_CLAIM_LOCK = '.claim.lock'  # Serialises claiming trials among the workdir's workers.


def check_overrides(run_dir: str, overrides: Mapping[str, Any]) -> None:
    """Records the point a run folder holds; a folder holding another point is an error."""
    path = os.path.join(run_dir, OVERRIDES_FILE)
    wanted = workdir_lib.json_safe(dict(overrides))
    if os.path.exists(path):
        found = workdir_lib.read_json_object(path)
        if found is None:
            raise search_space.SearchError(f'{path} is not a JSON object; remove it or the folder')
        if found != json.loads(json.dumps(wanted)):
            raise search_space.SearchError(
                f'{run_dir} holds the point {found}, not {wanted}; move it away to train here'
            )
        return
    os.makedirs(run_dir, exist_ok=True)
    workdir_lib.write_json(path, wanted)


# ------------------------------------------------------------------ study ----


def storage_url(spec_storage: str, workdir: str) -> str:
    """The storage URL of a study; '' is ``workdir/study.db``."""
    if spec_storage:
        return spec_storage
    return 'sqlite:///' + os.path.abspath(os.path.join(workdir, STUDY_DB))


def open_storage(url: str, spec: search_space.Spec) -> Any:
    """An Optuna RDB storage with heartbeats; :class:`search_space.SearchError` if unreachable."""
    import optuna  # pylint: disable=g-import-not-at-top

    engine_kwargs = {'connect_args': {'timeout': 60}} if url.startswith('sqlite') else {}
    engine_kwargs['pool_pre_ping'] = True
    try:
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=spec.heartbeat_seconds,
            grace_period=spec.grace_seconds,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(),
        )
    except Exception as e:  # pylint: disable=broad-except  # Any driver error: one line.
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise search_space.SearchError(
            f'cannot open the study storage {search_space.redact(url)}: {message}'
        ) from None


def make_sampler(spec: search_space.Spec, offset: int = 0) -> Any:
    """The study's sampler, seeded with ``config.search.seed + offset``.

    Workers draw each new trial with a sampler seeded by the number of trials
    before it (:func:`claim`): as reproducible as one seeded sampler with one
    worker, and never the same draw in two workers. TPE counts running trials
    as bad results (its constant liar), so parallel workers spread out.
    """
    import optuna  # pylint: disable=g-import-not-at-top

    seed = spec.seed + offset
    if spec.sampler == 'tpe':
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=spec.startup_trials, constant_liar=True
        )
    # A grid's points are all enqueued (each exactly once): its sampler is never asked.
    return optuna.samplers.RandomSampler(seed=seed)


def make_pruner(spec: search_space.Spec) -> Any:
    import optuna  # pylint: disable=g-import-not-at-top

    if spec.pruner == 'median':
        return optuna.pruners.MedianPruner(
            n_startup_trials=spec.startup_trials, n_warmup_steps=spec.min_epochs - 1
        )
    if spec.pruner == 'successive_halving':
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=spec.min_epochs, reduction_factor=spec.reduction_factor
        )
    if spec.pruner == 'hyperband':
        return optuna.pruners.HyperbandPruner(
            min_resource=spec.min_epochs,
            max_resource=spec.base.num_epochs,
            reduction_factor=spec.reduction_factor,
        )
    return optuna.pruners.NopPruner()


@contextlib.contextmanager
def claim_lock(workdir: str) -> Iterator[None]:
    """Serialises the workers of a workdir while they create the study or claim trials."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, _CLAIM_LOCK), 'a') as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _study_key(spec: search_space.Spec) -> dict[str, Any]:
    """What every worker of a study must agree on."""
    described = spec.describe()
    for name in ('storage', 'study_name'):
        described.pop(name)
    described['base_config'] = {
        k: v
        for k, v in workdir_lib.flatten(described['base_config']).items()
        if k not in workdir_lib.RESUMABLE_CHANGES and not k.startswith('distributed.')
    }
    return json.loads(workdir_lib.dumps(described))


def open_study(spec: search_space.Spec, workdir: str) -> Any:
    """Creates or joins the study of ``workdir``; enqueues a grid's points once."""
    import optuna  # pylint: disable=g-import-not-at-top

    url = storage_url(spec.storage, workdir)
    # A storage elsewhere is reached before the workdir is created: an unreachable
    # one leaves nothing behind. The default SQLite file lives in the workdir.
    storage = open_storage(url, spec) if spec.storage else None
    os.makedirs(workdir, exist_ok=True)
    with claim_lock(workdir):
        storage = storage or open_storage(url, spec)
        try:
            study = optuna.create_study(
                storage=storage,
                study_name=spec.study_name,
                direction=spec.direction,
                sampler=make_sampler(spec),
                pruner=make_pruner(spec),
                load_if_exists=True,
            )
        except Exception as e:  # pylint: disable=broad-except
            raise search_space.SearchError(
                f'cannot open study {spec.study_name!r} in {search_space.redact(url)}: {e}'
            ) from None
        key = _study_key(spec)
        recorded = study.user_attrs.get('spec')
        if recorded is None:
            study.set_user_attr('spec', key)
        elif recorded != key:
            differ = sorted(k for k in set(key) | set(recorded) if key.get(k) != recorded.get(k))
            raise search_space.SearchError(
                f'the study {spec.study_name!r} in {search_space.redact(url)} was started with another '
                f'search config (differs in: {", ".join(differ)}); use another --workdir or '
                'config.search.study_name'
            )
        if spec.grid and not study.user_attrs.get('grid_enqueued'):
            for point in _grid_order(spec):
                study.enqueue_trial(dict(point), skip_if_exists=True)
            study.set_user_attr('grid_enqueued', len(spec.grid))
        elif spec.grid:
            _requeue_lost(study, spec, workdir)
        workdir_lib.write_json(os.path.join(workdir, SEARCH_FILE), spec.describe())
    return study


def _requeue_lost(study: Any, spec: search_space.Spec, workdir: str) -> None:
    """Enqueues again the grid points that ended but whose run folder lost its result.

    (A folder deleted or cut back by hand, to be trained again.) Points with a
    waiting or running trial are left to it.
    """
    from optuna.trial import TrialState  # pylint: disable=g-import-not-at-top

    active = {TrialState.WAITING, TrialState.RUNNING}
    trials = study.get_trials(deepcopy=False)
    for point in spec.grid:
        mine = [
            t for t in trials if t.params == point or t.system_attrs.get('fixed_params') == point
        ]
        if any(t.state in active for t in mine):
            continue
        name = search_space.folder_name(point)
        try:
            config = search_space.apply_overrides(spec.base, point)
        except validation.ConfigError:
            continue
        if _finished(os.path.join(workdir, name), config) is None:
            logger.info('%s has no finished run: queued again', name)
            study.enqueue_trial(dict(point))


def _grid_order(spec: search_space.Spec) -> list[dict[str, Any]]:
    """A grid's points, those that train together (``vectorize``) next to each other."""
    if not spec.vectorize:
        return list(spec.grid)
    groups = sweep_lib.group_runs([search_space.apply_overrides(spec.base, p) for p in spec.grid])
    return [spec.grid[i] for group in groups for i in group]


# ---------------------------------------------------------------- workers ----


def _counted(trial: Any) -> bool:
    """Whether a trial uses up one of ``num_trials``: all but stale ones (retried)."""
    from optuna.trial import TrialState  # pylint: disable=g-import-not-at-top

    return trial.state != TrialState.FAIL or 'run_status' in trial.user_attrs


def claim(study: Any, spec: search_space.Spec) -> list[Any]:
    """The next trials for this worker (one, or a group with ``vectorize``); [] if none.

    Waiting trials (a grid's points, retries of trials whose worker died) come
    first; a sampler study then asks for new ones up to ``num_trials``.
    Callers hold :func:`claim_lock`.
    """
    from optuna.trial import TrialState  # pylint: disable=g-import-not-at-top

    trials = study.get_trials(deepcopy=False)
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    if not waiting and (spec.grid or sum(map(_counted, trials)) >= spec.num_trials):
        return []
    if not waiting:  # A new draw: a sampler seeded by the trials before it.
        study.sampler = make_sampler(spec, offset=len(trials))
    first = study.ask()
    claimed = [first]
    if spec.vectorize and spec.grid and waiting:
        from resnet_jax.training import loop  # pylint: disable=g-import-not-at-top  # Heavy.

        key = loop.group_key(search_space.apply_overrides(spec.base, first.params))
        for t in waiting[1:]:
            if t.number == first.number:
                continue
            if loop.group_key(search_space.apply_overrides(spec.base, t.params)) != key:
                break
            claimed.append(study.ask())
    return claimed


@contextlib.contextmanager
def heartbeat(storage: Any, trial_ids: Sequence[int], seconds: float) -> Iterator[None]:
    """Records the trials' heartbeats every ``seconds`` while the block runs."""
    stop = threading.Event()

    def beat() -> None:
        while True:
            for trial_id in trial_ids:
                with contextlib.suppress(Exception):  # A missed beat is retried next time.
                    storage.record_heartbeat(trial_id)
            if stop.wait(seconds):
                return

    thread = threading.Thread(target=beat, name='trial-heartbeat', daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@dataclasses.dataclass
class _Point:
    """A claimed trial and the run that trains it."""

    trial: Any
    overrides: dict[str, Any]
    name: str
    run_dir: str
    config: ml_collections.ConfigDict | None = None
    status: str = 'failed'
    error: str | None = None


def _prepare(trial: Any, spec: search_space.Spec, workdir: str) -> _Point:
    overrides = search_space.sample(trial, spec.params, spec.base)
    name = search_space.folder_name(overrides)
    point = _Point(trial, overrides, name, os.path.join(workdir, name))
    trial.set_user_attr('run', name)
    try:
        point.config = search_space.apply_overrides(spec.base, overrides)
        check_overrides(point.run_dir, overrides)
    except validation.ConfigError as e:
        point.error = f'{name}: {e}'
    return point


def _finished(run_dir: str, config: ml_collections.ConfigDict) -> dict[str, Any] | None:
    """The summary of ``run_dir`` if it already finished ``config``, else None.

    Completed means trained to this config's ``num_epochs`` (a larger one resumes
    the run); fields that do not change a run's result may differ.
    """
    summary = workdir_lib.read_json_object(os.path.join(run_dir, workdir_lib.SUMMARY_FILE))
    if not summary or not isinstance(summary.get('config'), dict):
        return None
    status = summary.get('status')
    if status not in ('completed', 'pruned', 'diverged'):
        return None
    if workdir_lib.config_differences(summary['config'], workdir_lib.config_json(config)):
        return None
    if status == 'completed' and summary.get('epochs_completed') != config.num_epochs:
        return None
    return summary


def _epoch_callback(point: _Point, spec: search_space.Spec) -> Callable[[dict[str, Any]], bool]:
    def on_epoch(record: dict[str, Any]) -> bool:
        value = record.get(spec.metric)
        if not validation.is_finite_number(value):
            return False
        point.trial.report(float(value), int(record['epoch']))
        if int(record['epoch']) >= point.config.num_epochs:
            return False  # Trained to the end: completed, whatever the pruner says.
        return point.trial.should_prune()

    return on_epoch


def _tell(
    study: Any, point: _Point, summary: Mapping[str, Any] | None, spec: search_space.Spec
) -> None:
    """Ends a trial with its run's outcome."""
    from optuna.trial import TrialState  # pylint: disable=g-import-not-at-top

    status = summary.get('status', 'failed') if summary else 'failed'
    point.status = status
    trial = point.trial
    trial.set_user_attr('run_status', status)
    if summary:
        for key in ('epochs_completed', 'pruned_at_epoch', 'test_accuracy', 'val_accuracy'):
            if summary.get(key) is not None:
                trial.set_user_attr(key, summary[key])
    error = point.error or (summary or {}).get('error')
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
        point.name,
        status,
        f' ({spec.metric} {value:.4f})' if validation.is_finite_number(value) else '',
    )


def _requeue(study: Any, points: Sequence[_Point]) -> None:
    """Gives interrupted trials back: each fails and a retry waits for the next worker."""
    import optuna  # pylint: disable=g-import-not-at-top
    from optuna.trial import TrialState  # pylint: disable=g-import-not-at-top

    retry = optuna.storages.RetryHeartbeatStaleTrialCallback()
    for point in points:
        with contextlib.suppress(Exception):
            study.tell(point.trial, state=TrialState.FAIL)
            retry(study, study._storage.get_trial(point.trial._trial_id))  # pylint: disable=protected-access


def _record_failure(point: _Point, message: str) -> None:
    """Records a run that could not train in its folder's summary."""
    path = os.path.join(point.run_dir, workdir_lib.SUMMARY_FILE)
    summary = workdir_lib.read_json_object(path) or {}
    if point.config is not None:
        summary['config'] = workdir_lib.config_json(point.config)
    summary.update(status='failed', error=message)
    with contextlib.suppress(OSError):
        workdir_lib.write_json(path, summary)


def train_points(study: Any, points: list[_Point], spec: search_space.Spec) -> None:
    """Trains claimed trials (together if more than one) and tells the study their outcome."""
    summaries: list[dict[str, Any] | None] = [None] * len(points)
    todo = []
    for i, point in enumerate(points):
        if point.error:
            logger.error('trial %d: %s', point.trial.number, point.error)
            _record_failure(point, point.error)
            summaries[i] = {'status': 'failed', 'error': point.error}
        elif (done := _finished(point.run_dir, point.config)) is not None:
            logger.info(
                'trial %d %s: already %s, not trained again',
                point.trial.number,
                point.name,
                done['status'],
            )
            report_epoch = _epoch_callback(point, spec)  # The pruner sees its history.
            for record in workdir_lib.read_metrics(point.run_dir):
                report_epoch(record)
            summaries[i] = done
        else:
            todo.append(i)
    if todo:
        results = _train([points[i] for i in todo], study, spec)
        for i, result in zip(todo, results, strict=True):
            summaries[i] = result
    for point, summary in zip(points, summaries, strict=True):
        _tell(study, point, summary, spec)


def _train(group: list[_Point], study: Any, spec: search_space.Spec) -> list[dict[str, Any]]:
    """Trains ``group`` as one program; the runs' summaries (a failure recorded as one).

    A run folder another process is training (the same point drawn twice) is
    waited for: its result then counts for this trial too.
    """
    from resnet_jax.training import loop  # pylint: disable=g-import-not-at-top  # Heavy.

    for point in group:
        logger.info('trial %d %s: training', point.trial.number, point.name)
    while True:
        try:
            _, results = loop.train_runs(
                [p.config for p in group],
                [p.run_dir for p in group],
                on_epoch=[_epoch_callback(p, spec) for p in group],
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
            for p in group:
                _record_failure(p, message)
            return [{'status': 'failed', 'error': message} for _ in group]
        except BaseException:  # Interrupted: checkpoints are saved; the trials wait for a worker.
            _requeue(study, group)
            raise


def _others_running(study: Any) -> bool:
    from optuna.trial import TrialState  # pylint: disable=g-import-not-at-top

    return any(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False))


def run_worker(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
    """Joins the study of ``config`` in ``workdir`` and trains trials until none is left.

    Waits while other workers' trials run (a trial whose worker dies is retried
    once its heartbeat is stale). Returns the status of
    each run this worker ended, by folder name.
    """
    import optuna  # pylint: disable=g-import-not-at-top

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = search_space.spec_from_config(config)
    study = open_study(spec, workdir)
    worker = f'{socket.gethostname()}:{os.getpid()}'
    logger.info(
        'study %r (%s sampler, %s pruner, %s %s) in %s; worker %s',
        spec.study_name,
        spec.sampler,
        spec.pruner,
        spec.direction,
        spec.metric,
        search_space.redact(storage_url(spec.storage, workdir)),
        worker,
    )
    statuses: dict[str, str] = {}
    while True:
        with contextlib.suppress(Exception):  # Another worker may fail the same trial.
            optuna.storages.fail_stale_trials(study)
        with claim_lock(workdir):
            trials = claim(study, spec)
        if not trials:
            if _others_running(study):
                time.sleep(spec.poll_seconds)
                continue
            break
        points = [_prepare(trial, spec, workdir) for trial in trials]
        storage = study._storage  # pylint: disable=protected-access
        with heartbeat(storage, [t._trial_id for t in trials], spec.heartbeat_seconds):  # pylint: disable=protected-access
            train_points(study, points, spec)
        statuses.update({p.name: p.status for p in points})
    return statuses


def run_study(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
    """Runs the study of ``config`` in ``workdir`` as one worker: ``{run folder: status}``.

    A ``sweep`` section is a grid study: its ``sweep.json`` is written and the
    status of every point is returned (``'pending'`` for one no worker has
    ended yet). A ``search`` section returns the runs this worker ended. Start
    the same command several times (or ``--workers=N``) to share the study.
    """
    if not sweep_lib.is_sweep(config):
        return run_worker(config, workdir)
    points = sweep_lib.expand(config)
    sweep_lib.write_manifest(config, workdir, points)
    logger.info('sweep of %d runs over %s', len(points), ', '.join(sweep_lib.axes(config)))
    statuses = run_worker(config, workdir)
    for point in points:  # Points other workers (or earlier invocations) ended.
        if point.name not in statuses:
            path = os.path.join(workdir, point.name, workdir_lib.SUMMARY_FILE)
            summary = workdir_lib.read_json_object(path) or {}
            statuses[point.name] = summary.get('status', 'pending')
    return {point.name: statuses[point.name] for point in points}
