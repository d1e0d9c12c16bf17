"""Shared test helpers: the repository root, a tiny run (config and command line), the
one-error-line check, fake datasets, and the fixtures that mark a test slow.

A test starts the command line through the ``cli`` fixture and trains through the
``training`` fixture (or ``@pytest.mark.usefixtures('training')`` when it trains
through a study); ``pytest_collection_modifyitems`` marks every test using either
``slow``, and a test that trains without being marked fails.

The dataset writers live in ``tests/fake_data.py``; the fixtures here return
its ``FakeCifar`` (``.path`` for ``config.data.path`` plus the arrays a loader
must produce).
"""

import importlib.util
import os
import subprocess
import sys
import tempfile

import ml_collections
import numpy as np
import pytest

from resnet_jax.configs import default
from tests import fake_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One persistent XLA compilation cache for this pytest run, shared by the
# subprocesses the tests start (they inherit the environment): the same small
# programs are compiled once instead of once per process. Set before JAX starts.
_CACHE = tempfile.mkdtemp(prefix='resnet_jax_test_xla_cache_')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', _CACHE)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')


# Fixtures that make a test slow: every test that uses one, directly or through
# another fixture, is marked ``slow`` at collection (``-m "not slow"`` leaves it out).
SLOW_FIXTURES = ('cli', 'training')


def pytest_collection_modifyitems(items) -> None:
    """Marks ``slow`` every test that starts the command line or trains a model."""
    for item in items:
        if set(SLOW_FIXTURES) & set(getattr(item, 'fixturenames', ())):
            item.add_marker(pytest.mark.slow)


_CURRENT = {}


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item) -> None:
    """Records the test being set up, for the training guard below."""
    _CURRENT['item'] = item


@pytest.fixture(scope='session', autouse=True)
def _training_needs_the_training_fixture():
    """Training an epoch (the loop's and the benchmark's path) in a test, or in its
    fixtures, that is not marked slow fails: such a test must request the
    ``training`` fixture, which marks it."""
    from resnet_jax.training import steps  # pylint: disable=g-import-not-at-top

    real = steps.train_epoch

    def guarded(*args, **kwargs):
        item = _CURRENT.get('item')
        if item is not None and item.get_closest_marker('slow') is None:
            raise AssertionError(f'{item.nodeid} trains: request the `training` fixture')
        return real(*args, **kwargs)

    steps.train_epoch = guarded
    yield
    steps.train_epoch = real


@pytest.fixture(scope='session')
def training():
    """The training loop (``train_and_evaluate``, ``train_runs``); marks a test slow."""
    from resnet_jax.training import loop  # pylint: disable=g-import-not-at-top

    return loop


class Cli:
    """Starts ``python -m resnet_jax.main`` (or a Python script) on the CPU."""

    def start(self, args, cwd=REPO, env=None) -> subprocess.Popen:
        """Starts ``python -m resnet_jax.main ARGS``; ``env`` adds variables."""
        return self._popen(['-m', 'resnet_jax.main', *args], cwd, env)

    def run(self, args, cwd=REPO, env=None, timeout=600) -> subprocess.CompletedProcess:
        """Runs ``python -m resnet_jax.main ARGS`` to the end."""
        return self._wait(self.start(args, cwd, env), timeout)

    def start_script(self, code, *argv, cwd=REPO, env=None) -> subprocess.Popen:
        """Starts ``python -c CODE ARGV`` (a child that trains through ``main.main``)."""
        return self._popen(['-c', code, *map(str, argv)], cwd, env)

    def script(self, code, *argv, cwd=REPO, env=None, timeout=600) -> subprocess.CompletedProcess:
        """Runs ``python -c CODE ARGV`` to the end."""
        return self._wait(self.start_script(code, *argv, cwd=cwd, env=env), timeout)

    @staticmethod
    def _popen(args, cwd, env) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, *args],
            cwd=cwd,
            env=dict(os.environ, JAX_PLATFORMS='cpu', **(env or {})),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    @staticmethod
    def _wait(proc, timeout) -> subprocess.CompletedProcess:
        out, err = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope='session')
def cli() -> Cli:
    """Starts the command line in a subprocess; marks a test slow."""
    return Cli()


def load_benchmark(name: str):
    """Imports ``benchmarks/<name>.py`` (benchmarks/ is not a package)."""
    path = os.path.join(REPO, 'benchmarks', f'{name}.py')
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def tiny_args(data, workdir, *extra, epochs=1, config='configs/default.py') -> list:
    """Command-line arguments of a tiny run: batches of 32 on ``data`` into ``workdir``."""
    return [
        '--config', config, '--workdir', str(workdir), f'--config.num_epochs={epochs}',
        '--config.batch_size=32', '--config.eval_batch_size=32', f'--config.data.path={data}',
        *extra,
    ]  # fmt: skip


