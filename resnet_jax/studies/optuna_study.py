"""The Optuna study behind every grid or search: its storage, opening it, claiming trials.

The study lives in an Optuna storage: ``workdir/study.db`` (SQLite) by default,
or any URL Optuna accepts (``config.search.storage``, e.g. PostgreSQL for
workers on several machines that share the workdir). Every worker started on
the same workdir joins the same study (:func:`open_study`, which refuses a
study started with another config) and, under :func:`claim_lock`, takes the
next trials with :func:`claim`. While a worker trains them, :func:`heartbeat`
records that it is alive; a trial whose heartbeat stopped is failed and retried
by a live worker or a later rerun. A grid enqueues each of its points exactly
once (and again when the run folder of an ended point lost its result); with
``vectorize`` the points that train together are claimed as one group.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from resnet_jax import validation
from resnet_jax.rundir import workdir as workdir_lib
from resnet_jax.studies import run_folders, samplers, search_space
from resnet_jax.studies import sweep as sweep_lib

logger = logging.getLogger('resnet_jax')

# Optuna flags the heartbeat API as experimental and warns when it is used
# outside Study.optimize (the worker runs its own ask-and-tell loop).
warnings.filterwarnings('ignore', message='.*is experimental.*')
warnings.filterwarnings('ignore', message='.*experimental feature.*')
warnings.filterwarnings('ignore', message='Heartbeat of storage is supposed to be used.*')
warnings.filterwarnings('ignore', message='The number of trials is too small to compute.*')

DESCRIPTION_FILE = 'search.json'  # The study's description (a grid's too) in its workdir.
STUDY_DB = 'study.db'  # The default storage: SQLite in the workdir.
_CLAIM_LOCK = '.claim.lock'  # Serialises claiming trials among the workdir's workers.


def storage_url(spec_storage: str, workdir: str) -> str:
    """The storage URL of a study; '' is ``workdir/study.db``.

    A bare ``postgresql://`` URL names the PostgreSQL driver that is installed:
    SQLAlchemy's default (psycopg 3) if importable, else psycopg2, which the
    ``postgres`` extra installs.
    """
    if not spec_storage:
        return 'sqlite:///' + os.path.abspath(os.path.join(workdir, STUDY_DB))
    scheme, sep, rest = spec_storage.partition('://')
    if scheme == 'postgresql' and sep and not _importable('psycopg') and _importable('psycopg2'):
        return f'postgresql+psycopg2://{rest}'
    return spec_storage


def _importable(module: str) -> bool:
    import importlib.util  # pylint: disable=g-import-not-at-top

    return importlib.util.find_spec(module) is not None


def open_storage(url: str, spec: search_space.Spec) -> Any:
    """An Optuna RDB storage with heartbeats; :class:`search_space.SearchError` if unreachable."""
    import optuna  # pylint: disable=g-import-not-at-top

    # SQLite waits this long for a lock held by another process before it fails.
    busy = min(60.0, max(5.0, spec.storage_retry_seconds))
    engine_kwargs = {'connect_args': {'timeout': busy}} if url.startswith('sqlite') else {}
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


class StorageUnavailable(search_space.SearchError):
    """The study's storage stayed away (or is read-only): a fault of the storage, not of a run."""


def _reason(error: BaseException) -> str:
    """The driver's first line behind an Optuna or SQLAlchemy storage error."""
    while error.__cause__ is not None:
        error = error.__cause__
    error = getattr(error, 'orig', None) or error
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _storage_error(error: BaseException) -> bool:
    import optuna  # pylint: disable=g-import-not-at-top
    import sqlalchemy  # pylint: disable=g-import-not-at-top

    return isinstance(
        error, (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError)
    )


