"""A run's workdir: what it holds, atomic JSON writes, a lock against two writers.

    with workdir.lock(path):          # raises WorkdirBusy if another process holds it
        workdir.prepare(path, config, overwrite=False)   # refuses another config's run
        workdir.write_json(os.path.join(path, 'summary.json'), summary)

A workdir holds one run: ``config.json``, ``metrics.jsonl``, ``summary.json``,
TensorBoard event files and ``checkpoints/``. Rerunning the same config resumes
it; a different config is refused (see :data:`RESUMABLE_CHANGES`) unless the
run is overwritten.

The lock is a lease (:func:`resnet_jax.rundir.locks.lock`). JSON
is written strictly: NaN and infinities become ``null`` (see :func:`json_safe`).

Files read back (``summary.json``, ``config.json``, ``sweep.json``, and through
:func:`read_object` a study's ``search.json`` and a run folder's ``overrides.json``)
go through checked readers that raise :class:`RecordError` naming the file when one is
malformed. A workdir's files are replaced or deleted only when they are this
tool's own (:func:`foreign_files`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

from resnet_jax.validation import ConfigError

# The files of a run's workdir and of a sweep's workdir.
CONFIG_FILE = 'config.json'
SUMMARY_FILE = 'summary.json'
METRICS_FILE = 'metrics.jsonl'
MANIFEST_FILE = 'sweep.json'
CHECKPOINT_DIR = 'checkpoints'
# The outputs of a run, removed by ``overwrite=True`` (with its TensorBoard files).
RUN_OUTPUTS = (CHECKPOINT_DIR, METRICS_FILE, SUMMARY_FILE, CONFIG_FILE)
# Fields that may change when a run is resumed: they do not change its result.
RESUMABLE_CHANGES = (
    'num_epochs',
    'eval_batch_size',
    'eval_test',  # When the test set is evaluated, not what is trained.
    'checkpoint_every_epochs',
    'keep_checkpoints',
    'progress_every_seconds',
    'check_finite_every_steps',
    'steps_per_call',
    'data.path',
    'data.download',
    'distributed.*',  # How many processes train it, and where they meet.
)
# Fields added after runs were first recorded, with the value a run recorded
# without them had in effect: such a run resumes under a config that sets them so.
ADDED_FIELDS = {'data.validation_size': 0, 'data.validation_seed': 0}
# Fields every run config of this tool has: a config.json without them is not ours.
_RUN_CONFIG_FIELDS = ('model', 'optimizer', 'learning_rate', 'batch_size', 'seed', 'data')
# The statuses a run's summary.json may hold.
RUN_STATUSES = ('completed', 'incomplete', 'failed', 'diverged', 'pruned')
EVENTS_PREFIX = 'events.out.tfevents.'


class RecordError(ValueError):
    """A file this tool reads back is malformed; the message names the file."""


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None (JSON ``null``).

    ``json.dumps`` would write them as bare ``NaN``/``Infinity``, which strict
    JSON parsers reject.
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """Strict JSON text of ``obj`` (non-finite floats as ``null``)."""
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)


def write_json(path: str, obj: Any) -> None:
    """Writes ``obj`` as strict JSON, atomically."""
    write_atomic(path, dumps(obj, indent=2, sort_keys=True) + '\n')


def write_atomic(path: str, data: bytes | str) -> None:
    """Writes ``path`` via a unique temporary file in its dir and ``os.replace``.

    Readers never see a torn file, and concurrent writers of the same file
    (two workers writing the report) do not collide.
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            dir=directory, prefix=f'.{os.path.basename(path)}.', suffix='.tmp'
        )
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), path) from None
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())  # On disk before it replaces the old file.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if isinstance(e, OSError):  # Disk full, ...: name the file, not the temporary one.
            raise OSError(e.errno, e.strerror or str(e), path) from None
        raise


def read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def read_json_object(path: str) -> dict[str, Any] | None:
    """A JSON object file, or None when it is missing, unreadable or (being) written badly."""
    try:
        obj = read_json(path)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _number(x: Any) -> bool:
    return x is None or (isinstance(x, (int, float)) and not isinstance(x, bool))


def _passes(value: Any, kind: Any) -> bool:
    """Whether ``value`` is of type ``kind`` (a bool is no int), or passes the check ``kind``."""
    if isinstance(kind, type):
        return isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    return bool(kind(value))


