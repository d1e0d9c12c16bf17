"""Command line: train a config (or a sweep) into a workdir, evaluate it, report.

    python -m resnet_jax.main --config configs/default.py --workdir runs/default \
        [--config.learning_rate=0.001 --config.data.path=data/cifar10-jpeg ...]
    python -m resnet_jax.main --config configs/default.py --workdir runs/default --mode=eval
    python -m resnet_jax.main --config configs/paper_sweep.py --workdir runs/paper [--workers=2]
    python -m resnet_jax.main --config configs/paper_search.py --workdir runs/search [--workers=2]
    python -m resnet_jax.main --workdir runs/paper --mode=report

Rerunning a training command on the same workdir resumes from its latest
checkpoint. Invalid input stops with one ``error:`` line on stderr and exit
code 2, before anything is compiled. Exit codes: 0 done, 1 some sweep runs
failed, 2 bad input, 3 diverged, 130/143 interrupted by SIGINT/SIGTERM (after
saving a checkpoint).
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from absl import flags
from ml_collections import config_flags

from resnet_jax.rundir.workdir import CONFIG_FILE

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'Path to a config file (a module with get_config()).', lock_config=True
)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and logs.')
flags.DEFINE_enum(
    'mode',
    'train',
    ['train', 'eval', 'report'],
    'train: train the config (a sweep if it has a sweep section), resuming what '
    'exists; eval: evaluate the latest checkpoint of --workdir on the test set; '
    'report: (re)write the report of the sweep in --workdir (or the curves of the '
    'run in --workdir), without training.',
)
flags.DEFINE_bool(
    'overwrite',
    False,
    'Delete the run (checkpoints, metrics, summary, events) that --workdir holds '
    'and start over, even if its config differs.',
)
flags.DEFINE_bool(
    'new_run',
    False,
    'If --workdir already holds a run, train into the first free WORKDIR-2, '
    'WORKDIR-3, ... instead.',
)
flags.DEFINE_integer(
    'workers',
    1,
    'Sweeps and searches: start this many worker processes that share the study '
    '(one per GPU, or one per group of CPU cores). The same command started on '
    'other machines joins the same study too.',
    lower_bound=1,
)
flags.DEFINE_string(
    'sweep_shard',
    '0/1',
    'Replaced by workers: start the same command N times, or pass --workers=N.',
)

HELP_FLAGS = ('-h', '--help', '-help', '--helpshort', '--helpfull', '-?')
OWN_FLAGS = ('config', 'workdir', 'mode', 'overwrite', 'new_run', 'workers')

EXIT_RUNS_FAILED = 1  # A sweep finished but some of its runs failed or diverged.
EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM outside training (loading data, preparing the workdir)."""


def _terminate(signum: int, frame: object) -> None:
    """Turns SIGTERM into an exception, so that locks and worker processes are released."""
    del signum, frame
    raise Terminated()


def _fail(message: str) -> int:
    message = ' '.join(str(message).split())  # One line.
    print(f'error: {message}', file=sys.stderr)
    return EXIT_USAGE


def _config_path(argv: Sequence[str]) -> str | None:
    """The file named by ``--config`` (without a ``:arg`` suffix), if any."""
    for i, arg in enumerate(argv):
        if arg.startswith('--config='):
            return arg.split('=', 1)[1].split(':')[0]
        if arg == '--config' and i + 1 < len(argv):
            return argv[i + 1].split(':')[0]
    return None


def _config_fields(argv: Sequence[str]) -> list[str]:
    """Dotted names of every field of the ``--config`` file (for suggestions)."""
    try:
        spec = importlib.util.spec_from_file_location('_config', _config_path(argv))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        flat = []

        def walk(node, prefix):
            for key, value in node.items():
                if hasattr(value, 'items'):
                    walk(value, f'{prefix}{key}.')
                else:
                    flat.append(f'{prefix}{key}')

        walk(module.get_config(), '')
        return flat
    except Exception:  # pylint: disable=broad-except  # Only for a hint.
        return []


def _parse_error(error: Exception, argv: Sequence[str]) -> str:
    """Explains a failure to load the config file or apply an override."""
    fields = _config_fields(argv)
    for arg in argv:
        if not arg.startswith('--config.'):
            continue
        name = arg[len('--config.') :].split('=', 1)[0]
        if fields and name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            hint = f'; did you mean config.{close[0]}?' if close else ''
            return f'unknown config field config.{name} in {arg}{hint}'
    if not fields:
        return f'could not load config file {_config_path(argv)}: {type(error).__name__}: {error}'
    return f'invalid flags: {type(error).__name__}: {error}'


