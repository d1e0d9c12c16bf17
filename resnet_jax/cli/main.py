"""The command line's modes: train, evaluate, run a study, report; and its exit codes.

:func:`main` parses the flags (:mod:`resnet_jax.cli.flags`, whose docstring is
the ``--help`` text) and calls one mode; bad input and signals become exit codes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from resnet_jax.cli import flags
from resnet_jax.rundir.workdir import CONFIG_FILE

EXIT_RUNS_FAILED = 1  # A sweep finished but some of its runs failed or diverged.
EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM outside training (loading data, preparing the workdir)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the process exit code."""
    from resnet_jax.studies import workers  # pylint: disable=g-import-not-at-top

    workers.pin_from_env()  # A worker of --workers=N: before JAX starts its threads.
    argv = list(sys.argv if argv is None else argv)
    if any(arg in flags.HELP_FLAGS for arg in argv[1:]):
        print(flags.usage())
        return 0
    with _sigterm_raises_terminated():
        try:
            args = flags.parse(argv)
            _setup_logging()
            if args.mode == 'report':
                return report(args.workdir)
            # Imported after parsing, so that `--help` and usage errors are instant.
            from resnet_jax.studies import search_space  # pylint: disable=g-import-not-at-top

            if _workers_given(args.argv) and (
                args.mode == 'eval' or not search_space.is_study(args.config)
            ):
                return _fail(
                    '--workers=N starts the workers of a sweep or search; the config has no '
                    'sweep or search section to train'
                )
            _start(args.config, args.compilation_cache)
            if args.mode == 'eval':
                return evaluate(args.config, args.workdir)
            if search_space.is_study(args.config):
                return study(args.argv, args.config, args.workdir, args.workers)

            return train(args.config, args.workdir, new_run=args.new_run, overwrite=args.overwrite)
        except BaseException as e:  # pylint: disable=broad-except  # Re-raised unless known.
            return _exit_code(e)


def train(config: Any, workdir: str, new_run: bool, overwrite: bool) -> int:
    """Trains one run into ``workdir`` (resuming it), or with ``new_run`` into the
    first free ``workdir-N``; exit code 3 if it diverged."""
    from resnet_jax.training import loop  # pylint: disable=g-import-not-at-top

    run_dir = _new_workdir(workdir) if new_run else workdir
    _, summary = loop.train_and_evaluate(config, run_dir, overwrite=overwrite)
    if summary['status'] == 'diverged':
        print(f'error: run diverged: {summary["error"]}', file=sys.stderr)
        return EXIT_DIVERGED
    return 0


def evaluate(config: Any, workdir: str) -> int:
    """Evaluates the latest checkpoint of ``workdir`` on the test set."""
    from resnet_jax.training import loop  # pylint: disable=g-import-not-at-top

    result = loop.evaluate_workdir(workdir, config.data.path or None)
    accuracy, loss = 100 * result['accuracy'], result['loss']
    print(f'test accuracy {accuracy:.2f}% (loss {loss:.4f}) from {workdir}')
    return 0


def study(argv: list[str], config: Any, workdir: str, num_workers: int) -> int:
    """A grid or a search: its runs here, or in ``num_workers`` processes; then its report."""
    from resnet_jax.studies import optuna_study, preflight, search, search_space, workers

    spec = search_space.spec_from_config(config)  # Bad input: an error before anything starts.
    if num_workers > 1:
        workers.check_count(num_workers)
        preflight.check_data(spec)  # One error line for data every trial shares, not one each.
        optuna_study.open_study(spec, workdir)  # One error line for a bad storage, not one each.
        return workers.run_workers(argv, num_workers, workdir)
    try:
        statuses = search.run_study(config, workdir)
    except search.StudyStopped as e:
        _write_study_reports(workdir)
        print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
        return EXIT_RUNS_FAILED
    _write_study_reports(workdir)
    bad = {k: v for k, v in statuses.items() if v not in ('completed', 'pruned')}
    for name, status in bad.items():
        print(f'run {name}: {status}', file=sys.stderr)
    return EXIT_RUNS_FAILED if bad else 0


def report(workdir: str) -> int:
    """Writes the study's reports, or the curves of a single run's workdir."""
    from resnet_jax.reports import sweep_report
    from resnet_jax.studies import optuna_study, sweep

    study_files = (optuna_study.DESCRIPTION_FILE, sweep.MANIFEST_FILE)
    if any(os.path.exists(os.path.join(workdir, f)) for f in study_files):
        if _lost_study_db(workdir):
            return _fail(
                f'{os.path.join(workdir, optuna_study.STUDY_DB)} is missing: the study '
                f'{workdir} describes has no trials to report (its run folders are intact)'
            )
        written = _write_study_reports(workdir)
    elif os.path.exists(os.path.join(workdir, CONFIG_FILE)):
        written = sweep_report.write_run_report(workdir)
    else:
        return _fail(
            f'{workdir} holds neither a sweep ({sweep.MANIFEST_FILE}) nor a run ({CONFIG_FILE})'
        )
    for kind, path in written.items():
        print(f'{kind}: {path}')
    return 0


