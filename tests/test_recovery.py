"""Failure behaviour: kills, signals, corrupt checkpoints, divergence, config changes."""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from resnet_jax import checkpoints, loop, train, validation, writers
from tests.conftest import REPO, make_tiny_config

COMPARED = ('train_loss', 'train_accuracy', 'test_loss', 'test_accuracy', 'learning_rate')
STEPS_PER_EPOCH = 4  # 120 training images in batches of 32 (the last of 24).


def _metrics(workdir):
    return [{k: r[k] for k in COMPARED} for r in writers.read_metrics(str(workdir))]


def _steps(workdir):
    return sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')))


@pytest.fixture(scope='module')
def reference(tmp_path_factory, cifar_py):
    """An uninterrupted 3-epoch run: what every interrupted run must end with."""
    workdir = tmp_path_factory.mktemp('reference')
    state, _ = loop.train_and_evaluate(make_tiny_config(cifar_py.path), str(workdir))
    return _metrics(workdir), state


# A child process that trains the tiny config, killing itself at one moment.
KILLER = textwrap.dedent("""
    import os, signal, sys
    import orbax.checkpoint as ocp
    from resnet_jax import loop, main, train
    moment, data, workdir = sys.argv[1:4]
    sig = signal.SIGKILL if moment.startswith('kill') else getattr(signal, moment)

    def die():
        os.kill(os.getpid(), sig)

    def counting(fn, at):
        calls = [0]
        def wrapped(*args, **kwargs):
            calls[0] += 1
            if calls[0] == at:
                die()
            return fn(*args, **kwargs)
        return wrapped

    if moment in ('kill_mid_epoch', 'SIGTERM', 'SIGINT'):
        loop.update_runs = counting(loop.update_runs, 6)  # Epoch 2, second step.
    elif moment == 'kill_during_eval':
        train.eval_steps = counting(train.eval_steps, 3)  # Epoch 2's evaluation.
    elif moment == 'kill_during_save':
        save = ocp.CheckpointManager.save
        def save_then_die(self, *args, **kwargs):
            result = save(self, *args, **kwargs)  # Async: the write is in flight.
            if kwargs.get('args') and args and args[0] == 8:
                die()
            return result
        ocp.CheckpointManager.save = save_then_die
    sys.exit(main.main([
        'main', '--config', 'configs/default.py', '--workdir', workdir,
        '--config.num_epochs=3', '--config.batch_size=32', '--config.eval_batch_size=32',
        '--config.decay_every_epochs=1', '--config.decay_factor=2.0', '--config.steps_per_call=1',
        f'--config.data.path={data}',
    ]))
""")