def usage() -> str:
    """The ``--help`` text: this module's docstring and the flags."""
    lines = [__doc__.strip(), '', 'Flags:']
    for name in OWN_FLAGS:
        flag = FLAGS[name]
        default = '' if flag.default is None else f' (default: {flag.default_as_str})'
        lines.append(f'  --{name}: {flag.help}{default}')
    lines.append(
        '  --config.FIELD=VALUE: override one field of the config, e.g. '
        '--config.learning_rate=0.001 (the fields are listed in resnet_jax/config.py)'
    )
    return '\n'.join([*lines, '', 'Choices (registered names):', *_choices()])


def _choices() -> list[str]:
    """The registered models, optimisers, schedules and data sources, one line each."""
    from resnet_jax import datasets, models  # pylint: disable=g-import-not-at-top
    from resnet_jax.training import optim

    return [
        f'  config.model: {models.MODELS.choices()}',
        f'  config.optimizer: {optim.OPTIMIZERS.choices()}',
        f'  config.schedule: {optim.SCHEDULES.choices()}',
        f'  config.data.source: auto, {datasets.SOURCES.choices()}',
    ]


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


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the process exit code."""
    from resnet_jax.studies import workers  # pylint: disable=g-import-not-at-top

    workers.pin_from_env()  # A worker of --workers=N: before JAX starts its threads.
    argv = list(sys.argv if argv is None else argv)
    if any(arg in HELP_FLAGS for arg in argv[1:]):
        print(usage())
        return 0
    sys.argv = argv  # config_flags finds --config.* overrides in sys.argv.
    path = _config_path(argv)
    overrides = [arg for arg in argv[1:] if arg.startswith('--config.')]
    if path is None and overrides:
        return _fail(
            f'{overrides[0].split("=")[0]} overrides a field of the config file, but no '
            '--config is given, e.g. --config configs/default.py'
        )
    # config_flags warns through absl logging (get_config() returning None): the
    # user gets this tool's own error line instead.
    logging.getLogger('absl').setLevel(logging.CRITICAL)
    if threading.current_thread() is not threading.main_thread():
        return _run(argv, path)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _run(argv, path)
    except Terminated:
        print('interrupted: SIGTERM', file=sys.stderr)
        return EXIT_TERMINATED
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(argv: list[str], path: str | None) -> int:
    """Parses the flags and runs the mode; ``path`` is the config file's."""
    if path:  # Lets configs import ``configs.default`` from any working directory.
        root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
        if root not in sys.path:
            sys.path.insert(0, root)
    try:
        rest = FLAGS(argv)
    except flags.Error as e:
        return _fail(e)
    except Exception as e:  # pylint: disable=broad-except  # User input: no traceback.
        return _fail(_parse_error(e, argv))
    if len(rest) > 1:
        return _fail(f'unexpected argument(s): {" ".join(rest[1:])} (flags start with --)')
    if not FLAGS.workdir:
        return _fail('--workdir is required, e.g. --workdir runs/default')
    workdir = os.path.expanduser(FLAGS.workdir)
    if FLAGS.mode == 'report':
        return _report(workdir)
    if path is None:
        return _fail('--config is required, e.g. --config configs/default.py')
    if not os.path.isfile(path):
        return _fail(f'config file not found: {path}')
    try:
        config = FLAGS.config
        if config is None:
            return _fail(f'{path}: get_config() returned None, not a ConfigDict')
        config.keys()  # config_flags defers errors of loading the file until here.
    except Exception as e:  # pylint: disable=broad-except
        return _fail(f'could not load config file {path}: {str(e).splitlines()[-1]}')
    _setup_logging()
    if FLAGS.sweep_shard != '0/1':
        return _fail(
            '--sweep_shard is replaced by workers that share one queue: start the same '
            'command N times (on any machines sharing the workdir), or pass --workers=N'
        )
    return _run_mode(argv, config, workdir)