def _check_fields(path: str, obj: Any, kinds: Mapping[str, Any]) -> dict[str, Any]:
    """``obj`` if it is a JSON object whose fields (when present) pass ``kinds``'
    checks (a type, or a predicate); else :class:`RecordError` naming ``path``."""
    if not isinstance(obj, dict):
        raise RecordError(f'{path} holds a {type(obj).__name__}, not a JSON object')
    for key, kind in kinds.items():
        if key in obj and not _passes(obj[key], kind):
            raise RecordError(f'{path}: field {key!r} has the wrong type ({obj[key]!r})')
    return obj


def read_checked_json(path: str) -> Any:
    """Parsed JSON of ``path``; :class:`RecordError` naming it if it is not JSON."""
    try:
        return read_json(path)
    except UnicodeDecodeError as e:
        raise RecordError(f'{path} is not a JSON file ({e.reason})') from None
    except ValueError as e:
        raise RecordError(f'{path} is not valid JSON ({e})') from None


def read_object(
    path: str, kinds: Mapping[str, Any], needed: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The JSON object of ``path`` with every field of ``kinds`` (a type or a check)
    of the right type and every ``needed`` field present; else :class:`RecordError`
    naming the file (also when it is missing or not JSON)."""
    if not os.path.exists(path):
        raise RecordError(f'{path} is missing')
    return check_object(path, read_checked_json(path), kinds, needed)


def check_object(
    path: str, obj: Any, kinds: Mapping[str, Any], needed: tuple[str, ...] = ()
) -> dict[str, Any]:
    """``obj`` (read from ``path``) checked as :func:`read_object` checks a file."""
    obj = _check_fields(path, obj, kinds)
    missing = [k for k in needed if k not in obj]
    if missing:
        raise RecordError(f'{path} lacks the field(s) {", ".join(missing)}')
    return obj


def int_at_least(low: int) -> Any:
    """A check of a JSON value: an int (not a bool) of at least ``low``."""
    return lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= low


# What a run config of this tool holds, field by field.
_CONFIG_KINDS = {
    'model': str,
    'optimizer': str,
    'learning_rate': _number,
    'batch_size': int_at_least(1),
    'num_epochs': int_at_least(1),
    'seed': int,
    'data': dict,
}
# What a run's summary.json holds (fields written by the training loop).
_SUMMARY_KINDS = {
    'status': lambda x: x in RUN_STATUSES,
    'epochs_completed': int_at_least(0),
    **dict.fromkeys(
        ('best_epoch', 'best_val_epoch', 'pruned_at_epoch'),
        lambda x: x is None or int_at_least(0)(x),
    ),
    **dict.fromkeys(
        ('train_loss', 'train_accuracy', 'test_loss', 'test_accuracy', 'best_test_accuracy')
        + ('val_loss', 'val_accuracy', 'best_val_accuracy'),
        _number,
    ),
    'wall_seconds': _number,
    'num_params': int,
    'config': dict,
    'data': dict,
    'error': lambda x: x is None or isinstance(x, str),
    'versions': dict,
    'layout': dict,  # Absent in summaries written before it was recorded.
}


def check_run_config(path: str, obj: Any, whole: bool = True) -> dict[str, Any]:
    """``obj`` (parsed ``path``) if its fields have the right types and, if
    ``whole``, it has every field of a run config (:func:`is_run_config`)."""
    obj = _check_fields(path, obj, _CONFIG_KINDS)
    if whole and not is_run_config(obj):
        raise RecordError(f'{path} is not the config of a resnet_jax run')
    return obj


def read_run_config(path: str, whole: bool = True) -> dict[str, Any]:
    """A run's ``config.json``, checked (:class:`RecordError` naming it if malformed;
    see :func:`check_run_config`)."""
    return check_run_config(path, read_checked_json(path), whole)


def read_summary(path: str) -> dict[str, Any] | None:
    """A run's ``summary.json``, checked; None if there is none.

    :class:`RecordError` names the file when it is not JSON, or a field has the
    wrong type (a status this tool does not write, ``"epochs_completed": "x"``).
    """
    if not os.path.exists(path):
        return None
    summary = _check_fields(path, read_checked_json(path), _SUMMARY_KINDS)
    if 'config' in summary:
        _check_fields(path, summary['config'], _CONFIG_KINDS)
    return summary


def read_manifest(path: str) -> dict[str, Any]:
    """A sweep's ``sweep.json`` with ``axes``, ``runs`` (each a ``name`` and its
    ``overrides``) and ``base_config``, checked (:class:`RecordError` naming it)."""
    manifest = {'axes': {}, 'runs': [], 'base_config': {}} | _check_fields(
        path, read_checked_json(path), {'axes': dict, 'runs': list, 'base_config': dict}
    )
    for values in manifest['axes'].values():
        if not isinstance(values, list):
            raise RecordError(f'{path}: every axis must be a list of values, got {values!r}')
    for run in manifest['runs']:
        if not isinstance(run, dict):
            raise RecordError(f'{path}: every run must be an object, got {run!r}')
        name = run.get('name')
        if not isinstance(name, str) or not name or name in ('.', '..') or os.sep in name:
            raise RecordError(f'{path}: a run has no usable folder name ({name!r})')
        if not isinstance(run.get('overrides', {}), dict):
            raise RecordError(f'{path}: the overrides of run {name} are not an object')
    return manifest


def config_json(config: Any) -> Any:
    """A ConfigDict as plain JSON data, as it is stored in a workdir."""
    return json.loads(config.to_json())


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
    """``{'data': {'path': p}}`` -> ``{'data.path': p}``."""
    from flax import traverse_util  # pylint: disable=g-import-not-at-top  # Keeps this module light.

    return traverse_util.flatten_dict(dict(tree), sep='.')


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``'field: old -> new'`` for each field that differs, resumable ones excluded."""
    a, b = flatten(old), flatten(new)
    for k, value in ADDED_FIELDS.items():
        for tree in (a, b):
            tree.setdefault(k, value)
    allowed = set(RESUMABLE_CHANGES)
    if b.get('schedule') == 'cosine':  # Its shape depends on the run's length.
        allowed.discard('num_epochs')
    return [
        f'{k}: {a.get(k, "(absent)")!r} -> {b.get(k, "(absent)")!r}'
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
        and k not in allowed
        and not any(p.endswith('.*') and k.startswith(p[:-1]) for p in allowed)
    ]


