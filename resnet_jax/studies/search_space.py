"""Search spaces and study specs: what a ``search`` (or ``sweep``) section asks for.

The pure part of a study (:mod:`resnet_jax.studies.search`), without Optuna or JAX: the entries of
``config.search.space`` (:func:`float_param`, :func:`int_param`,
:func:`categorical`, each with an optional ``when=(field, value)``), their
checks, the :class:`Spec` of a study (:func:`spec_from_config`; a ``sweep``
section is a grid, :func:`spec_from_sweep`) and the point a trial samples
(:func:`sample`; the config it trains: :func:`run_folders.apply_overrides`).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from resnet_jax import validation
from resnet_jax.rundir import workdir as workdir_lib
from resnet_jax.studies import samplers
from resnet_jax.studies import sweep as sweep_lib
from resnet_jax.training import checks


class SearchError(validation.ConfigError):
    """A bad search config or an unreachable storage (one line for the user)."""


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
                raise SearchError(
                    f'{where}.choices holds {choice!r}: only numbers, strings, booleans'
                )
        return Param(name, kind, choices=tuple(choices), when=when)
    low, high, log = node.get('low'), node.get('high'), node.get('log', False)
    if not validation.is_finite_number(low) or not validation.is_finite_number(high):
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
                f'config.search.space.{prefix}{key} must be a search_space.float_param/int_param/'
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
    storage_retry_seconds: float = 60.0
    grid: tuple[dict[str, Any], ...] = ()  # Every point of a grid, in enqueue order.
    from_sweep: bool = False
    # The other config.search options the sampler and the pruner declare (their own).
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def direction(self) -> str:
        return METRICS[self.metric]

    def describe(self) -> dict[str, Any]:
        """The study as recorded in ``search.json`` (the storage URL without a password).

        ``options`` only when the sampler or pruner declares options of its own
        (the shipped ones do not), so that the key of a study is what it always was.
        """
        own = {'options': dict(self.options)} if self.options else {}
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
            **own,
            'storage': redact(self.storage),
            'study_name': self.study_name,
            'vectorize': self.vectorize,
            'grid': list(self.grid),
            'from_sweep': self.from_sweep,
            'base_config': workdir_lib.config_json(self.base),
        }


def _list_of_objects(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, dict) for v in value)


# What ``search.json`` (:meth:`Spec.describe`) holds, field by field, for its checked reader.
DESCRIPTION_KINDS = {
    'params': _list_of_objects,
    'num_trials': int,
    'metric': str,
    'direction': lambda x: x in ('maximize', 'minimize'),
    'min_epochs': int,
    'storage': str,
    'study_name': str,
    'grid': _list_of_objects,
    'from_sweep': bool,
    'base_config': dict,
}
DESCRIPTION_NEEDED = (
    'params',
    'metric',
    'direction',
    'study_name',
    'storage',
    'base_config',
    'grid',
)


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
    'study_name': '',  # '': the name recorded in the workdir, else the workdir's name.
    'heartbeat_seconds': 30,
    'grace_seconds': 120,
    'poll_seconds': 5.0,
    'vectorize': False,
    # How long a worker retries a storage that does not answer before it stops.
    'storage_retry_seconds': 60.0,
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


def is_study(config: ml_collections.ConfigDict) -> bool:
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
    _check_known(section)
    options = {k: section.get(k, v) for k, v in SEARCH_DEFAULTS.items()}
    _check_options(options)
    own = _entry_options(section, options)
    params = parse_space(section.get('space', ml_collections.ConfigDict()))
    if not params:
        raise SearchError('config.search.space is empty: name at least one field to search')
    base = ml_collections.ConfigDict(config.to_dict())
    del base['search']
    checks.validate_config(base)  # What every trial shares is checked once, up front.
    _check_fields(params, base)
    grid: tuple[dict[str, Any], ...] = ()
    if options['sampler'] == samplers.GRID:
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
    _resolve_eval_test(base, options['metric'], options['pruner'])
    spec = Spec(params=tuple(params), base=base, grid=grid, options=own, **options)
    _check_metric(spec)
    _check_min_epochs(spec)
    return spec


def _check_known(section: ml_collections.ConfigDict) -> None:
    """Every option is a shipped one or one that a registered sampler or pruner reads."""
    known = (*_OPTIONS, *(f for f in samplers.declared_fields() if f not in _OPTIONS))
    unknown = sorted(set(section.keys()) - set(known))
    if unknown:
        raise SearchError(f'config.search has no option {unknown[0]}; options: {", ".join(known)}')


def _entry_options(section: ml_collections.ConfigDict, options: dict[str, Any]) -> dict[str, Any]:
    """The chosen sampler's and pruner's own options (beyond the shipped ones), checked."""
    try:
        read = samplers.read_options({k: section[k] for k in section if k != 'space'} | options)
    except validation.ConfigError as e:
        raise SearchError(str(e)) from None
    return {k: v for k, v in read.items() if k not in SEARCH_DEFAULTS}


def _check_options(options: dict[str, Any]) -> None:
    def check_int(name: str, minimum: int) -> None:
        value = options[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise SearchError(
                f'config.search.{name} must be an integer >= {minimum}, got {value!r}'
            )

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
    retry = options['storage_retry_seconds']
    if not validation.is_finite_number(retry) or retry < 0:
        raise SearchError(f'config.search.storage_retry_seconds must be >= 0, got {retry!r}')
    if not validation.is_finite_number(options['poll_seconds']) or options['poll_seconds'] <= 0:
        raise SearchError(
            f'config.search.poll_seconds must be > 0, got {options["poll_seconds"]!r}'
        )
    for name, choices in (
        ('sampler', samplers.SAMPLERS.names()),
        ('pruner', samplers.PRUNERS.names()),
        ('metric', tuple(METRICS)),
    ):
        if options[name] not in choices:
            raise SearchError(
                f'config.search.{name}={options[name]!r} is unknown; choose one of '
                f'{", ".join(choices)}'
            )
    for name in ('storage', 'study_name'):
        if not isinstance(options[name], str):
            raise SearchError(f'config.search.{name} must be a string, got {options[name]!r}')
    if not isinstance(options['vectorize'], bool):
        raise SearchError(
            f'config.search.vectorize must be True or False, got {options["vectorize"]!r}'
        )


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


def _resolve_eval_test(base: ml_collections.ConfigDict, metric: str, pruner: str) -> None:
    """Sets ``base.eval_test`` for the trials: 'auto' is 'end' when the study selects on
    a validation metric (the test set is then evaluated once per trial, when it ends),
    else 'every_epoch'. 'end' with a test metric that a pruner reads every epoch is a
    :class:`SearchError`."""
    selects_on_test = not metric.startswith('val_')
    value = base.get('eval_test', 'auto')
    if value == 'auto':
        base.eval_test = 'every_epoch' if selects_on_test else 'end'
    elif value == 'end' and selects_on_test and pruner != 'none':
        raise SearchError(
            f"config.eval_test='end' evaluates the test set only when a trial ends, but the "
            f'study selects on {metric}, which the pruner reads every epoch: choose a val_ '
            "metric or config.eval_test='every_epoch'"
        )


def _check_metric(spec: Spec) -> None:
    if spec.metric.startswith('val_') and not spec.base.data.get('validation_size', 0):
        raise SearchError(
            f'config.search.metric={spec.metric} needs a validation split: set '
            'config.data.validation_size > 0 (or choose a test_ metric, which selects on '
            'the test set)'
        )


def _check_min_epochs(spec: Spec) -> None:
    """``min_epochs`` is an epoch some trial trains (the most any trial can draw), when
    the pruner reads it."""
    if 'min_epochs' not in samplers.PRUNERS.fields(spec.pruner):
        return
    most = spec.base.num_epochs
    for p in spec.params:
        if p.name == 'num_epochs':
            most = max(p.choices) if p.type == 'categorical' else p.high
    if spec.min_epochs > most:
        raise SearchError(
            f'config.search.min_epochs={spec.min_epochs} is larger than num_epochs={most}: '
            'the pruner would never see that epoch'
        )


def spec_from_sweep(config: ml_collections.ConfigDict) -> Spec:
    """A ``sweep`` section as a grid study: every point once, the sweep's run names.

    It selects on ``val_accuracy`` with a validation split, else (the paper's way)
    on ``test_accuracy``.
    """
    points = sweep_lib.expand(config)
    base = sweep_lib.base_config(config)
    options = config.sweep
    metric = 'val_accuracy' if base.data.get('validation_size', 0) else 'test_accuracy'
    axes = sweep_lib.axes(config)
    _resolve_eval_test(base, metric, 'none')
    params = tuple(
        Param(name, 'categorical', choices=tuple(values)) for name, values in axes.items()
    )
    return Spec(
        **dict(
            SEARCH_DEFAULTS,
            num_trials=len(points),
            sampler='grid',
            metric=metric,
            vectorize=bool(options.get('vectorize', False)),
        ),
        params=params,
        base=base,
        grid=tuple(point.overrides for point in points),
        from_sweep=True,
    )


# ----------------------------------------------------------------- points ----


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


def redact(url: str) -> str:
    """A storage URL without its password."""
    if '@' not in url:
        return url
    from sqlalchemy.engine import make_url  # pylint: disable=g-import-not-at-top

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # pylint: disable=broad-except  # Unparsable: hide what may be secret.
        return url.split('://', 1)[0] + '://***'
