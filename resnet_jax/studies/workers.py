"""``--workers=N``: N worker processes on this machine that share one study.

Each worker is the same command without ``--workers``; it joins the study in
the workdir and takes trials from its queue until none is left
(:func:`resnet_jax.studies.search.run_worker`). With GPUs each worker sees one of them
(``CUDA_VISIBLE_DEVICES``); on CPUs each is pinned to its own share of the cores,
since XLA's CPU convolutions mostly use one core each. SIGINT/SIGTERM are passed
on to every worker, which checkpoints and gives its trial back to the queue.
A worker whose parent dies (``kill -9`` of the parent) sends itself SIGTERM and
takes the same path instead of running on as an orphan.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from resnet_jax import validation

logger = logging.getLogger('resnet_jax')

WORKER_ENV = 'RESNET_JAX_WORKER'  # 'i/N' in each worker's environment.
CPUS_ENV = 'RESNET_JAX_WORKER_CPUS'  # The CPU cores a worker runs on: '0,1'.
PARENT_ENV = 'RESNET_JAX_WORKER_PARENT'  # The process id of the command that started it.
PARENT_POLL_SECONDS = 0.5  # How often a worker looks whether its parent is still there.


def pin_from_env() -> None:
    """Pins this process to the cores ``RESNET_JAX_WORKER_CPUS`` names, if set, and
    ties a worker's life to its parent's (:func:`end_with_parent`).

    Called first thing in a worker, before JAX starts its thread pools (they
    size themselves by the cores the process may use).
    """
    cores = os.environ.get(CPUS_ENV)
    if cores and hasattr(os, 'sched_setaffinity'):
        os.sched_setaffinity(0, [int(c) for c in cores.split(',')])
    parent = os.environ.get(PARENT_ENV)
    if parent and parent.isdigit():
        end_with_parent(int(parent))


def end_with_parent(parent: int, every: float = PARENT_POLL_SECONDS) -> threading.Thread:
    """Sends this process SIGTERM once its parent ``parent`` is gone, so that a
    worker checkpoints and gives its trial back instead of running on as an orphan.

    A thread polls the parent's process id. The kernel's parent-death signal
    (``prctl(PR_SET_PDEATHSIG)``) is not used: when a parent with several threads
    is killed, its children pass from one dying thread to the next and get that
    signal once per thread, and a second SIGTERM stops a run at once, without its
    checkpoint. A parent already gone when this is called is seen at once.
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        logger.warning('the --workers process %d is gone: stopping this worker', parent)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name='parent watch', daemon=True)
    thread.start()
    return thread


def visible_gpus() -> list[str]:
    """The GPUs this process may use: ``CUDA_VISIBLE_DEVICES``, else ``nvidia-smi -L``."""
    listed = os.environ.get('CUDA_VISIBLE_DEVICES')
    if listed is not None:
        return [d for d in listed.split(',') if d.strip()]
    if os.environ.get('JAX_PLATFORMS', '').startswith('cpu') or not shutil.which('nvidia-smi'):
        return []
    try:
        out = subprocess.run(
            ['nvidia-smi', '-L'], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith('GPU ')]


def max_workers() -> tuple[int, str]:
    """How many workers this machine runs at most, and what limits them: one per
    GPU, or on CPUs one per core this process may use."""
    gpus = visible_gpus()
    if gpus:
        return len(gpus), f'{len(gpus)} GPUs'
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    return cores or 1, f'{cores or 1} CPU cores'


def check_count(n: int) -> None:
    """:class:`ConfigError` if ``n`` workers are more than :func:`max_workers`."""
    most, what = max_workers()
    if n > most:
        raise validation.ConfigError(
            f'--workers={n} is more than this machine runs: at most {most} (its {what}); '
            'start the same command on other machines to add workers'
        )


def core_shares(cores: Sequence[int], n: int) -> list[list[int]]:
    """``cores`` split into ``n`` near-equal shares (every share non-empty if possible)."""
    cores = sorted(cores)
    if n >= len(cores):
        return [[cores[i % len(cores)]] for i in range(n)]
    size, extra = divmod(len(cores), n)
    shares, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        shares.append(cores[start:end])
        start = end
    return shares


def worker_argv(argv: Sequence[str]) -> list[str]:
    """The command line without ``--workers``."""
    out, skip = [], False
    for arg in argv[1:]:
        if skip:
            skip = False
            continue
        if arg == '--workers':
            skip = True
            continue
        if arg.startswith('--workers='):
            continue
        out.append(arg)
    return [sys.executable, '-m', 'resnet_jax.main', *out]


def run_workers(argv: Sequence[str], n: int, workdir: str) -> int:
    """Starts ``n`` workers, waits for all, returns the worst exit code."""
    gpus = visible_gpus()
    shares = [] if gpus else core_shares(sorted(os.sched_getaffinity(0)), n)
    command = worker_argv(argv)
    procs: list[subprocess.Popen] = []
    for i in range(n):
        env = dict(os.environ, **{WORKER_ENV: f'{i}/{n}', PARENT_ENV: str(os.getpid())})
        if gpus:
            env['CUDA_VISIBLE_DEVICES'] = gpus[i % len(gpus)]
        else:
            env[CPUS_ENV] = ','.join(map(str, shares[i]))
            env.setdefault('JAX_PLATFORMS', 'cpu')
        procs.append(subprocess.Popen(command, env=env))
    where = f'GPU {", ".join(gpus)}' if gpus else f'CPU cores split {shares}'
    print(f'{n} workers on the study in {workdir} ({where})', file=sys.stderr, flush=True)

    def forward(signum, frame):
        del frame
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        codes = [proc.wait() for proc in procs]
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    # Worst first: interrupted, bad input, diverged/failed runs, done.
    for code in (143, 130, 2, 3, 1):
        if code in codes:
            return code
    return max(codes, key=abs) if any(codes) else 0
