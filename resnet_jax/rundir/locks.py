"""A lease lock on a folder, against two processes writing into one workdir.

    with locks.lock(path) as held:      # raises WorkdirBusy if a live process holds it
        held.check()                    # before each write: OwnershipLost if taken over
        ...

The lock is a lease: a file holding the owner's host and process id, linked
into place whole, whose modification time the owner refreshes while it lives
(:data:`LOCK_LEASE_SECONDS`). A lock whose lease expired (its owner died, on
any host of a shared filesystem), left by a dead process of this host, or
empty or unreadable, is taken over; processes create or take over the lock
only while holding a short-lived guard file, so two never both take it.

A process that was paused (SIGSTOP, a frozen VM) may find on waking that its
lock was taken over; :meth:`Held.check` tells it before it writes again. A
caller that knows a lock's holder lost the work it locked for (a study whose
trial was retried elsewhere) may take the lock over at once
(:func:`take_over`), without waiting out its lease.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Iterator

LOCK_FILE = '.lock'

# A lock whose owner has not refreshed it for this long is taken over: its owner
# died (on this host or another one sharing the filesystem). The owner refreshes
# it every LOCK_LEASE_SECONDS / LOCK_REFRESHES_PER_LEASE seconds.
LOCK_LEASE_SECONDS = 300.0
LOCK_REFRESHES_PER_LEASE = 10
# The lock is created or taken over only while holding LOCK_FILE + GUARD_SUFFIX, for
# milliseconds; a guard older than this was left by a process that died holding it.
GUARD_SUFFIX = '.guard'
GUARD_STALE_SECONDS = 10.0


class WorkdirBusy(RuntimeError):
    """Another live process is writing into the same workdir."""


class OwnershipLost(WorkdirBusy):
    """This process no longer owns what it was writing: it must write nothing more there.

    Its folder's lock was taken over (or removed), or a fence of the caller's
    (a study's trial failed and retried by another worker) said so.
    """


def _owner() -> str:
    return f'{socket.gethostname()} {os.getpid()}'


def _stale(text: str, age: float, lease: float) -> bool:
    """Whether a lock holding ``text``, last refreshed ``age`` seconds ago, is free.

    It is when its lease expired (its owner, on any host, stopped refreshing
    it), when its owner is a dead process of this host, or when it is empty or
    garbled: locks are written whole before they appear (:func:`_create_lock`),
    so such a one was left by a failed write.
    """
    if age > lease:
        return True
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


def _create_lock(path: str, reported: str | None = None) -> bool:
    """Creates ``path`` holding this process's owner line; False if it exists.

    The owner is written to a temporary file first and hard-linked into
    place, so the lock never exists empty; a failed write (disk full) leaves
    nothing behind and raises an ``OSError`` naming ``reported`` (default ``path``).
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
        raise OSError(
            e.errno, f'could not create the lock: {e.strerror or e}', reported or path
        ) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def _take_over(path: str, judged: os.stat_result) -> bool:
    """Removes the stale file ``path`` (a guard) that ``judged`` (its stat) describes.

    The file is renamed to a name of this process's own (one rename of a
    name succeeds), then its identity is compared with the one judged stale.
    If another process had meanwhile replaced it with a live one, that one is
    put back (linked, so a file created in the meantime is never overwritten)
    and False is returned.
    """
    aside = f'{path}.stale.{socket.gethostname()}.{os.getpid()}.{threading.get_ident()}'
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return True  # Someone else removed it: try to create it again.
    moved = os.stat(aside)
    same = ('st_ino', 'st_dev', 'st_mtime_ns', 'st_size')  # Inode numbers are reused.
    if all(getattr(moved, k) == getattr(judged, k) for k in same):
        os.unlink(aside)
        return True
    with contextlib.suppress(FileExistsError):
        os.link(aside, path)
    os.unlink(aside)
    return False


def _read(path: str) -> str | None:
    """The owner line a lock file holds; None if it is missing or unreadable."""
    try:
        with open(path) as f:
            return f.read().strip()
    except (OSError, ValueError):
        return None


class Held:
    """A lock this process took: :meth:`check` before writing into its folder."""

    def __init__(self, folder: str):
        self.folder = folder
        self.path = os.path.join(folder, LOCK_FILE)
        self.identity = _identity(self.path)
        self.owner = _owner()

    def ours(self) -> bool:
        """Whether the lock file is still the one this process created (same file, same owner)."""
        return _identity(self.path) == self.identity and _read(self.path) == self.owner

    def check(self) -> None:
        """Raises :class:`OwnershipLost` if the lock was taken over or removed meanwhile.

        Read from the file, so it holds across hosts sharing the filesystem.
        """
        if self.ours():
            return
        holder = _read(self.path)
        by = f'taken over by {holder!r}' if holder else 'removed'
        raise OwnershipLost(
            f'the lock of {self.folder} was {by} while this process was away; '
            'it writes nothing more there'
        )


class _Lease(threading.Thread):
    """Refreshes a lock's modification time until stopped (a daemon thread)."""

    def __init__(self, held: Held, every: float):
        super().__init__(name=f'lease {held.path}', daemon=True)
        self._held, self._every, self._done = held, every, threading.Event()

    def run(self) -> None:
        while not self._done.wait(self._every):
            with contextlib.suppress(OSError):  # A full disk or a network hiccup: next time.
                if self._held.ours():
                    os.utime(self._held.path)

    def stop(self) -> None:
        self._done.set()
        self.join()


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_dev


@contextlib.contextmanager
def _guard(path: str, lock_path: str) -> Iterator[None]:
    """Holds ``path``, a short-lived mutex around checking and replacing a lock.

    Every process that creates or takes over ``lock_path`` does so holding
    it, so a stale lock is judged and replaced without a check-then-act race.
    A guard older than :data:`GUARD_STALE_SECONDS` was left by a process that
    died holding it, and is taken over (:func:`_take_over`).
    """
    waited = time.monotonic()
    while not _create_lock(path, lock_path):
        try:
            judged = os.stat(path)
        except FileNotFoundError:
            continue
        if time.time() - judged.st_mtime > GUARD_STALE_SECONDS:
            with contextlib.suppress(FileNotFoundError):
                _take_over(path, judged)
        elif time.monotonic() - waited > 2 * GUARD_STALE_SECONDS:
            raise WorkdirBusy(f'could not lock {lock_path}: {path} stays in place')
        else:
            time.sleep(0.01)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def holder(folder: str) -> str | None:
    """The owner line (``'<host> <pid>'``) of ``folder``'s lock; None if there is none."""
    return _read(os.path.join(folder, LOCK_FILE))


def take_over(folder: str, judged: str) -> bool:
    """Removes ``folder``'s lock if ``judged`` (its owner line) still holds it.

    For a caller that knows the holder lost the work it locked the folder for
    (though it may live, paused, and its lease run on): the lock is removed under
    the guard, and the holder finds out before it writes again
    (:meth:`Held.check`). Returns whether the lock was removed; the caller then
    takes it with :func:`lock`.
    """
    path = os.path.join(folder, LOCK_FILE)
    with _guard(path + GUARD_SUFFIX, path):
        if _read(path) != judged:
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return True


@contextlib.contextmanager
def lock(folder: str, lease_seconds: float = LOCK_LEASE_SECONDS) -> Iterator[Held]:
    """Holds ``folder/.lock`` for the duration of the block; yields the :class:`Held` lock.

    Raises :class:`WorkdirBusy` while a live process holds it; a stale lock
    (see :func:`_stale`) is taken over, under a guard (:func:`_guard`) that
    every process creating the lock holds. While held, a thread refreshes the
    lock's lease every ``lease_seconds`` / :data:`LOCK_REFRESHES_PER_LEASE`
    seconds.
    """
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_FILE)
    with _guard(path + GUARD_SUFFIX, path):
        for _ in range(3):
            if _create_lock(path):
                break
            owner_line, judged = '', None
            try:
                judged = os.stat(path)
                with open(path) as f:
                    owner_line = f.read().strip()
            except FileNotFoundError:
                continue  # Released meanwhile by its owner: try again.
            except (OSError, ValueError):
                pass  # Unreadable: stale, if it is a file.
            if judged is None or not stat.S_ISREG(judged.st_mode):
                raise WorkdirBusy(f'{path} is not a lock file this tool can take over; remove it')
            if not _stale(owner_line, time.time() - judged.st_mtime, lease_seconds):
                raise WorkdirBusy(
                    f'{folder} is in use by process {owner_line!r} (remove {path} if it is not)'
                )
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as e:
                raise WorkdirBusy(f'could not remove the stale lock {path}: {e.strerror}') from None
        else:
            raise WorkdirBusy(f'could not lock {folder}')
    held = Held(folder)
    lease = _Lease(held, lease_seconds / LOCK_REFRESHES_PER_LEASE)
    lease.start()
    try:
        yield held
    finally:
        lease.stop()
        if held.ours():  # Still ours (not taken over meanwhile): release it.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