class Retry:
    """Calls into the study's storage, retried with backoff while it does not answer.

    ``retry(call, *args)`` returns ``call(*args)``; a storage error is retried
    for ``seconds`` (``config.search.storage_retry_seconds``), then raises
    :class:`StorageUnavailable` naming the storage (without its password). A
    read-only storage raises it at once.
    """

    def __init__(self, url: str, seconds: float):
        self.url, self.seconds = url, seconds

    def __call__(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        deadline, delay, warned = time.monotonic() + self.seconds, 0.5, False
        while True:
            try:
                return call(*args, **kwargs)
            except Exception as e:  # pylint: disable=broad-except  # Only storage errors.
                if not _storage_error(e):
                    raise
                reason, where = _reason(e), search_space.redact(self.url)
                if 'readonly' in reason.lower() or 'read-only' in reason.lower():
                    raise StorageUnavailable(
                        f'the study storage {where} is read-only ({reason}): make it writable '
                        'and rerun the command'
                    ) from None
                if time.monotonic() + delay > deadline:
                    raise StorageUnavailable(
                        f'the study storage {where} did not answer for '
                        f'{self.seconds:g} s ({reason}); the runs are checkpointed: rerun the '
                        'command once it is back'
                    ) from None
                if not warned:
                    logger.warning(
                        'the study storage %s does not answer (%s): retrying for up to %g s',
                        where,
                        reason,
                        self.seconds,
                    )
                    warned = True
                time.sleep(delay)
                delay = min(2 * delay, 10.0)


def draw_seed(seed: int, position: int) -> int:
    """The sampler seed of a study's draw number ``position`` (the trials before it).

    Derived from both through :class:`numpy.random.SeedSequence`, so that the
    draws of two study seeds are independent (``seed + position`` would make
    seed 1's draws repeat seed 0's, shifted by one), while the same study seed
    and position always give the same draw.
    """
    import numpy as np  # pylint: disable=g-import-not-at-top

    return int(np.random.SeedSequence([seed, position]).generate_state(1)[0])


def make_sampler(spec: search_space.Spec, position: int = 0) -> Any:
    """The study's sampler (``config.search.sampler``, from :data:`samplers.SAMPLERS`) for
    its draw number ``position``, seeded with :func:`draw_seed` of ``config.search.seed``
    and ``position``.

    Workers draw each new trial with a sampler seeded by the number of trials
    before it (:func:`claim`): as reproducible as one seeded sampler with one
    worker, and never the same draw in two workers.
    """
    return samplers.SAMPLERS.get(spec.sampler)(spec, draw_seed(spec.seed, position))


def make_pruner(spec: search_space.Spec) -> Any:
    """The study's pruner (``config.search.pruner``, from :data:`samplers.PRUNERS`)."""
    return samplers.PRUNERS.get(spec.pruner)(spec)


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
    return _key_of(spec.describe())


def _key_of(described: dict[str, Any]) -> dict[str, Any]:
    """The study key of a study's description (:meth:`search_space.Spec.describe`)."""
    described = dict(described)
    for name in ('storage', 'study_name', 'num_trials'):  # More trials extend the study.
        described.pop(name, None)
    described['base_config'] = {
        k: v
        for k, v in workdir_lib.flatten(described['base_config']).items()
        if k not in workdir_lib.RESUMABLE_CHANGES and not k.startswith('distributed.')
    }
    return json.loads(workdir_lib.dumps(described))


def study_name(spec: search_space.Spec, workdir: str) -> str:
    """The study's name in its storage: ``config.search.study_name``; else the name
    the workdir's ``search.json`` records (studies started before names were
    derived are called 'search'); else the workdir's folder name."""
    if spec.study_name:
        return spec.study_name
    described = workdir_lib.read_json_object(os.path.join(workdir, DESCRIPTION_FILE))
    recorded = (described or {}).get('study_name')
    if isinstance(recorded, str) and recorded:
        return recorded
    return os.path.basename(os.path.abspath(workdir)) or 'study'


def open_study(spec: search_space.Spec, workdir: str) -> Any:
    """Creates or joins the study of ``workdir``; enqueues a grid's points once.

    The study is named (:func:`study_name`), its objective too
    (``config.search.metric``), and it keeps a digest of its config among its
    attributes (the config itself is in ``search.json``).
    """
    import optuna  # pylint: disable=g-import-not-at-top

    spec = dataclasses.replace(spec, study_name=study_name(spec, workdir))
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
        _check_key(study, spec, url, workdir)
        if study.metric_names is None:  # Studies started before it was named.
            study.set_metric_names([spec.metric])
        if spec.grid and not study.user_attrs.get('grid_enqueued'):
            for point in _grid_order(spec):
                study.enqueue_trial(dict(point), skip_if_exists=True)
            study.set_user_attr('grid_enqueued', len(spec.grid))
        elif spec.grid:
            _requeue_lost(study, spec, workdir)
        workdir_lib.write_json(os.path.join(workdir, DESCRIPTION_FILE), spec.describe())
    return study


def _check_key(study: Any, spec: search_space.Spec, url: str, workdir: str) -> None:
    """Records the study's key once, as a digest and a few readable attributes (the
    whole config is in ``search.json``); a worker with another search config is an
    error. Studies started before the digest keep the whole key they recorded."""
    key = _study_key(spec)
    legacy = study.user_attrs.get('spec')
    digest = study.user_attrs.get('config_digest')
    if legacy is None and digest is None:
        for name, value in _attributes(spec, key).items():
            study.set_user_attr(name, value)
        return
    if legacy is not None:
        if not isinstance(legacy, dict):
            legacy = {'spec': legacy}  # Not a key this tool writes: differs in everything.
        recorded = {k: v for k, v in legacy.items() if k != 'num_trials'}  # Older keys hold it.
        differ = _differing(key, recorded)
    elif digest != _digest(key):
        described = workdir_lib.read_json_object(os.path.join(workdir, DESCRIPTION_FILE))
        differ = _differing(key, _key_of(described) if described else {})
        differ = differ or ['the config recorded in the storage']
    else:
        return
    if differ:
        raise search_space.SearchError(
            f'the study {spec.study_name!r} in {search_space.redact(url)} was started with another '
            f'search config (differs in: {", ".join(differ)}); use another --workdir or '
            'config.search.study_name'
        )


def _differing(key: dict[str, Any], recorded: dict[str, Any]) -> list[str]:
    """The fields in which two study keys differ, sorted."""
    return sorted(k for k in set(key) | set(recorded) if key.get(k) != recorded.get(k))


def _digest(key: dict[str, Any]) -> str:
    """A short digest of a study key."""
    text = json.dumps(key, sort_keys=True, separators=(',', ':'))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _attributes(spec: search_space.Spec, key: dict[str, Any]) -> dict[str, Any]:
    """What the storage keeps about a study's config: short enough for one row of
    ``optuna studies`` or the dashboard's list."""
    return {
        'config_digest': _digest(key),
        'searched': ', '.join(p.name for p in spec.params),
        'sampler': spec.sampler,
        'pruner': spec.pruner,
        'seed': spec.seed,
        'model': spec.base.model,
        'epochs': spec.base.num_epochs,
    }


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
        name = sweep_lib.run_name(point)
        try:
            config = run_folders.apply_overrides(spec.base, point)
        except validation.ConfigError:
            continue
        if run_folders.finished_summary(os.path.join(workdir, name), config) is None:
            logger.info('%s has no finished run: queued again', name)
            study.enqueue_trial(dict(point))


def _grid_order(spec: search_space.Spec) -> list[dict[str, Any]]:
    """A grid's points, those that train together (``vectorize``) next to each other."""
    if not spec.vectorize:
        return list(spec.grid)
    groups = sweep_lib.group_runs([run_folders.apply_overrides(spec.base, p) for p in spec.grid])
    return [spec.grid[i] for group in groups for i in group]


def trial_run(trial: Any) -> str | None:
    """The run folder a trial's ``run`` user attribute names (:func:`sweep.run_name`);
    None when it has none or it is not a usable folder name."""
    name = trial.user_attrs.get('run')
    usable = isinstance(name, str) and name not in ('', '.', '..') and os.sep not in name
    return name if usable else None


def trial_status(trial: Any) -> str | None:
    """The run status a trial's ``run_status`` user attribute records, None if none
    (or one this tool does not write)."""
    status = trial.user_attrs.get('run_status')
    return status if status in workdir_lib.RUN_STATUSES else None


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
        study.sampler = make_sampler(spec, position=len(trials))
    first = study.ask()
    claimed = [first]
    if spec.vectorize and spec.grid and waiting:
        from resnet_jax.training import loop  # pylint: disable=g-import-not-at-top  # Heavy.

        key = loop.group_key(run_folders.apply_overrides(spec.base, first.params))
        for t in waiting[1:]:
            if t.number == first.number:
                continue
            if loop.group_key(run_folders.apply_overrides(spec.base, t.params)) != key:
                break
            claimed.append(study.ask())
    return claimed


def others_running(study: Any) -> bool:
    """Whether a trial of the study is running (in this or another worker)."""
    from optuna.trial import TrialState  # pylint: disable=g-import-not-at-top

    return any(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False))


