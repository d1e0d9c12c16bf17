"""A run's workdir: what it holds, atomic JSON writes, a lock against two writers.

    with workdir.lock(path):          # raises WorkdirBusy if another process holds it
        workdir.prepare(path, config, overwrite=False)   # refuses another config's run
        workdir.write_json(os.path.join(path, 'summary.json'), summary)

A workdir holds one run: ``config.json``, ``metrics.jsonl``, ``summary.json``,
TensorBoard event files and ``checkpoints/``. Rerunning the same config resumes
it; a different config is refused (see :data:`RESUMABLE_CHANGES`) unless the
run is overwritten.

The lock is a file holding the owner's host and process id, linked into place
whole; a lock left by a dead process of this host, or an empty or unreadable
one, is taken over. JSON is written strictly: NaN and infinities become
``null`` (see :func:`json_safe`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

from resnet_jax.validation import ConfigError

LOCK_FILE = '.lock'
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


class WorkdirBusy(RuntimeError):
    """Another live process is writing into the same workdir."""


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
    (two sweep shards writing the report) do not collide.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())  # On disk before it replaces the old file.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
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


def _owner() -> str:
    return f'{socket.gethostname()} {os.getpid()}'


def _stale(text: str) -> bool:
    """A lock nobody holds: of a dead process on this host, empty, or unreadable.

    Locks are written whole before they appear (:func:`_create_lock`), so an
    empty or garbled one was left by a failed write. A live process of
    another host cannot be checked and is taken as holding it.
    """
    try:
        host, pid = text.split()
        if host != socket.gethostname():
            return False
        os.kill(int(pid), 0)  # Signal 0: only checks that the process exists.
    except (ValueError, ProcessLookupError):
        return True
    except PermissionError:  # Alive, but another user's.
        return False
    return False


def _create_lock(path: str) -> bool:
    """Creates ``path`` holding this process's owner line; False if it exists.

    The owner is written to a temporary file first and hard-linked into
    place, so the lock never exists empty; a failed write (disk full) leaves
    nothing behind and raises an ``OSError`` naming ``path``.
    """
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix='.lock.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'w') as f:
            f.write(_owner())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # No hard links on this filesystem: exclusive create.
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            try:
                with os.fdopen(fd, 'w') as f:
                    f.write(_owner())
            except BaseException:
                os.unlink(path)
                raise
        return True
    except OSError as e:
        raise OSError(e.errno, f'could not create the lock: {e.strerror or e}', path) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


@contextlib.contextmanager
def lock(folder: str) -> Iterator[None]:
    """Holds ``folder/.lock`` for the duration of the block.

    Raises :class:`WorkdirBusy` while a live process holds it; a stale lock
    (see :func:`_stale`) is taken over.
    """
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_FILE)
    for _ in range(3):
        if _create_lock(path):
            break
        try:
            with open(path) as f:
                holder = f.read().strip()
        except FileNotFoundError:
            continue  # Released meanwhile: try again.
        except (OSError, ValueError):
            holder = ''  # Unreadable: stale.
        if not _stale(holder):
            raise WorkdirBusy(
                f'{folder} is in use by process {holder!r} (remove {path} if it is not)'
            )
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        except OSError as e:
            raise WorkdirBusy(f'could not remove the stale lock {path}: {e.strerror}') from None
    else:
        raise WorkdirBusy(f'could not lock {folder}')
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


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


def prepare(workdir: str, config: Any, overwrite: bool) -> None:
    """Refuses a workdir holding another config's run, or clears it on request.

    A ``config.json`` that is not a run config of this tool is never replaced,
    not even with ``overwrite``. The config itself is written by
    :func:`write_config` once the run's checkpoint has been read.
    """
    path = os.path.join(workdir, CONFIG_FILE)
    if os.path.exists(path) and not is_run_config(read_json_object(path)):
        raise ConfigError(
            f'{path} exists and is not the config of a resnet_jax run; choose another '
            '--workdir (nothing was changed)'
        )
    if overwrite:
        for name in RUN_OUTPUTS:
            target = os.path.join(workdir, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            elif os.path.exists(target):
                os.remove(target)
        for name in os.listdir(workdir):
            if name.startswith('events.out.tfevents.'):
                os.remove(os.path.join(workdir, name))
    elif os.path.exists(path) and (
        os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR))
        or os.path.exists(os.path.join(workdir, METRICS_FILE))
    ):
        diffs = config_differences(read_json(path), config_json(config))
        if diffs:
            raise ConfigError(
                f'{workdir} holds a run of a different config ({"; ".join(diffs)}); rerun '
                'with --overwrite to replace it, or --new_run to train into a new workdir'
            )


def write_config(workdir: str, config: Any) -> None:
    """Records ``config`` as the workdir's run config (``config.json``)."""
    write_json(os.path.join(workdir, CONFIG_FILE), config_json(config))