def _start(config: Any, cache: str | None) -> None:
    """Enables the compilation cache and joins the processes of a distributed run
    (the first things done, before anything compiles)."""
    from resnet_jax import validation
    from resnet_jax.training import checkpoints, compile_cache, distributed

    checkpoints.quiet_orbax_noise()
    compile_cache.enable(cache)
    validation.validate_distributed(config)
    distributed.initialize(config.distributed)
    if not distributed.is_primary():
        logging.getLogger('resnet_jax').setLevel(logging.WARNING)


def _write_study_reports(workdir: str) -> dict[str, str]:
    """A study's reports (a grid's sweep report too); a failure to plot is a warning."""
    from resnet_jax.reports import study_report, sweep_report
    from resnet_jax.studies import optuna_study, sweep

    paths: dict[str, str] = {}
    try:
        if os.path.exists(os.path.join(workdir, sweep.MANIFEST_FILE)):
            paths.update(sweep_report.write_sweep_report(workdir))
        if os.path.exists(os.path.join(workdir, optuna_study.DESCRIPTION_FILE)):
            paths.update(study_report.write_study_report(workdir))
    except ImportError as e:
        logging.getLogger('resnet_jax').warning('report not written: %s', e)
    for kind, path in paths.items():
        logging.getLogger('resnet_jax').info('report %s: %s', kind, path)
    return paths


def _lost_study_db(workdir: str) -> bool:
    """Whether the study's storage is the workdir's SQLite file and it is gone."""
    from resnet_jax.rundir import workdir as workdir_lib
    from resnet_jax.studies import optuna_study

    described = workdir_lib.read_json_object(os.path.join(workdir, optuna_study.DESCRIPTION_FILE))
    in_workdir = described is not None and not described.get('storage')
    return in_workdir and not os.path.exists(os.path.join(workdir, optuna_study.STUDY_DB))


def _workers_given(argv: Sequence[str]) -> bool:
    return any(a == '--workers' or a.startswith('--workers=') for a in argv[1:])


def _new_workdir(path: str) -> str:
    """``path`` if it holds no run yet, else the first free ``path-N``."""
    candidate, n = path, 1
    while os.path.exists(os.path.join(candidate, CONFIG_FILE)):
        n += 1
        candidate = f'{path.rstrip(os.sep)}-{n}'
    if candidate != path:
        print(f'{path} holds a run: training into {candidate}', file=sys.stderr)
    return candidate


def _exit_code(error: BaseException) -> int:
    """The exit code of bad input or a signal, its line printed on stderr; any other
    exception (a bug) is raised again."""
    if isinstance(error, flags.UsageError):
        return _fail(error)
    if isinstance(error, Terminated):
        print('interrupted: SIGTERM', file=sys.stderr)
        return EXIT_TERMINATED
    from resnet_jax import datasets, validation  # pylint: disable=g-import-not-at-top
    from resnet_jax.rundir import locks, workdir
    from resnet_jax.training import checkpoints, signals

    bad_input = (
        validation.ConfigError,
        datasets.DataError,
        locks.WorkdirBusy,
        checkpoints.CheckpointError,
        workdir.RecordError,
        FileNotFoundError,
    )
    if isinstance(error, bad_input):
        return _fail(error)
    if isinstance(error, OSError):  # Disk full, permissions, ...: the saved state is intact.
        return _fail(f'{error.strerror or error}: {error.filename or ""}'.rstrip(': '))
    if isinstance(error, signals.Interrupted):
        print(f'interrupted: {error}', file=sys.stderr)
        return EXIT_TERMINATED if error.signum == signal.SIGTERM else EXIT_INTERRUPTED
    if isinstance(error, KeyboardInterrupt):
        print('interrupted', file=sys.stderr)
        return EXIT_INTERRUPTED
    raise error


def _fail(message: object) -> int:
    """Prints ``message`` as one ``error:`` line; the exit code of bad input."""
    message = ' '.join(str(message).split())  # One line.
    print(f'error: {message}', file=sys.stderr)
    return EXIT_USAGE


@contextlib.contextmanager
def _sigterm_raises_terminated() -> Iterator[None]:
    """In the main thread, SIGTERM raises :class:`Terminated` while the command runs, so
    that locks and worker processes are released."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        del signum, frame
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _setup_logging() -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter('%(asctime)s %(message)s', '%H:%M:%S'))
    log = logging.getLogger('resnet_jax')
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    # Libraries' own messages (tfds, orbax) would clutter one-line errors: every
    # failure they report reaches the user as this tool's own `error:` line.
    logging.getLogger('absl').setLevel(logging.CRITICAL)
    logging.getLogger('asyncio').setLevel(logging.CRITICAL)  # Orbax's failed writes.


if __name__ == '__main__':
    sys.exit(main())
