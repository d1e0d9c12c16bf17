"""Files of a run's workdir: atomic JSON writes and a lock against two writers.

    with workdir.lock(path):          # raises WorkdirBusy if another process holds it
        workdir.write_json(os.path.join(path, 'summary.json'), summary)

The lock is a file created exclusively (``O_EXCL``) holding the owner's host
and process id; a lock left by a dead process of this host is taken over.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
from collections.abc import Iterator
from typing import Any

LOCK_FILE = '.lock'
# The files of a run's workdir and of a sweep's workdir.
CONFIG_FILE = 'config.json'
SUMMARY_FILE = 'summary.json'
METRICS_FILE = 'metrics.jsonl'
MANIFEST_FILE = 'sweep.json'


class WorkdirBusy(RuntimeError):
    """Another live process is writing into the same workdir."""


def write_json(path: str, obj: Any) -> None:
    """Writes ``obj`` as JSON, atomically."""
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + '\n')


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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner() -> str:
    return f'{socket.gethostname()} {os.getpid()}'


def _stale(text: str) -> bool:
    """A lock of a dead process on this host (other hosts cannot be checked)."""
    try:
        host, pid = text.split()
        return host == socket.gethostname() and not _pid_alive(int(pid))
    except ValueError:
        return False


@contextlib.contextmanager
def lock(folder: str) -> Iterator[None]:
    """Holds ``folder/.lock`` for the duration of the block."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_FILE)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                with open(path) as f:
                    holder = f.read().strip()
            except FileNotFoundError:
                continue  # Released meanwhile: try again.
            if not _stale(holder):
                raise WorkdirBusy(
                    f'{folder} is in use by process {holder!r} (remove {path} if it is not)'
                ) from None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    else:
        raise WorkdirBusy(f'could not lock {folder}')
    with os.fdopen(fd, 'w') as f:
        f.write(_owner())
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def config_json(config: Any) -> Any:
    """A ConfigDict as plain JSON data, as it is stored in a workdir."""
    return json.loads(config.to_json())