def _run_mode(argv: list[str], config: Any, workdir: str) -> int:
    """Evaluates, runs a study or trains; bad input and signals become exit codes."""
    # Imported after flag parsing so that `--help` and usage errors are instant.
    from resnet_jax import datasets, validation
    from resnet_jax.rundir import locks
    from resnet_jax.rundir import workdir as workdir_lib
    from resnet_jax.studies import search_space
    from resnet_jax.training import checkpoints, distributed, loop, signals

    checkpoints.quiet_orbax_noise()
    try:
        validation.validate_distributed(config)  # Read before anything else.
        distributed.initialize(config.distributed)
        if not distributed.is_primary():
            logging.getLogger('resnet_jax').setLevel(logging.WARNING)
        if FLAGS.mode == 'eval':
            result = loop.evaluate_workdir(workdir, config.data.path or None)
            accuracy, loss = 100 * result['accuracy'], result['loss']
            print(f'test accuracy {accuracy:.2f}% (loss {loss:.4f}) from {workdir}')
            return 0
        if search_space.is_study(config):
            return _run_study(argv, config, workdir)
        run_dir = _new_workdir(workdir) if FLAGS.new_run else workdir
        _, summary = loop.train_and_evaluate(config, run_dir, overwrite=FLAGS.overwrite)
        if summary['status'] == 'diverged':
            print(f'error: run diverged: {summary["error"]}', file=sys.stderr)
            return EXIT_DIVERGED
    except (
        validation.ConfigError,
        datasets.DataError,
        locks.WorkdirBusy,
        checkpoints.CheckpointError,
        workdir_lib.RecordError,
        FileNotFoundError,
    ) as e:
        return _fail(e)
    except OSError as e:  # Disk full, permissions, ...: the saved state is intact.
        return _fail(f'{e.strerror or e}: {e.filename or ""}'.rstrip(': '))
    except signals.Interrupted as e:
        print(f'interrupted: {e}', file=sys.stderr)
        return EXIT_TERMINATED if e.signum == signal.SIGTERM else EXIT_INTERRUPTED
    except Terminated:
        raise
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def _run_study(argv: list[str], config: Any, workdir: str) -> int:
    """A grid or a search: its runs here, or in ``--workers`` processes; then its report."""
    from resnet_jax.studies import optuna_study, search, search_space

    spec = search_space.spec_from_config(config)  # Bad input: an error before anything starts.
    if FLAGS.workers > 1:
        from resnet_jax.studies import workers  # pylint: disable=g-import-not-at-top

        # One error line for a bad storage, not one per worker.
        optuna_study.open_study(spec, workdir)
        return workers.run_workers(argv, FLAGS.workers, workdir)
    statuses = search.run_study(config, workdir)
    _write_study_reports(workdir)
    bad = {k: v for k, v in statuses.items() if v not in ('completed', 'pruned')}
    for name, status in bad.items():
        print(f'run {name}: {status}', file=sys.stderr)
    return EXIT_RUNS_FAILED if bad else 0


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


def _new_workdir(path: str) -> str:
    """``path`` if it holds no run yet, else the first free ``path-N``."""
    candidate, n = path, 1
    while os.path.exists(os.path.join(candidate, CONFIG_FILE)):
        n += 1
        candidate = f'{path.rstrip(os.sep)}-{n}'
    if candidate != path:
        print(f'{path} holds a run: training into {candidate}', file=sys.stderr)
    return candidate


def _report(workdir: str) -> int:
    """The study's reports, or the curves of a single run's workdir."""
    from resnet_jax import validation
    from resnet_jax.reports import sweep_report
    from resnet_jax.rundir.workdir import RecordError
    from resnet_jax.studies import optuna_study, sweep

    _setup_logging()
    is_study = any(
        os.path.exists(os.path.join(workdir, f))
        for f in (optuna_study.DESCRIPTION_FILE, sweep.MANIFEST_FILE)
    )
    try:
        if is_study:
            written = _write_study_reports(workdir)
        elif os.path.exists(os.path.join(workdir, CONFIG_FILE)):
            written = sweep_report.write_run_report(workdir)
        else:
            return _fail(
                f'{workdir} holds neither a sweep ({sweep.MANIFEST_FILE}) nor a run ({CONFIG_FILE})'
            )
    except (validation.ConfigError, RecordError, FileNotFoundError) as e:
        return _fail(e)
    for kind, path in written.items():
        print(f'{kind}: {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
