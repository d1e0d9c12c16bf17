"""Command line: train a config into a workdir, or evaluate a workdir.

    python -m resnet_jax.main --config configs/default.py --workdir runs/default \
        [--config.learning_rate=0.001 --config.data.path=data/cifar10-jpeg ...]
    python -m resnet_jax.main --config configs/default.py --workdir runs/default --mode=eval

Rerunning a training command on the same workdir resumes from its latest
checkpoint. Invalid input stops with one ``error:`` line on stderr and exit
code 2, before anything is compiled.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Sequence

from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'Path to a config file (a module with get_config()).',
    lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and logs.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval'],
                  'train: train (resuming if possible); eval: evaluate the '
                  'latest checkpoint of --workdir on the test set.')

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _fail(message: str) -> int:
  message = ' '.join(str(message).split())  # One line.
  print(f'error: {message}', file=sys.stderr)
  return EXIT_USAGE


def _config_root_on_path(argv: Sequence[str]) -> None:
  """Lets configs import ``configs.default`` from any working directory."""
  for i, arg in enumerate(argv):
    path = None
    if arg.startswith('--config='):
      path = arg.split('=', 1)[1]
    elif arg == '--config' and i + 1 < len(argv):
      path = argv[i + 1]
    if path:
      root = os.path.dirname(os.path.dirname(os.path.abspath(path.split(':')[0])))
      if root not in sys.path:
        sys.path.insert(0, root)


def _setup_logging() -> None:
  handler = logging.StreamHandler(sys.stdout)
  handler.setFormatter(logging.Formatter('%(asctime)s %(message)s', '%H:%M:%S'))
  log = logging.getLogger('resnet_jax')
  log.handlers[:] = [handler]
  log.setLevel(logging.INFO)
  log.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command line; returns the process exit code."""
  argv = list(sys.argv if argv is None else argv)
  _config_root_on_path(argv)
  try:
    FLAGS(argv)
  except flags.Error as e:
    return _fail(e)
  if FLAGS.config is None:
    return _fail('--config is required, e.g. --config configs/default.py')
  if not FLAGS.workdir:
    return _fail('--workdir is required, e.g. --workdir runs/default')
  _setup_logging()

  # Imported after flag parsing so that `--help` and usage errors are instant.
  from resnet_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from resnet_jax import train  # pylint: disable=g-import-not-at-top
  from resnet_jax import validation  # pylint: disable=g-import-not-at-top

  try:
    if FLAGS.mode == 'eval':
      path = FLAGS.config.data.path or None
      result = train.evaluate_workdir(FLAGS.workdir, path)
      print(f"test accuracy {100 * result['accuracy']:.2f}% "
            f"(loss {result['loss']:.4f}) from {FLAGS.workdir}")
    else:
      train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (validation.ConfigError, input_pipeline.DataError,
          FileNotFoundError) as e:
    return _fail(e)
  except KeyboardInterrupt:
    print('interrupted', file=sys.stderr)
    return EXIT_INTERRUPTED
  return 0


if __name__ == '__main__':
  sys.exit(main())
