"""SIGINT/SIGTERM during training: checkpoint, then stop; a second signal stops at once.

with signals.StopSignals() as stop:
    ...
    if stop.agreed() is not None:   # every process of the run agrees
        save()
        raise signals.Interrupted(stop.signum, 'stopped; rerun to resume')
"""

import contextlib
import ctypes
import logging
import os
import signal
import threading
import time
from typing import Any

import jax
import numpy as np

logger = logging.getLogger('resnet_jax')


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped training after a checkpoint was saved."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class StopSignals:
    """Turns the first SIGINT/SIGTERM into a request to checkpoint and stop.

    A second signal stops the process at once, by the signal's default action:
    it does not wait for a compiled call or a save in flight, and an unfinished
    save is never taken as a checkpoint. Python runs signal handlers only
    between bytecodes of the main thread, which waits inside a compiled call
    for as long as it runs; so the signals are also counted by a thread that
    reads them from :func:`signal.set_wakeup_fd`'s pipe the moment they arrive.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._pipe: tuple[int, int] | None = None
        self._previous_wakeup = -1
        self._watcher: threading.Thread | None = None
        self._count = 0
        self._lock = threading.Lock()

    def _handle(self, signum, frame):
        del frame
        if self.signum is None:
            self.signum = signum
        for sig in self._previous:
            signal.signal(sig, signal.SIG_DFL)  # A next signal: the default action.
        logger.warning(
            '%s received: saving a checkpoint, then stopping (again: stop at once)',
            signal.Signals(signum).name,
        )

    def _watch(self, read_fd: int) -> None:
        """Counts the signals as they arrive; the second one ends the process."""
        while True:
            try:
                data = os.read(read_fd, 64)
            except OSError:
                return
            for signum in data:
                if signum == 0:  # Written by __exit__: stop watching.
                    return
                if signum not in self._previous:
                    continue
                with self._lock:
                    self._count += 1
                    if self.signum is None:
                        self.signum = signum
                    second = self._count >= 2
                if second:
                    die_by_signal(signum)

    def agreed(self) -> int | None:
        """The signal to stop on, as every process of the run sees it.

        A signal reaches the processes of a multi-process run at different
        moments. Every process asks here at the same points (call boundaries,
        around evaluation); all stop if any was signalled, so they enter the
        collective checkpoint save at the same step instead of hanging in it.
        One all-gather of a scalar per call; no cost with one process.
        """
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            signums = multihost_utils.process_allgather(np.int32(self.signum or 0))
            if self.signum is None and int(np.max(signums)):
                self.signum = int(np.max(signums))
                logger.warning(
                    'another process received %s: saving a checkpoint, then stopping',
                    signal.Signals(self.signum).name,
                )
        return self.signum

    def __enter__(self) -> 'StopSignals':
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
            read_fd, write_fd = os.pipe()
            os.set_blocking(write_fd, False)
            self._pipe = (read_fd, write_fd)
            self._previous_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
            self._watcher = threading.Thread(
                target=self._watch, args=(read_fd,), name='stop signals', daemon=True
            )
            self._watcher.start()
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._pipe is not None:
            signal.set_wakeup_fd(self._previous_wakeup)
            read_fd, write_fd = self._pipe
            with contextlib.suppress(OSError):
                os.write(write_fd, b'\0')
            self._watcher.join()
            os.close(read_fd)
            os.close(write_fd)
            self._pipe = None


def die_by_signal(signum: int) -> None:
    """Ends the process at once by ``signum``'s default action, from any thread.

    ``signal.signal`` works only in the main thread, which may be waiting in a
    compiled call; the C library's ``signal`` restores the default action here.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.signal.restype = ctypes.c_void_p
        libc.signal.argtypes = (ctypes.c_int, ctypes.c_void_p)
        libc.signal(signum, None)  # SIG_DFL
        os.kill(os.getpid(), signum)
        time.sleep(5)  # Delivery is asynchronous.
    finally:
        os._exit(128 + signum)  # Where the signal could not be re-raised.