def still_running(study: Any, trial: Any) -> bool | None:
    """Whether ``trial`` is still running in the study (so still this worker's: a
    retried trial gets a new one); None when the storage does not answer."""
    from optuna.trial import TrialState  # pylint: disable=g-import-not-at-top

    try:
        state = study._storage.get_trial(trial._trial_id).state  # pylint: disable=protected-access
    except Exception:  # pylint: disable=broad-except  # The storage is away: cannot tell.
        return None
    return state == TrialState.RUNNING


def folder_in_use(study: Any, name: str, mine: Sequence[Any]) -> bool:
    """Whether a running trial other than ``mine`` trains in the run folder ``name``.

    When none does, a lock on that folder is held by a worker whose trial the
    study has failed (its heartbeat went stale): it may be taken over at once.
    True when the storage does not answer.
    """
    from optuna.trial import TrialState  # pylint: disable=g-import-not-at-top

    ids = {t._trial_id for t in mine}  # pylint: disable=protected-access
    try:
        trials = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    except Exception:  # pylint: disable=broad-except
        return True
    return any(trial_run(t) == name and t._trial_id not in ids for t in trials)


def give_back(study: Any, trials: Sequence[Any]) -> None:
    """Gives interrupted trials back: each fails and a retry waits for the next worker.

    A trial that is no longer running (another worker failed and retried it) is left.
    """
    import optuna  # pylint: disable=g-import-not-at-top
    from optuna.trial import TrialState  # pylint: disable=g-import-not-at-top

    retry = optuna.storages.RetryHeartbeatStaleTrialCallback()
    for trial in trials:
        with contextlib.suppress(Exception):
            study.tell(trial, state=TrialState.FAIL)
            retry(study, study._storage.get_trial(trial._trial_id))  # pylint: disable=protected-access


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