def _child(moment, data, workdir):
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    return subprocess.run(
        [sys.executable, '-c', KILLER, moment, data, str(workdir)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize('moment', ['kill_mid_epoch', 'kill_during_save', 'kill_during_eval'])
def test_kill_9_then_rerun_ends_like_an_uninterrupted_run(moment, reference, cifar_py, tmp_path):
    proc = _child(moment, cifar_py.path, tmp_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    # Only complete checkpoints count: epoch 1's (step 4), and epoch 2's only if
    # its write finished before the kill.
    state, summary = loop.train_and_evaluate(make_tiny_config(cifar_py.path), str(tmp_path))
    assert summary['status'] == 'completed'
    assert _metrics(tmp_path) == reference[0]
    jax.tree_util.tree_map(np.testing.assert_array_equal, state.params, reference[1].params)


@pytest.mark.parametrize('name,code', [('SIGTERM', 143), ('SIGINT', 130)])
def test_signal_saves_a_mid_epoch_checkpoint_and_resumes(name, code, reference, cifar_py, tmp_path):
    proc = _child(name, cifar_py.path, tmp_path)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert 'interrupted: stopped in epoch 2 after 2/4 steps' in proc.stderr
    assert 'Traceback' not in proc.stderr
    assert _steps(tmp_path) == [4, 6]  # Epoch 1's and the mid-epoch one.
    assert len(writers.read_metrics(str(tmp_path))) == 1
    loop.train_and_evaluate(make_tiny_config(cifar_py.path), str(tmp_path))
    assert _metrics(tmp_path) == reference[0]


def _corrupt(folder, how):
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            size = os.path.getsize(path)
            with open(path, 'r+b') as f:
                if how == 'truncate':
                    f.truncate(size // 2)
                else:
                    f.write(b'garbage!' * max(1, size // 8))


@pytest.mark.parametrize('how', ['truncate', 'garbage'])
def test_corrupt_latest_checkpoint_falls_back_to_the_previous(
    how, reference, cifar_py, tmp_path, caplog
):
    config = make_tiny_config(cifar_py.path)
    loop.train_and_evaluate(config, str(tmp_path))
    _corrupt(tmp_path / 'checkpoints' / '12', how)
    state, summary = loop.train_and_evaluate(config, str(tmp_path))
    assert 'checkpoint 12' in caplog.text and 'unreadable' in caplog.text
    assert summary['status'] == 'completed'
    assert _metrics(tmp_path) == reference[0]  # Epoch 3 trained again, same result.
    assert _steps(tmp_path) == [4, 8, 12]
    assert len(os.listdir(tmp_path / 'checkpoints_corrupt')) == 1  # Kept, not deleted.


def test_no_readable_checkpoint_is_an_error_that_moves_nothing(cifar_py, tmp_path):
    config = make_tiny_config(cifar_py.path)
    config.num_epochs = 2
    loop.train_and_evaluate(config, str(tmp_path))
    _corrupt(tmp_path / 'checkpoints', 'garbage')
    config.num_epochs = 3
    with pytest.raises(
        checkpoints.CheckpointError, match='no readable checkpoint in .*checkpoints'
    ):
        loop.train_and_evaluate(config, str(tmp_path))
    assert _steps(tmp_path) == [4, 8] and not (tmp_path / 'checkpoints_corrupt').exists()
    assert len(writers.read_metrics(str(tmp_path))) == 2  # Nothing started over.


def test_non_finite_loss_stops_within_the_epoch_and_keeps_good_checkpoints(
    cifar_py, tmp_path, monkeypatch
):
    config = make_tiny_config(cifar_py.path)
    config.check_finite_every_steps = 2
    real_step = loop.update_runs
    calls = [0]

    def poisoned(states, batches):
        calls[0] += 1
        if calls[0] == 6:  # Epoch 2: NaN images make NaN loss and parameters.
            batches = dict(batches, image=batches['image'] * np.nan)
        return real_step(states, batches)

    monkeypatch.setattr(loop, 'update_runs', poisoned)
    state, summary = loop.train_and_evaluate(config, str(tmp_path))
    assert summary['status'] == 'diverged'
    assert summary['error'] == 'non-finite loss or gradients in epoch 2 (by step 2)'
    assert calls[0] == 6  # Stopped at the check, not at the end of the epoch.
    assert _steps(tmp_path) == [4]
    assert len(writers.read_metrics(str(tmp_path))) == 1
    monkeypatch.undo()
    model, variables, _ = checkpoints.restore(str(tmp_path))
    assert bool(train.runs_finite(train.stack([variables]))[0])


def test_a_different_config_is_refused_unless_overwritten(cifar_py, tmp_path):
    config = make_tiny_config(cifar_py.path)
    config.num_epochs = 1
    loop.train_and_evaluate(config, str(tmp_path))
    before = (tmp_path / 'config.json').read_text(), _steps(tmp_path)
    config.learning_rate, config.batch_size = 0.001, 16
    with pytest.raises(validation.ConfigError) as e:
        loop.train_and_evaluate(config, str(tmp_path))
    assert 'batch_size: 32 -> 16; learning_rate: 0.01 -> 0.001' in str(e.value)
    assert '--overwrite' in str(e.value)
    assert ((tmp_path / 'config.json').read_text(), _steps(tmp_path)) == before

    _, summary = loop.train_and_evaluate(config, str(tmp_path), overwrite=True)
    assert summary['config']['learning_rate'] == 0.001
    assert json.loads((tmp_path / 'config.json').read_text())['batch_size'] == 16
    assert len(writers.read_metrics(str(tmp_path))) == 1

    config.num_epochs = 2  # Extending a run is allowed.
    _, summary = loop.train_and_evaluate(config, str(tmp_path))
    assert summary['epochs_completed'] == 2 and summary['status'] == 'completed'


def test_disk_full_during_a_checkpoint_keeps_the_earlier_ones(cifar_py, tmp_path, monkeypatch):
    config = make_tiny_config(cifar_py.path)
    real_save = checkpoints.ocp.CheckpointManager.save

    def full(self, step, *args, **kwargs):
        if step == 8:
            raise OSError(errno.ENOSPC, 'No space left on device')
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(checkpoints.ocp.CheckpointManager, 'save', full)
    with pytest.raises(checkpoints.CheckpointError, match='No space left on device'):
        loop.train_and_evaluate(config, str(tmp_path))
    assert _steps(tmp_path) == [4]
    monkeypatch.undo()
    _, summary = loop.train_and_evaluate(config, str(tmp_path))
    assert summary['status'] == 'completed'


def test_two_runs_with_one_seed_are_identical(reference, cifar_py, tmp_path):
    loop.train_and_evaluate(make_tiny_config(cifar_py.path), str(tmp_path))
    assert _metrics(tmp_path) == reference[0]
