"""Shared test helpers: the repository root, a tiny run config, fake datasets.

The dataset writers live in ``tests/fake_data.py``; the fixtures here return
its ``FakeCifar`` (``.path`` for ``config.data.path`` plus the arrays a loader
must produce).
"""

import os
import subprocess
import sys
import tempfile

import ml_collections
import pytest

from resnet_jax.configs import default
from tests import fake_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One persistent XLA compilation cache for this test session, shared by the
# subprocesses the tests start (they inherit the environment): the same small
# programs are compiled once instead of once per process. Set before JAX starts.
_CACHE = tempfile.mkdtemp(prefix='resnet_jax_test_xla_cache_')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', _CACHE)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')


def start_cli(args, cwd=REPO, env=None) -> subprocess.Popen:
    """Starts ``python -m resnet_jax.main ARGS`` on the CPU; ``env`` adds variables."""
    return subprocess.Popen(
        [sys.executable, '-m', 'resnet_jax.main', *args],
        cwd=cwd,
        env=dict(os.environ, JAX_PLATFORMS='cpu', **(env or {})),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_cli(args, cwd=REPO, env=None, timeout=600) -> subprocess.CompletedProcess:
    """Runs ``python -m resnet_jax.main ARGS`` to the end."""
    proc = start_cli(args, cwd, env)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def one_error_line(proc, *fragments) -> str:
    """Asserts that ``proc`` failed with exit code 2 and exactly one ``error:`` line
    holding every fragment; returns the line."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr[-3000:]
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


@pytest.fixture(scope='session')
def cifar_py(tmp_path_factory) -> fake_data.FakeCifar:
    """A fake CIFAR-10 python version: 120 train (5 x 24) + 50 test images."""
    root = tmp_path_factory.mktemp('cifar_py')
    return fake_data.write_cifar_py(root, n_train_per_batch=24, n_test=50)