def is_run_config(obj: Any) -> bool:
    """Whether ``obj`` (a workdir's parsed config.json) is a run config of this tool."""
    return isinstance(obj, Mapping) and all(k in obj for k in _RUN_CONFIG_FIELDS)


def check_writable(workdir: str) -> None:
    """Creates ``workdir`` if need be; :class:`ConfigError` if it cannot be written."""
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.TemporaryFile(dir=workdir):
            pass
    except OSError as e:
        raise ConfigError(f'workdir {workdir} is not writable: {e.strerror or e}') from None


def is_own_summary(summary: Any) -> bool:
    """Whether ``summary`` (a parsed summary.json) is one this tool writes for a run."""
    return (
        isinstance(summary, Mapping)
        and summary.get('status') in RUN_STATUSES
        and is_run_config(summary.get('config'))
    )


def foreign_files(workdir: str) -> list[str]:
    """The run outputs in ``workdir`` that this tool cannot tell are its own.

    Without this tool's ``config.json`` (it is written before anything else of
    a run), checkpoints, ``metrics.jsonl`` and TensorBoard files were written by
    something else; so was a ``summary.json`` that is not a run summary (a
    sweep records a run that failed before it started in a summary alone).
    An empty ``checkpoints/`` may be this tool's, from a run killed at its start.
    """
    if os.path.exists(os.path.join(workdir, CONFIG_FILE)) or not os.path.isdir(workdir):
        return []
    found = []
    checkpoints = os.path.join(workdir, CHECKPOINT_DIR)
    if os.path.isdir(checkpoints):
        if any('.orbax-checkpoint-tmp' not in name for name in os.listdir(checkpoints)):
            found.append(CHECKPOINT_DIR + os.sep)
    elif os.path.lexists(checkpoints):
        found.append(CHECKPOINT_DIR)
    if os.path.lexists(os.path.join(workdir, METRICS_FILE)):
        found.append(METRICS_FILE)
    summary = os.path.join(workdir, SUMMARY_FILE)
    if os.path.lexists(summary) and not is_own_summary(read_json_object(summary)):
        found.append(SUMMARY_FILE)
    found += sorted(n for n in os.listdir(workdir) if n.startswith(EVENTS_PREFIX))
    return found


# The fields of an epoch record and the checks of their values.
RECORD_NUMBERS = (
    'train_loss',
    'train_accuracy',
    'test_loss',
    'test_accuracy',
    'val_loss',
    'val_accuracy',
    'learning_rate',
    'epoch_seconds',
    'images_per_second',
    'compile_seconds',  # Only in the first epoch a start trained (absent in older records).
)