def one_error_line(proc, *fragments) -> str:
    """Asserts that ``proc`` (a finished process, or its ``(exit code, stderr)``) failed
    with exit code 2 and exactly one ``error:`` line holding every fragment; returns
    the line."""
    code, stderr = proc if isinstance(proc, tuple) else (proc.returncode, proc.stderr)
    lines = stderr.strip().splitlines()
    assert code == 2, stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith('error: '), stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def corrupt_checkpoint_arrays(folder) -> None:
    """Overwrites the array data files (TensorStore's) of every checkpoint in ``folder``."""
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if os.sep + 'd' + os.sep in path:
                size = os.path.getsize(path)
                with open(path, 'r+b') as f:
                    f.write(b'garbage!' * max(1, size // 8))


def make_tiny_config(data_path: str) -> ml_collections.ConfigDict:
    """The default config shrunk for CPU tests on ``cifar_py``.

    3 epochs of batch 32; the learning rate starts at 0.01 and halves every
    epoch; a checkpoint every epoch; one step per compiled call.
    """
    config = default.get_config()
    config.num_epochs = 3
    config.batch_size = 32
    config.eval_batch_size = 32
    config.decay_every_epochs = 1
    config.decay_factor = 2.0
    config.checkpoint_every_epochs = 1
    config.keep_checkpoints = 3
    config.steps_per_call = 1  # The step-by-step path (tests count its calls).
    config.data.path = data_path
    return config


# Two runs that compute the same training with float32 sums in another order (other
# devices, a scanned or vectorised program, another compilation) differ by float noise
# that training amplifies. Each of the run's steps adds a few eps of change to the
# weights; a change made at the start has the most steps to grow, so after T steps the
# runs differ by at most T times what one change of every weight by NUDGE (a few eps,
# as much as one step's reordering adds) grows to. That growth is measured, on the
# machine running the test, by training the same config from nudged weights.
NUDGE = 1e-6
EPS = float(np.finfo(np.float32).eps)


def train_nudged(training, config, workdir) -> list[dict]:
    """The records of ``config`` trained into ``workdir`` with every initial weight
    times ``1 + NUDGE``."""
    import jax  # pylint: disable=g-import-not-at-top  (after the cache settings above)

    from resnet_jax.rundir import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
    from resnet_jax.training import train  # pylint: disable=g-import-not-at-top

    real = train.create_train_state

    def nudged(*args, **kwargs):
        state = real(*args, **kwargs)
        return state.replace(params=jax.tree_util.tree_map(lambda p: p * (1 + NUDGE), state.params))

    train.create_train_state = nudged
    try:
        training.train_and_evaluate(config, str(workdir))
    finally:
        train.create_train_state = real
    return workdir_lib.read_metrics(str(workdir))


def assert_within_float_noise(got, want, nudged, steps, keys, flip=0.0) -> None:
    """Asserts that records ``got`` match ``want`` within the float noise of ``steps``
    steps: ``steps`` times the relative distance of the ``nudged`` records' losses to
    ``want`` (see NUDGE). An accuracy may also move by ``flip``: examples near a
    decision boundary flip whole (k of n examples: k / n)."""
    assert len(got) == len(want) == len(nudged)
    losses = [k for k in keys if k.endswith('loss')]
    growth = max(
        abs(n[k] - w[k]) / abs(w[k]) for n, w in zip(nudged, want, strict=True) for k in losses
    )
    for g, w in zip(got, want, strict=True):
        for key in keys:
            bound = (steps * growth + 16 * EPS) * abs(w[key])
            bound += flip if key.endswith('accuracy') else 0.0
            assert abs(g[key] - w[key]) <= bound, (key, g[key], w[key], growth, bound)


@pytest.fixture(scope='session')
def cifar_py(tmp_path_factory) -> fake_data.FakeCifar:
    """A fake CIFAR-10 python version: 120 train (5 x 24) + 50 test images."""
    root = tmp_path_factory.mktemp('cifar_py')
    return fake_data.write_cifar_py(root, n_train_per_batch=24, n_test=50)


def read_hparams(workdir) -> dict:
    """What TensorBoard's HParams tab reads of a run, through TensorBoard's own reader:
    ``hparams``, the entry's end ``status`` (an api.proto Status name), the final
    ``metrics`` by tag, whether an ``experiment`` summary is there and the event ``files``."""
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.plugins.hparams import api_pb2, metadata

    logdir = os.path.join(str(workdir), 'hparams')
    acc = event_accumulator.EventAccumulator(logdir)
    acc.Reload()
    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    end = metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG])
    return {
        'hparams': {k: getattr(v, v.WhichOneof('kind')) for k, v in start.hparams.items()},
        'status': api_pb2.Status.Name(end.status),
        'metrics': {tag: acc.Scalars(tag)[-1].value for tag in acc.Tags()['scalars']},
        'experiment': metadata.EXPERIMENT_TAG in content,
        'files': len([n for n in os.listdir(logdir) if n.startswith('events.out.tfevents.')]),
    }
