"""The command line: a smoke run, eval mode, and one-line errors with exit code 2."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


def _run(args, cwd=REPO, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    return subprocess.run(
        [sys.executable, '-m', 'resnet_jax.main', *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _assert_usage_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith('error: '), proc.stderr
    assert 'Traceback' not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[-1]


def test_smoke_config_trains_and_evaluates(tmp_path, cifar_py):
    workdir = tmp_path / 'smoke'
    # Run from another directory: the config must still find configs/default.py.
    proc = _run(
        [
            '--config',
            os.path.join(REPO, 'configs/smoke.py'),
            '--workdir',
            str(workdir),
            f'--config.data.path={cifar_py.path}',
            '--config.data.train_subset=100',
            '--config.num_epochs=1',
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert '195,738 trainable parameters' in proc.stdout
    assert 'MFLOPs/image' in proc.stdout
    summary = json.loads((workdir / 'summary.json').read_text())
    assert summary['status'] == 'completed'
    assert summary['data']['num_train'] == 100
    assert summary['config']['data']['train_subset'] == 100

    proc = _run(['--config', 'configs/smoke.py', '--workdir', str(workdir), '--mode=eval'])
    assert proc.returncode == 0, proc.stderr
    expected = f'test accuracy {100 * summary["test_accuracy"]:.2f}%'
    assert expected in proc.stdout


@pytest.mark.parametrize(
    'override,fragment',
    [
        ('--config.learning_rate=0', 'learning_rate'),
        ('--config.learning_rate=-0.1', 'learning_rate'),
        ('--config.batch_size=0', 'batch_size'),
        ('--config.num_epochs=0', 'num_epochs'),
        ('--config.model=resnet9', 'resnet9'),
        ('--config.optimizer=rmsprop', 'rmsprop'),
        ('--config.schedule=linear', 'linear'),
        ('--config.data.source=hdf5', 'hdf5'),
        ('--config.data.path=/no/such/dir', '/no/such/dir'),
        ('--config.batch_size=abc', 'batch_size'),
        ('--config.no_such_field=1', 'no_such_field'),
    ],
)
def test_invalid_config_is_one_error_line(tmp_path, override, fragment):
    workdir = tmp_path / 'w'
    proc = _run(['--config', 'configs/smoke.py', '--workdir', str(workdir), override])
    _assert_usage_error(proc, fragment)
    assert not (workdir / 'checkpoints').exists()


def test_batch_larger_than_dataset(tmp_path, cifar_py):
    proc = _run(
        [
            '--config',
            'configs/smoke.py',
            '--workdir',
            str(tmp_path / 'w'),
            f'--config.data.path={cifar_py.path}',
            '--config.batch_size=1000',
            '--config.data.train_subset=0',
        ]
    )
    _assert_usage_error(proc, 'larger than the training set')


def test_missing_flags_and_eval_without_checkpoint(tmp_path):
    _assert_usage_error(_run(['--workdir', str(tmp_path)]), '--config')
    _assert_usage_error(_run(['--config', 'configs/smoke.py']), '--workdir')
    _assert_usage_error(_run(['--config', 'configs/no_such.py', '--workdir', str(tmp_path)]))
    proc = _run(['--config', 'configs/smoke.py', '--workdir', str(tmp_path), '--mode=eval'])
    _assert_usage_error(proc)
    _assert_usage_error(_run(['--workdir', str(tmp_path), '--mode=report']), 'holds no sweep')