def check_record(record: Any, where: str) -> dict[str, Any]:
    """``record`` if it is an epoch record (``epoch`` an int >= 1, every metric a
    number or null); else :class:`RecordError` naming ``where``."""
    if not isinstance(record, dict):
        raise RecordError(f'{where}: not a JSON object but {type(record).__name__}')
    epoch = record.get('epoch')
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
        raise RecordError(f'{where}: "epoch" must be an integer >= 1, not {epoch!r}')
    for key in RECORD_NUMBERS:
        value = record.get(key)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise RecordError(f'{where}: {key!r} must be a number, not {value!r}')
    return record


def parse_metrics(path: str) -> tuple[list[dict[str, Any]], bool]:
    """``(records by epoch, whether the file needs rewriting)`` of ``metrics.jsonl``.

    A last line that is not JSON was torn by a kill during its write: it is
    left out (and the file needs rewriting). Any other bad line is a
    :class:`RecordError` naming the file and line.
    """
    by_epoch: dict[int, dict[str, Any]] = {}
    try:
        with open(path, 'rb') as f:
            lines = f.read().split(b'\n')
    except OSError as e:
        raise RecordError(f'cannot read {path}: {e.strerror or e}') from None
    if lines and not lines[-1]:
        lines.pop()  # The file ends with a newline, as written.
    dirty = False
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:  # UnicodeDecodeError included.
            if number == len(lines):
                dirty = True
                continue
            raise RecordError(f'{path} line {number} is not a JSON record') from None
        record = check_record(record, f'{path} line {number}')
        dirty = dirty or record['epoch'] in by_epoch
        by_epoch[record['epoch']] = record
    return [by_epoch[e] for e in sorted(by_epoch)], dirty


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The records of ``workdir/metrics.jsonl``, one per epoch in epoch order.

    Tolerates a file being appended to or cut by a kill: a torn last line is
    skipped, and of two records of the same epoch the later one is kept. A
    malformed record raises :class:`RecordError` naming the file and line.
    Empty if there is no file.
    """
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.isfile(path):
        return []
    return parse_metrics(path)[0]


def epochs_done(workdir: str) -> int:
    """How many epochs the run in ``workdir`` has recorded (its records and summary
    checked: :class:`RecordError` names a malformed one)."""
    records = read_metrics(workdir)
    summary = read_summary(os.path.join(workdir, SUMMARY_FILE)) or {}
    return max(records[-1]['epoch'] if records else 0, summary.get('epochs_completed') or 0)


def prepare(workdir: str, config: Any, overwrite: bool) -> None:
    """Refuses a workdir holding another config's run, or clears it on request.

    Only this tool's own files are ever replaced or deleted: a ``config.json``
    that is not a run config of this tool, or run outputs without one
    (:func:`foreign_files`), are refused, even with ``overwrite``. The records
    and summary of the run are checked before anything is written. The config
    itself is written by :func:`write_config` once the run's checkpoint has
    been read.
    """
    path = os.path.join(workdir, CONFIG_FILE)
    if os.path.exists(path) and not is_run_config(read_json_object(path)):
        raise ConfigError(
            f'{path} exists and is not the config of a resnet_jax run; choose another '
            '--workdir (nothing was changed)'
        )
    foreign = foreign_files(workdir)
    if foreign:
        raise ConfigError(
            f'{workdir} holds {", ".join(foreign)} but no {CONFIG_FILE}: files resnet_jax did '
            'not write, which it never replaces or deletes; choose another --workdir '
            '(nothing was changed)'
        )
    if overwrite:
        if os.path.exists(path):
            read_run_config(path)  # Ours, but readable? Else say which file is broken.
        for name in RUN_OUTPUTS:
            target = os.path.join(workdir, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            elif os.path.exists(target):
                os.remove(target)
        for name in os.listdir(workdir):
            if name.startswith(EVENTS_PREFIX):
                os.remove(os.path.join(workdir, name))
        return
    done = epochs_done(workdir)
    if os.path.exists(path) and (
        os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR))
        or os.path.exists(os.path.join(workdir, METRICS_FILE))
    ):
        diffs = config_differences(read_run_config(path), config_json(config))
        if diffs:
            raise ConfigError(
                f'{workdir} holds a run of a different config ({"; ".join(diffs)}); rerun '
                'with --overwrite to replace it, or --new_run to train into a new workdir'
            )
    if done > config.num_epochs:
        raise ConfigError(
            f'{workdir} holds a run trained for {done} epochs, more than num_epochs='
            f'{config.num_epochs}; nothing was changed (extend it with num_epochs >= {done}, '
            'or train into another --workdir)'
        )


def write_config(workdir: str, config: Any) -> None:
    """Records ``config`` as the workdir's run config (``config.json``)."""
    write_json(os.path.join(workdir, CONFIG_FILE), config_json(config))
