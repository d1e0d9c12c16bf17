"""Runs that meet faults stop cleanly and resume to the uninterrupted result.

Kills at any moment, SIGTERM/SIGINT (and a second Ctrl-C), corrupt or unreadable
checkpoints in training and in eval mode, a disk that fills, non-finite numbers,
and a changed config. Each test reproduces one fault in a child process or by
patching the library.
"""

import json
import os
import shutil
import signal
import textwrap
import time

import jax
import numpy as np
import pytest

from resnet_jax import validation
from resnet_jax.rundir import workdir as workdir_lib
from resnet_jax.training import checkpoints, steps, train
from tests.conftest import (
    corrupt_checkpoint_arrays,
    make_tiny_config,
    one_error_line,
    read_hparams,
    tiny_args,
)

# make_tiny_config on the command line (with tiny_args' batches and epochs=3).
TINY = ('--config.decay_every_epochs=1', '--config.decay_factor=2.0', '--config.steps_per_call=1')
COMPARED = ('train_loss', 'train_accuracy', 'test_loss', 'test_accuracy', 'learning_rate')
STEPS_PER_EPOCH = 4  # 120 training images in batches of 32 (the last of 24).


def _metrics(workdir):
    return [{k: r[k] for k in COMPARED} for r in workdir_lib.read_metrics(str(workdir))]


def _steps(workdir):
    return sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')))


@pytest.fixture(scope='module')
def reference(training, tmp_path_factory, cifar_py):
    """An uninterrupted 3-epoch run: what every interrupted run must end with (metrics,
    final state, workdir)."""
    workdir = tmp_path_factory.mktemp('reference')
    state, _ = training.train_and_evaluate(make_tiny_config(cifar_py.path), str(workdir))
    return _metrics(workdir), state, str(workdir)


# A child process that trains the tiny config, killing itself at one moment.
KILLER = textwrap.dedent("""
    import os, signal, sys
    import orbax.checkpoint as ocp
    from resnet_jax.cli import main
    from resnet_jax.training import steps
    moment, args = sys.argv[1], sys.argv[2:]
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
        steps.update_runs = counting(steps.update_runs, 6)  # Epoch 2, second step.
    elif moment == 'kill_during_eval':
        steps.eval_steps = counting(steps.eval_steps, 3)  # Epoch 2's evaluation.
    elif moment == 'kill_during_save':
        save = ocp.CheckpointManager.save
        def save_then_die(self, *args, **kwargs):
            result = save(self, *args, **kwargs)  # Async: the write is in flight.
            if kwargs.get('args') and args and args[0] == 8:
                die()
            return result
        ocp.CheckpointManager.save = save_then_die
    sys.exit(main.main(['main', *args]))
""")


def _child(cli, moment, data, workdir):
    return cli.script(KILLER, moment, *tiny_args(data, workdir, *TINY, epochs=3))


# A child that trains the tiny config through main.main with one fault:
#   fsize_at_save N LIMIT: files may not grow past LIMIT bytes from the N-th
#       checkpoint save on (RLIMIT_FSIZE: writes fail as on a full disk);
#   fsize_now LIMIT: the same from the start;
#   double_signal: SIGINT at step 6, and a second SIGINT while that
#       checkpoint is being saved (the save then takes a minute).
FAULTY = textwrap.dedent("""
    import os, resource, signal, sys, time
    fault, *rest = sys.argv[1:sys.argv.index('--')]
    args = sys.argv[sys.argv.index('--') + 1:]
    from resnet_jax.training import checkpoints
    from resnet_jax.cli import main
    from resnet_jax.training import steps
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death.

    def limit(size):
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(size), resource.RLIM_INFINITY))

    real_save, real_step = checkpoints.save, steps.update_runs
    saves, step_calls = [0], [0]
    if fault == 'fsize_now':
        limit(rest[0])
    elif fault == 'fsize_at_save':
        def save(*args, **kwargs):
            saves[0] += 1
            if saves[0] == int(rest[0]):
                limit(rest[1])
            return real_save(*args, **kwargs)
        checkpoints.save = save
    elif fault == 'double_signal':
        def step(*args, **kwargs):
            step_calls[0] += 1
            if step_calls[0] == 6:
                os.kill(os.getpid(), signal.SIGINT)
            return real_step(*args, **kwargs)
        def slow_save(*args, **kwargs):
            if saves[0] == 1:  # The interrupt's save (the first is epoch 1's).
                print('second signal', file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(60)
            saves[0] += 1
            return real_save(*args, **kwargs)
        steps.update_runs, checkpoints.save = step, slow_save
    sys.exit(main.main(['main', *args]))
""")


def _faulty(cli, fault, data, workdir, *rest):
    # Pipes for the output: not limited by RLIMIT_FSIZE.
    return cli.script(FAULTY, fault, *rest, '--', *tiny_args(data, workdir, *TINY, epochs=3))


