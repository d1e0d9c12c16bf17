"""Hyperparameter searches: Optuna studies whose trials are ordinary runs.

A config with a ``search`` section is a study. Each trial samples the fields of
``config.search.space``, trains the resulting config into its own run folder
under the workdir (metrics, TensorBoard, checkpoints, summary: what a single run
writes) and reports ``config.search.metric`` after every epoch, so that a pruner
can stop it early::

    config.search = search.default_section()
    config.search.space.learning_rate = search.float_param(1e-4, 0.1, log=True)
    config.search.space.batch_size = search.categorical((100, 500, 1000))
    config.search.space.momentum = search.float_param(0.5, 0.99, when=('optimizer', 'sgd'))
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
:func:`spec_from_sweep`) enqueues each of its points exactly once; with
``vectorize`` a worker takes the points that train together as one group.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import itertools
import json
import logging
import math
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import ml_collections

from resnet_jax import datasets, validation
from resnet_jax import sweep as sweep_lib
from resnet_jax import workdir as workdir_lib

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

SAMPLERS = ('tpe', 'random', 'grid')
PRUNERS = ('none', 'median', 'successive_halving', 'hyperband')
PARAM_TYPES = ('float', 'int', 'categorical')
# Metrics a study can optimise: fields of every epoch's record.
METRICS = {
    'val_accuracy': 'maximize',
    'val_loss': 'minimize',
    'test_accuracy': 'maximize',
    'test_loss': 'minimize',
    'train_accuracy': 'maximize',
    'train_loss': 'minimize',
}
# Statuses of a run that end its trial (the others are retried).
FINAL = ('completed', 'pruned', 'diverged', 'failed')


class SearchError(validation.ConfigError):
    """A bad search config or an unreachable storage (one line for the user)."""


# ------------------------------------------------------------------ space ----


def float_param(
    low: float, high: float, *, log: bool = False, when: tuple[str, Any] | None = None
) -> ml_collections.ConfigDict:
    """A float field drawn from [low, high] (log-uniformly with ``log``)."""
    return _param(type='float', low=low, high=high, log=log, when=when)


def int_param(
    low: int, high: int, *, log: bool = False, step: int = 1, when: tuple[str, Any] | None = None
) -> ml_collections.ConfigDict:
    """An integer field drawn from [low, high] in steps of ``step``."""
    return _param(type='int', low=low, high=high, log=log, step=step, when=when)


def categorical(
    choices: Sequence[Any], *, when: tuple[str, Any] | None = None
) -> ml_collections.ConfigDict:
    """A field that takes one of ``choices`` (numbers, strings, booleans)."""
    return _param(type='categorical', choices=tuple(choices), when=when)


def _param(**fields: Any) -> ml_collections.ConfigDict:
    if fields.get('when') is None:
        fields.pop('when')
    return ml_collections.ConfigDict(fields)


@dataclasses.dataclass(frozen=True)
class Param:
    """One searched config field (dotted ``name``)."""

    name: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: int = 1
    choices: tuple[Any, ...] = ()
    when: tuple[str, Any] | None = None  # (field, value): searched only when field == value.

    def suggest(self, trial: Any) -> Any:
        """The trial's value of this field (Optuna's define-by-run API)."""
        if self.type == 'float':
            return trial.suggest_float(self.name, self.low, self.high, log=self.log)
        if self.type == 'int':
            step = 1 if self.log else self.step
            return trial.suggest_int(self.name, self.low, self.high, step=step, log=self.log)
        return trial.suggest_categorical(self.name, list(self.choices))


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def parse_param(name: str, node: Any) -> Param:
    """Checks one entry of ``config.search.space``; raises :class:`SearchError`."""
    where = f'config.search.space.{name}'
    kind = node.get('type')
    if kind not in PARAM_TYPES:
        raise SearchError(f'{where}.type must be one of {", ".join(PARAM_TYPES)}, got {kind!r}')
    known = {'type', 'low', 'high', 'log', 'step', 'choices', 'when'}
    extra = sorted(set(node.keys()) - known)
    if extra:
        raise SearchError(f'{where} has unknown entries: {", ".join(extra)}')
    when = node.get('when')
    if when is not None:
        if not isinstance(when, (tuple, list)) or len(when) != 2 or not isinstance(when[0], str):
            raise SearchError(f"{where}.when must be (field, value), e.g. ('optimizer', 'sgd')")
        when = (when[0], when[1])
    if kind == 'categorical':
        choices = node.get('choices')
        if not isinstance(choices, (tuple, list)) or not choices:
            raise SearchError(f'{where}.choices must be a non-empty list of values')
        for choice in choices:
            if not isinstance(choice, (bool, int, float, str)) and choice is not None:
                raise SearchError(f'{where}.choices holds {choice!r}: only numbers, strings, booleans')
        return Param(name, kind, choices=tuple(choices), when=when)
    low, high, log = node.get('low'), node.get('high'), node.get('log', False)
    if not _is_number(low) or not _is_number(high):
        raise SearchError(f'{where} needs numbers low and high, got {low!r} and {high!r}')
    if low > high:
        raise SearchError(f'{where}: low={low} is greater than high={high}')
    if not isinstance(log, bool):
        raise SearchError(f'{where}.log must be True or False, got {log!r}')
    if log and low <= 0:
        raise SearchError(f'{where}: a log scale needs low > 0, got low={low}')
    step = node.get('step', 1)
    if kind == 'int':
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high, step)):
            raise SearchError(f'{where}: an int field needs integer low, high and step')
        if step < 1:
            raise SearchError(f'{where}.step must be >= 1, got {step}')
    return Param(name, kind, low=low, high=high, log=log, step=step, when=when)


def parse_space(space: Any, prefix: str = '') -> list[Param]:
    """The entries of ``config.search.space`` (nested sections name nested fields)."""
    params = []
    for key, node in space.items():
        if not isinstance(node, ml_collections.ConfigDict):
            raise SearchError(
                f'config.search.space.{prefix}{key} must be a search.float_param/int_param/'
                f'categorical entry, got {node!r}'
            )
        if 'type' in node:
            params.append(parse_param(prefix + key, node))
        else:
            params.extend(parse_space(node, f'{prefix}{key}.'))
    return params


# ------------------------------------------------------------------- spec ----


@dataclasses.dataclass(frozen=True)
class Spec:
    """A study: what it searches, how, and where it is stored."""

    params: tuple[Param, ...]
    base: ml_collections.ConfigDict  # The config without its search/sweep section.
    num_trials: int
    sampler: str
    seed: int
    metric: str
    pruner: str
    min_epochs: int
    reduction_factor: int
    startup_trials: int
    storage: str  # '' = sqlite in the workdir.
    study_name: str
    heartbeat_seconds: int
    grace_seconds: int
    poll_seconds: float
    vectorize: bool
    grid: tuple[dict[str, Any], ...] = ()  # Every point of a grid, in enqueue order.
    from_sweep: bool = False

    @property
    def direction(self) -> str:
        return METRICS[self.metric]

    def describe(self) -> dict[str, Any]:
        """The study as recorded in ``search.json`` (the storage URL without a password)."""
        return {
            'params': [dataclasses.asdict(p) for p in self.params],
            'num_trials': self.num_trials,
            'sampler': self.sampler,
            'seed': self.seed,
            'metric': self.metric,
            'direction': self.direction,
            'pruner': self.pruner,
            'min_epochs': self.min_epochs,
            'reduction_factor': self.reduction_factor,
            'startup_trials': self.startup_trials,
            'storage': redact(self.storage),
            'study_name': self.study_name,
            'vectorize': self.vectorize,
            'grid': list(self.grid),
            'from_sweep': self.from_sweep,
            'base_config': workdir_lib.config_json(self.base),
        }


SEARCH_DEFAULTS = {
    'num_trials': 20,
    'sampler': 'tpe',
    'seed': 0,
    'metric': 'val_accuracy',
    'pruner': 'none',
    'min_epochs': 1,
    'reduction_factor': 3,
    'startup_trials': 5,
    'storage': '',
    'study_name': 'search',
    'heartbeat_seconds': 30,
    'grace_seconds': 120,
    'poll_seconds': 5.0,
    'vectorize': False,
}
_OPTIONS = (*SEARCH_DEFAULTS, 'space')


def default_section() -> ml_collections.ConfigDict:
    """A ``config.search`` section with every option at its default and an empty space.

    Configs start from it so that every option can be set from the command line
    (``--config.search.storage=postgresql://...``).
    """
    section = ml_collections.ConfigDict(dict(SEARCH_DEFAULTS))
    section.space = ml_collections.ConfigDict()
    return section


def is_search(config: ml_collections.ConfigDict) -> bool:
    """Whether ``config`` is a study: a ``search`` section, or a ``sweep`` grid."""
    return 'search' in config or sweep_lib.is_sweep(config)


def spec_from_config(config: ml_collections.ConfigDict) -> Spec:
    """The study ``config`` describes; :class:`SearchError` on any bad entry."""
    if config.get('distributed') is not None and config.distributed.get('enabled'):
        raise SearchError(
            'sweeps and searches share their trials among workers, one run per worker: '
            'start workers (--workers=N, or the same command on each machine) instead of '
            'config.distributed'
        )
    if 'search' not in config:
        return spec_from_sweep(config)
    if 'sweep' in config:
        raise SearchError('a config has a search or a sweep section, not both')
    section = config.search
    unknown = sorted(set(section.keys()) - set(_OPTIONS))
    if unknown:
        raise SearchError(
            f'config.search has no option {unknown[0]}; options: {", ".join(_OPTIONS)}'
        )
    options = {k: section.get(k, v) for k, v in SEARCH_DEFAULTS.items()}
    _check_options(options)
    params = parse_space(section.get('space', ml_collections.ConfigDict()))
    if not params:
        raise SearchError('config.search.space is empty: name at least one field to search')
    base = ml_collections.ConfigDict(config.to_dict())
    del base['search']
    validation.validate_config(base)  # What every trial shares is checked once, up front.
    _check_fields(params, base)
    grid: tuple[dict[str, Any], ...] = ()
    if options['sampler'] == 'grid':
        bad = [p.name for p in params if p.type != 'categorical' or p.when]
        if bad:
            raise SearchError(
                f'the grid sampler needs unconditional categorical fields; not: {", ".join(bad)}'
            )
        names = [p.name for p in params]
        grid = tuple(
            dict(zip(names, values, strict=True))
            for values in itertools.product(*(p.choices for p in params))
        )
        options['num_trials'] = len(grid)
    spec = Spec(params=tuple(params), base=base, grid=grid, **options)
    _check_metric(spec)
    return spec


def _check_options(options: dict[str, Any]) -> None:
    def check_int(name: str, minimum: int) -> None:
        value = options[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise SearchError(f'config.search.{name} must be an integer >= {minimum}, got {value!r}')

    for name, minimum in (
        ('num_trials', 1),
        ('seed', 0),
        ('min_epochs', 1),
        ('reduction_factor', 2),
        ('startup_trials', 0),
        ('heartbeat_seconds', 1),
        ('grace_seconds', 1),
    ):
        check_int(name, minimum)
    if options['grace_seconds'] <= options['heartbeat_seconds']:
        raise SearchError('config.search.grace_seconds must exceed heartbeat_seconds')
    if not _is_number(options['poll_seconds']) or options['poll_seconds'] <= 0:
        raise SearchError(f'config.search.poll_seconds must be > 0, got {options["poll_seconds"]!r}')
    for name, choices in (('sampler', SAMPLERS), ('pruner', PRUNERS), ('metric', tuple(METRICS))):
        if options[name] not in choices:
            raise SearchError(
                f'config.search.{name}={options[name]!r} is unknown; choose one of '
                f'{", ".join(choices)}'
            )
    for name in ('storage', 'study_name'):
        if not isinstance(options[name], str):
            raise SearchError(f'config.search.{name} must be a string, got {options[name]!r}')
    if not options['study_name']:
        raise SearchError('config.search.study_name must not be empty')
    if not isinstance(options['vectorize'], bool):
        raise SearchError(f'config.search.vectorize must be True or False, got {options["vectorize"]!r}')


def _check_fields(params: Sequence[Param], base: ml_collections.ConfigDict) -> None:
    """Every searched field (and every ``when`` field) exists in the run config."""
    for p in params:
        for field in (p.name, *((p.when[0],) if p.when else ())):
            try:
                validation.get_field(base, field)
            except (validation.ConfigError, KeyError, AttributeError):
                raise SearchError(
                    f'config.search.space.{p.name}: the config has no field {field}'
                ) from None


def _check_metric(spec: Spec) -> None:
    if spec.metric.startswith('val_') and not spec.base.data.get('validation_size', 0):
        raise SearchError(
            f'config.search.metric={spec.metric} needs a validation split: set '
            'config.data.validation_size > 0 (or choose a test_ metric, which selects on '
            'the test set)'
        )


def spec_from_sweep(config: ml_collections.ConfigDict) -> Spec:
    """A ``sweep`` section as a grid study: every point once, the sweep's run names.

    It selects on ``val_accuracy`` with a validation split, else (the study's way)
    on ``test_accuracy``.
    """
    runs = sweep_lib.expand(config)
    base = sweep_lib.base_config(config)
    options = config.sweep
    metric = 'val_accuracy' if base.data.get('validation_size', 0) else 'test_accuracy'
    axes = sweep_lib.axes(config)
    params = tuple(Param(name, 'categorical', choices=tuple(values)) for name, values in axes.items())
    return Spec(
        **dict(
            SEARCH_DEFAULTS,
            num_trials=len(runs),
            sampler='grid',
            metric=metric,
            vectorize=bool(options.get('vectorize', False)),
        ),
        params=params,
        base=base,
        grid=tuple(run.overrides for run in runs),
        from_sweep=True,
    )


# ------------------------------------------------------------ run folders ----


def folder_name(overrides: Mapping[str, Any]) -> str:
    """A run folder's name: its ``field=value`` pairs, readable and always distinct.

    Values that cannot be written as they are (path separators, commas, very
    long names) are written simplified, with a hash of the exact values
    appended, so two distinct points never share a folder.
    """
    name = sweep_lib.run_name(dict(overrides))
    exact = ','.join(f'{k}={v!r}' if isinstance(v, float) else f'{k}={v}' for k, v in overrides.items())
    if name != exact or len(name) > 150:
        digest = hashlib.sha256(json.dumps(list(overrides.items())).encode()).hexdigest()[:10]
        name = f'{name[:120]}-{digest}'
    return name


def check_overrides(run_dir: str, overrides: Mapping[str, Any]) -> None:
    """Records the point a run folder holds; a folder holding another point is an error."""
    path = os.path.join(run_dir, OVERRIDES_FILE)
    wanted = workdir_lib.json_safe(dict(overrides))
    if os.path.exists(path):
        found = workdir_lib.read_json_object(path)
        if found is None:
            raise SearchError(f'{path} is not a JSON object; remove it or the folder')
        if found != json.loads(json.dumps(wanted)):
            raise SearchError(
                f'{run_dir} holds the point {found}, not {wanted}; move it away to train here'
            )
        return
    os.makedirs(run_dir, exist_ok=True)
    workdir_lib.write_json(path, wanted)


def apply_overrides(
    base: ml_collections.ConfigDict, overrides: Mapping[str, Any]
) -> ml_collections.ConfigDict:
    """A validated copy of ``base`` with ``overrides`` set (``ConfigError`` if invalid)."""
    config = ml_collections.ConfigDict(base.to_dict())
    for field, value in overrides.items():
        try:
            validation.set_field(config, field, value)
        except TypeError as e:
            raise validation.ConfigError(f'{field}={value!r}: {e}') from None
    validation.validate_config(config)
    return config


def sample(trial: Any, params: Sequence[Param], base: ml_collections.ConfigDict) -> dict[str, Any]:
    """The trial's overrides: unconditional fields first, then those whose ``when`` holds."""
    overrides: dict[str, Any] = {}
    for p in sorted(params, key=lambda p: p.when is not None):
        if p.when is not None:
            field, value = p.when
            current = overrides.get(field, validation.get_field(base, field))
            if current != value:
                continue
        overrides[p.name] = p.suggest(trial)
    return overrides


# ------------------------------------------------------------------ study ----


def redact(url: str) -> str:
    """A storage URL without its password."""
    if '@' not in url:
        return url
    from sqlalchemy.engine import make_url  # pylint: disable=g-import-not-at-top

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # pylint: disable=broad-except  # Unparsable: hide what may be secret.
        return url.split('://', 1)[0] + '://***'


def storage_url(spec_storage: str, workdir: str) -> str:
    """The storage URL of a study; '' is ``workdir/study.db``."""
    if spec_storage:
        return spec_storage
    return 'sqlite:///' + os.path.abspath(os.path.join(workdir, STUDY_DB))


def open_storage(url: str, spec: Spec) -> Any:
    """An Optuna RDB storage with heartbeats; :class:`SearchError` if unreachable."""
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
        raise SearchError(f'cannot open the study storage {redact(url)}: {message}') from None


def make_sampler(spec: Spec) -> Any:
    import optuna  # pylint: disable=g-import-not-at-top

    if spec.sampler == 'tpe':
        return optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=spec.startup_trials)
    # A grid's points are all enqueued (each exactly once): its sampler is never asked.
    return optuna.samplers.RandomSampler(seed=spec.seed)


def make_pruner(spec: Spec) -> Any:
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


def _study_key(spec: Spec) -> dict[str, Any]:
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


def open_study(spec: Spec, workdir: str) -> Any:
    """Creates or joins the study of ``workdir``; enqueues a grid's points once."""
    import optuna  # pylint: disable=g-import-not-at-top

    url = storage_url(spec.storage, workdir)
    os.makedirs(workdir, exist_ok=True)
    with claim_lock(workdir):
        storage = open_storage(url, spec)
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
            raise SearchError(f'cannot open study {spec.study_name!r} in {redact(url)}: {e}') from None
        key = _study_key(spec)
        recorded = study.user_attrs.get('spec')
        if recorded is None:
            study.set_user_attr('spec', key)
        elif recorded != key:
            differ = sorted(k for k in set(key) | set(recorded) if key.get(k) != recorded.get(k))
            raise SearchError(
                f'the study {spec.study_name!r} in {redact(url)} was started with another '
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


def _requeue_lost(study: Any, spec: Spec, workdir: str) -> None:
    """Enqueues again the grid points that ended but whose run folder lost its result.

    (A folder deleted or cut back by hand, to be trained again.) Points with a
    waiting or running trial are left to it.
    """
    from optuna.trial import TrialState  # pylint: disable=g-import-not-at-top

    active = {TrialState.WAITING, TrialState.RUNNING}
    trials = study.get_trials(deepcopy=False)
    for point in spec.grid:
        mine = [t for t in trials if t.params == point or t.system_attrs.get('fixed_params') == point]
        if any(t.state in active for t in mine):
            continue
        name = folder_name(point)
        probe = _Point(None, dict(point), name, os.path.join(workdir, name))
        try:
            probe.config = apply_overrides(spec.base, point)
        except validation.ConfigError:
            continue
        if _finished(probe) is None:
            logger.info('%s has no finished run: queued again', name)
            study.enqueue_trial(dict(point))


def _grid_order(spec: Spec) -> list[dict[str, Any]]:
    """A grid's points, those that train together (``vectorize``) next to each other."""
    if not spec.vectorize:
        return list(spec.grid)
    from resnet_jax import loop  # pylint: disable=g-import-not-at-top  # Heavy.

    keys = [loop.group_key(apply_overrides(spec.base, p)) for p in spec.grid]
    first = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    order = sorted(range(len(spec.grid)), key=lambda i: (first[keys[i]], i))
    return [spec.grid[i] for i in order]


# ---------------------------------------------------------------- workers ----


def _counted(trial: Any) -> bool:
    """Whether a trial uses up one of ``num_trials``: all but stale ones (retried)."""
    from optuna.trial import TrialState  # pylint: disable=g-import-not-at-top

    return trial.state != TrialState.FAIL or 'run_status' in trial.user_attrs


def claim(study: Any, spec: Spec) -> list[Any]:
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
    first = study.ask()
    claimed = [first]
    if spec.vectorize and spec.grid and waiting:
        from resnet_jax import loop  # pylint: disable=g-import-not-at-top  # Heavy.

        key = loop.group_key(apply_overrides(spec.base, first.params))
        for t in waiting[1:]:
            if t.number == first.number:
                continue
            if loop.group_key(apply_overrides(spec.base, t.params)) != key:
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


def _prepare(trial: Any, spec: Spec, workdir: str) -> _Point:
    overrides = sample(trial, spec.params, spec.base)
    name = folder_name(overrides)
    point = _Point(trial, overrides, name, os.path.join(workdir, name))
    trial.set_user_attr('run', name)
    try:
        point.config = apply_overrides(spec.base, overrides)
        check_overrides(point.run_dir, overrides)
    except validation.ConfigError as e:
        point.error = f'{name}: {e}'
    return point


def _finished(point: _Point) -> dict[str, Any] | None:
    """The summary of a run folder that already finished this config, if any.

    Completed means trained to this config's ``num_epochs`` (a larger one resumes
    the run); fields that do not change a run's result may differ.
    """
    summary = workdir_lib.read_json_object(os.path.join(point.run_dir, workdir_lib.SUMMARY_FILE))
    if not summary or not isinstance(summary.get('config'), dict):
        return None
    status = summary.get('status')
    if status not in ('completed', 'pruned', 'diverged'):
        return None
    if workdir_lib.config_differences(summary['config'], workdir_lib.config_json(point.config)):
        return None
    if status == 'completed' and summary.get('epochs_completed') != point.config.num_epochs:
        return None
    return summary


def _epoch_callback(point: _Point, spec: Spec) -> Callable[[dict[str, Any]], bool]:
    def on_epoch(record: dict[str, Any]) -> bool:
        value = record.get(spec.metric)
        if not _is_number(value):
            return False
        point.trial.report(float(value), int(record['epoch']))
        if int(record['epoch']) >= point.config.num_epochs:
            return False  # Trained to the end: completed, whatever the pruner says.
        return point.trial.should_prune()

    return on_epoch


def _tell(study: Any, point: _Point, summary: Mapping[str, Any] | None, spec: Spec) -> None:
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
    if status == 'completed' and _is_number(value):
        study.tell(trial, float(value))
    elif status == 'pruned':
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, state=TrialState.FAIL)
    logger.info('trial %d %s: %s%s', trial.number, point.name, status,
                f' ({spec.metric} {value:.4f})' if _is_number(value) else '')


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


def train_points(study: Any, points: list[_Point], spec: Spec) -> None:
    """Trains claimed trials (together if more than one) and tells the study their outcome."""
    from resnet_jax import loop  # pylint: disable=g-import-not-at-top  # Heavy.

    summaries: list[dict[str, Any] | None] = [None] * len(points)
    todo = []
    for i, point in enumerate(points):
        if point.error:
            logger.error('trial %d: %s', point.trial.number, point.error)
            _record_failure(point, point.error)
            summaries[i] = {'status': 'failed', 'error': point.error}
        elif (done := _finished(point)) is not None:
            logger.info('trial %d %s: already %s, not trained again', point.trial.number,
                        point.name, done['status'])
            for record in _records(point.run_dir):
                _epoch_callback(point, spec)(record)
            summaries[i] = done
        else:
            todo.append(i)
    if todo:
        group = [points[i] for i in todo]
        for point in group:
            logger.info('trial %d %s: training', point.trial.number, point.name)
        try:
            _, results = loop.train_runs(
                [p.config for p in group],
                [p.run_dir for p in group],
                on_epoch=[_epoch_callback(p, spec) for p in group],
            )
        except workdir_lib.WorkdirBusy as e:
            results = [{'status': 'failed', 'error': f'busy: {e}'} for _ in group]
        except Exception as e:  # pylint: disable=broad-except  # Record it and go on.
            bad_input = isinstance(e, (validation.ConfigError, datasets.DataError))
            message = str(e) if bad_input else f'{type(e).__name__}: {e}'
            if bad_input:
                logger.error('trial %s failed: %s', group[0].name, message)
            else:
                logger.exception('trial %s failed: %s', group[0].name, message)
            results = [{'status': 'failed', 'error': message} for _ in group]
            for p in group:
                _record_failure(p, message)
        except BaseException:  # Interrupted: checkpoints are saved; the trials wait for a worker.
            _requeue(study, group)
            raise
        for i, result in zip(todo, results, strict=True):
            summaries[i] = result
    for point, summary in zip(points, summaries, strict=True):
        _tell(study, point, summary, spec)


def _records(run_dir: str) -> list[dict[str, Any]]:
    from resnet_jax import writers  # pylint: disable=g-import-not-at-top

    return writers.read_metrics(run_dir)


def _others_running(study: Any) -> bool:
    from optuna.trial import TrialState  # pylint: disable=g-import-not-at-top

    return any(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False))


