"""resnet-jax: train a config (or a study) into a workdir, evaluate it, report.

    resnet-jax --config default --workdir runs/default \\
        [--config.learning_rate=0.001 --config.data.path=data/cifar10-jpeg ...]
    resnet-jax --config default --workdir runs/default --mode=eval
    resnet-jax --config paper_sweep --workdir runs/paper [--workers=2]
    resnet-jax --config cpu_search --workdir runs/search [--workers=2]
    resnet-jax --config my_configs/mine.py --workdir runs/mine
    resnet-jax --workdir runs/paper --mode=report

``resnet-jax`` is also ``python -m resnet_jax.main`` and ``python -m resnet_jax``.
--config takes a config file (a module with get_config(); it can build on a
shipped one: ``from resnet_jax.configs import paper_sweep``) or the name of a
config that ships with the package (listed below). Rerunning a training
command on the same workdir resumes from its latest checkpoint. Invalid input
stops with one ``error:`` line on stderr and exit code 2, before anything is
compiled. Exit codes: 0 done, 1 some sweep runs failed, 2 bad input, 3
diverged, 130/143 interrupted by SIGINT/SIGTERM (after saving a checkpoint).
"""

from __future__ import annotations

import difflib
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

from absl import flags
from ml_collections import config_flags

from resnet_jax.cli import config_files

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config',
    None,
    'A config file (a module with get_config()), or the name of a shipped config (below).',
    lock_config=True,
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
    'compilation_cache',
    None,
    "JAX's persistent compilation cache folder, shared by runs, trials, workers and "
    'reruns on this machine (default: $JAX_COMPILATION_CACHE_DIR, else '
    '~/.cache/resnet_jax/jax); none: compile without it.',
)
flags.DEFINE_string(
    'sweep_shard',
    '0/1',
    'Replaced by workers: start the same command N times, or pass --workers=N.',
)

HELP_FLAGS = ('-h', '--help', '-help', '--helpshort', '--helpfull', '-?')
OWN_FLAGS = ('config', 'workdir', 'mode', 'overwrite', 'new_run', 'workers', 'compilation_cache')


class UsageError(Exception):
    """Bad input on the command line: one ``error:`` line and exit code 2."""


class Args(NamedTuple):
    """The parsed command line."""

    argv: list[str]  # With a shipped config's name replaced by its file.
    config: Any  # The ConfigDict (None in report mode).
    workdir: str  # With ``~`` expanded.
    mode: str
    overwrite: bool
    new_run: bool
    workers: int
    compilation_cache: str | None  # None: the default folder.


def _config_path(argv: Sequence[str]) -> str | None:
    """The file named by ``--config`` (without a ``:arg`` suffix), if any."""
    for i, arg in enumerate(argv):
        if arg.startswith('--config='):
            return arg.split('=', 1)[1].split(':')[0]
        if arg == '--config' and i + 1 < len(argv):
            return argv[i + 1].split(':')[0]
    return None


def parse(argv: Sequence[str]) -> Args:
    """The command line ``argv`` (``argv[0]`` the program); raises UsageError."""
    argv = config_files.resolve_argv(list(argv))
    sys.argv = argv  # config_flags finds --config.* overrides in sys.argv.
    path = _config_path(argv)
    overrides = [arg for arg in argv[1:] if arg.startswith('--config.')]
    if path is None and overrides:
        raise UsageError(
            f'{overrides[0].split("=")[0]} overrides a field of the config file, but no '
            '--config is given, e.g. --config configs/default.py'
        )
    # config_flags warns through absl logging (get_config() returning None): the
    # user gets this tool's own error line instead.
    logging.getLogger('absl').setLevel(logging.CRITICAL)
    if path:
        config_files.allow_sibling_imports(path)
    _parse_flags(argv)
    workdir = os.path.expanduser(FLAGS.workdir)
    config = None if FLAGS.mode == 'report' else _load_config(path)
    return Args(
        argv,
        config,
        workdir,
        FLAGS.mode,
        FLAGS.overwrite,
        FLAGS.new_run,
        FLAGS.workers,
        FLAGS.compilation_cache,
    )


def _parse_flags(argv: list[str]) -> None:
    """Parses ``argv`` into FLAGS; checks what every mode needs."""
    try:
        rest = FLAGS(argv)
    except flags.Error as e:
        raise UsageError(e) from None
    except Exception as e:  # pylint: disable=broad-except  # User input: no traceback.
        raise UsageError(_parse_error(e, argv)) from None
    if len(rest) > 1:
        raise UsageError(f'unexpected argument(s): {" ".join(rest[1:])} (flags start with --)')
    if not FLAGS.workdir:
        raise UsageError('--workdir is required, e.g. --workdir runs/default')


def _load_config(path: str | None) -> Any:
    """The config of ``--config`` (file ``path``) with its overrides."""
    if path is None:
        raise UsageError('--config is required, e.g. --config configs/default.py')
    if not os.path.isfile(path):
        raise UsageError(config_files.not_found(path))
    try:
        config = FLAGS.config
        if config is not None:
            config.keys()  # config_flags defers errors of loading the file until here.
    except Exception as e:  # pylint: disable=broad-except
        raise UsageError(f'could not load config file {path}: {str(e).splitlines()[-1]}') from None
    if config is None:
        raise UsageError(f'{path}: get_config() returned None, not a ConfigDict')
    if FLAGS.sweep_shard != '0/1':
        raise UsageError(
            '--sweep_shard is replaced by workers that share one queue: start the same '
            'command N times (on any machines sharing the workdir), or pass --workers=N'
        )
    return config


def _parse_error(error: Exception, argv: Sequence[str]) -> str:
    """Explains a failure to load the config file or apply an override."""
    path = _config_path(argv)
    fields = config_files.fields(path) if path else []
    for arg in argv:
        if not arg.startswith('--config.'):
            continue
        name = arg[len('--config.') :].split('=', 1)[0]
        if fields and name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            hint = f'; did you mean config.{close[0]}?' if close else ''
            return f'unknown config field config.{name} in {arg}{hint}'
    if not fields:
        return f'could not load config file {path}: {type(error).__name__}: {error}'
    return f'invalid flags: {type(error).__name__}: {error}'


def usage() -> str:
    """The ``--help`` text: this module's docstring, the flags, the shipped configs."""
    lines = [__doc__.strip(), '', 'Flags:']
    for name in OWN_FLAGS:
        flag = FLAGS[name]
        default = '' if flag.default is None else f' (default: {flag.default_as_str})'
        lines.append(f'  --{name}: {flag.help}{default}')
    lines.append(
        '  --config.FIELD=VALUE: override one field of the config, e.g. '
        '--config.learning_rate=0.001 (the fields are listed in resnet_jax/config.py)'
    )
    shipped = [
        f'  {name}: {config_files.summary(path)}' for name, path in config_files.shipped().items()
    ]
    lines += ['', 'Shipped configs (--config NAME):', *(shipped or ['  none found'])]
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