@pytest.mark.parametrize('moment', ['kill_mid_epoch', 'kill_during_save', 'kill_during_eval'])
def test_kill_9_then_rerun_ends_like_an_uninterrupted_run(
    cli, training, moment, reference, cifar_py, tmp_path
):
    proc = _child(cli, moment, cifar_py.path, tmp_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    # Only complete checkpoints count: epoch 1's (step 4), and epoch 2's only if
    # its write finished before the kill.
    state, summary = training.train_and_evaluate(make_tiny_config(cifar_py.path), str(tmp_path))
    assert summary['status'] == 'completed'
    assert _metrics(tmp_path) == reference[0]
    jax.tree_util.tree_map(np.testing.assert_array_equal, state.params, reference[1].params)


@pytest.mark.parametrize('name,code', [('SIGTERM', 143), ('SIGINT', 130)])
def test_signal_saves_a_mid_epoch_checkpoint_and_resumes(
    cli, training, name, code, reference, cifar_py, tmp_path
):
    proc = _child(cli, name, cifar_py.path, tmp_path)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert 'interrupted: stopped in epoch 2 after 2/4 steps' in proc.stderr
    assert 'Traceback' not in proc.stderr
    assert _steps(tmp_path) == [4, 6]  # Epoch 1's and the mid-epoch one.
    assert len(workdir_lib.read_metrics(str(tmp_path))) == 1
    training.train_and_evaluate(make_tiny_config(cifar_py.path), str(tmp_path))
    assert _metrics(tmp_path) == reference[0]


def test_a_second_ctrl_c_stops_at_once(cli, training, cifar_py, tmp_path):
    start = time.monotonic()
    proc = _faulty(cli, 'double_signal', cifar_py.path, tmp_path)
    assert 'second signal' in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == -signal.SIGINT, proc.stderr[-3000:]
    assert time.monotonic() - start < 55  # Not after the minute-long save.
    assert _steps(tmp_path) == [4]  # The cut-short save left no checkpoint.
    _, summary = training.train_and_evaluate(make_tiny_config(cifar_py.path), str(tmp_path))
    assert summary['status'] == 'completed'


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


@pytest.mark.parametrize('how', ['truncate', 'garbage', 'arrays'])
def test_corrupt_latest_checkpoint_falls_back_to_the_previous(
    training, how, reference, cifar_py, tmp_path, caplog
):
    config = make_tiny_config(cifar_py.path)
    shutil.copytree(reference[2], tmp_path, dirs_exist_ok=True)  # A finished 3-epoch run.
    if how == 'arrays':
        corrupt_checkpoint_arrays(tmp_path / 'checkpoints' / '12')
    else:
        _corrupt(tmp_path / 'checkpoints' / '12', how)
    caplog.clear()
    state, summary = training.train_and_evaluate(config, str(tmp_path))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
    [moved] = [w for w in warnings if 'checkpoint 12 is unreadable' in w]
    assert '\n' not in moved and len(moved) < 500, moved  # One short line.
    [target] = os.listdir(tmp_path / 'checkpoints_corrupt')  # Kept, not deleted.
    assert moved.endswith(f'moved to {tmp_path}/checkpoints_corrupt/{target}')
    assert summary['status'] == 'completed'
    assert _metrics(tmp_path) == reference[0]  # Epoch 3 trained again, same result.
    assert _steps(tmp_path) == [4, 8, 12]


def test_no_readable_checkpoint_is_exactly_one_line_and_rewrites_nothing(cli, cifar_py, tmp_path):
    args = tiny_args(cifar_py.path, tmp_path, '--config.steps_per_call=1', epochs=3)
    two_epochs = tiny_args(cifar_py.path, tmp_path, '--config.steps_per_call=1', epochs=2)
    assert cli.run(two_epochs).returncode == 0
    before = (tmp_path / 'config.json').read_text()
    corrupt_checkpoint_arrays(tmp_path / 'checkpoints')
    proc = cli.run(args)  # num_epochs 2 -> 3
    one_error_line(proc, f'no readable checkpoint in {tmp_path}/checkpoints (steps 8, 4')
    assert (tmp_path / 'config.json').read_text() == before
    assert _steps(tmp_path) == [4, 8] and not (tmp_path / 'checkpoints_corrupt').exists()
    assert len(workdir_lib.read_metrics(str(tmp_path))) == 2  # Nothing started over.


def test_eval_falls_back_to_the_newest_readable_checkpoint(training, cli, cifar_py, tmp_path):
    config = make_tiny_config(cifar_py.path)
    config.num_epochs = 2
    _, summary = training.train_and_evaluate(config, str(tmp_path))
    corrupt_checkpoint_arrays(tmp_path / 'checkpoints' / '8')
    args = ['--config', 'configs/default.py', '--workdir', str(tmp_path), '--mode=eval']
    proc = cli.run(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'checkpoint 8 is unreadable' in proc.stdout and 'using checkpoint 4' in proc.stdout
    first = workdir_lib.read_metrics(str(tmp_path))[0]
    assert f'test accuracy {100 * first["test_accuracy"]:.2f}%' in proc.stdout
    assert proc.stderr == '' and _steps(tmp_path) == [4, 8]  # Read-only: nothing moved.
    corrupt_checkpoint_arrays(tmp_path / 'checkpoints' / '4')
    one_error_line(cli.run(args), 'no readable checkpoint')


def test_non_finite_loss_stops_within_the_epoch_and_keeps_good_checkpoints(
    training, cifar_py, tmp_path, monkeypatch
):
    config = make_tiny_config(cifar_py.path)
    config.check_finite_every_steps = 2
    real_step = steps.update_runs
    calls = [0]

    def poisoned(states, batches):
        calls[0] += 1
        if calls[0] == 6:  # Epoch 2: NaN images make NaN loss and parameters.
            batches = dict(batches, image=batches['image'] * np.nan)
        return real_step(states, batches)

    monkeypatch.setattr(steps, 'update_runs', poisoned)
    state, summary = training.train_and_evaluate(config, str(tmp_path))
    assert summary['status'] == 'diverged'
    assert summary['error'] == 'non-finite loss or gradients in epoch 2 (by step 2)'
    assert calls[0] == 6  # Stopped at the check, not at the end of the epoch.
    assert _steps(tmp_path) == [4]
    assert len(workdir_lib.read_metrics(str(tmp_path))) == 1
    monkeypatch.undo()
    model, variables, _ = checkpoints.restore(str(tmp_path))
    assert bool(train.runs_finite(train.stack([variables]))[0])


def test_a_nan_test_loss_stops_the_run(training, cifar_py, tmp_path, monkeypatch):
    config = make_tiny_config(cifar_py.path)
    real = steps.evaluate

    def poisoned(states, *args, **kwargs):
        results = real(states, *args, **kwargs)
        if int(states.step[0]) == 8:
            return [r | {'loss': float('nan')} for r in results]
        return results

    monkeypatch.setattr(steps, 'evaluate', poisoned)
    _, summary = training.train_and_evaluate(config, str(tmp_path))
    assert summary['status'] == 'diverged'
    assert summary['error'] == 'non-finite test loss in epoch 2'
    assert _steps(tmp_path) == [4] and len(workdir_lib.read_metrics(str(tmp_path))) == 1
    found = read_hparams(tmp_path)  # In TensorBoard's HParams tab as diverged.
    assert found['hparams']['status'] == 'diverged' and found['status'] == 'STATUS_FAILURE'
    assert found['metrics']['hparam/epochs_completed'] == 1


def test_a_different_config_is_refused_unless_overwritten(training, cifar_py, tmp_path):
    config = make_tiny_config(cifar_py.path)
    config.num_epochs = 1
    training.train_and_evaluate(config, str(tmp_path))
    before = (tmp_path / 'config.json').read_text(), _steps(tmp_path)
    config.learning_rate, config.batch_size = 0.001, 16
    with pytest.raises(validation.ConfigError) as e:
        training.train_and_evaluate(config, str(tmp_path))
    assert 'batch_size: 32 -> 16; learning_rate: 0.01 -> 0.001' in str(e.value)
    assert '--overwrite' in str(e.value)
    assert ((tmp_path / 'config.json').read_text(), _steps(tmp_path)) == before

    _, summary = training.train_and_evaluate(config, str(tmp_path), overwrite=True)
    assert summary['config']['learning_rate'] == 0.001
    assert json.loads((tmp_path / 'config.json').read_text())['batch_size'] == 16
    assert len(workdir_lib.read_metrics(str(tmp_path))) == 1

    config.num_epochs = 2  # Extending a run is allowed.
    _, summary = training.train_and_evaluate(config, str(tmp_path))
    assert summary['epochs_completed'] == 2 and summary['status'] == 'completed'


def test_disk_full_during_a_checkpoint_is_one_line_and_cleans_up(cli, training, cifar_py, tmp_path):
    proc = _faulty(cli, 'fsize_at_save', cifar_py.path, tmp_path, 2, 1000)
    one_error_line(
        proc,
        f'could not write the checkpoint of step 8 in {tmp_path}/checkpoints',
        'the earlier checkpoints are intact',
    )
    assert os.listdir(tmp_path / 'checkpoints') == ['4']  # No orbax temporary folder left.
    assert not (tmp_path / '.lock').exists()
    # With space again, a rerun resumes from the intact checkpoint and finishes.
    _, summary = training.train_and_evaluate(make_tiny_config(cifar_py.path), str(tmp_path))
    assert summary['status'] == 'completed' and _steps(tmp_path) == [4, 8, 12]


def test_disk_full_at_the_start_names_the_path_and_leaves_no_lock(cli, cifar_py, tmp_path):
    proc = _faulty(cli, 'fsize_now', cifar_py.path, tmp_path, 0)
    line = one_error_line(proc, str(tmp_path))
    assert 'File too large' in line or 'No space' in line
    assert not (tmp_path / '.lock').exists()
    assert [n for n in os.listdir(tmp_path) if n.startswith('.lock')] == []


def test_two_runs_with_one_seed_are_identical(training, reference, cifar_py, tmp_path):
    training.train_and_evaluate(make_tiny_config(cifar_py.path), str(tmp_path))
    assert _metrics(tmp_path) == reference[0]