def run_worker(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
    """Joins the study of ``config`` in ``workdir`` and trains trials until none is left.

    Waits while other workers' trials run (a trial whose worker dies is retried
    once its heartbeat is stale), then writes the report. Returns the status of
    each run this worker ended, by folder name.
    """
    import optuna  # pylint: disable=g-import-not-at-top

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = spec_from_config(config)
    study = open_study(spec, workdir)
    worker = f'{socket.gethostname()}:{os.getpid()}'
    logger.info(
        'study %r (%s sampler, %s pruner, %s %s) in %s; worker %s',
        spec.study_name, spec.sampler, spec.pruner, spec.direction, spec.metric,
        redact(storage_url(spec.storage, workdir)), worker,
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
    write_report(workdir)
    return statuses


def write_report(workdir: str) -> dict[str, str]:
    """Writes the study's report; a failure to plot is a warning, not an error."""
    from resnet_jax import search_report  # pylint: disable=g-import-not-at-top

    paths: dict[str, str] = {}
    if os.path.exists(os.path.join(workdir, sweep_lib.MANIFEST_FILE)):
        paths.update(sweep_lib.write_report(workdir))
    try:
        paths.update(search_report.write_report(workdir))
    except ImportError as e:
        logger.warning('search report not written: %s', e)
    for kind, path in paths.items():
        logger.info('report %s: %s', kind, path)
    return paths
