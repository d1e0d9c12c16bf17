"""Faults found by trying bad input and broken disks as a new user would (second round).

Each test reproduces one failure through the command line or the library:
configs without sections, a disk that fills during a checkpoint or before the
start, corrupt checkpoints in training and in eval mode, help flags, foreign
files in a workdir, non-finite numbers, a second Ctrl-C (16-bit images:
test_datasets.py).
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from resnet_jax import loop, train, validation, workdir, writers
from tests.conftest import REPO, make_tiny_config, run_cli

TINY = [
    '--config.num_epochs=3',
    '--config.batch_size=32',
    '--config.eval_batch_size=32',
    '--config.steps_per_call=1',
]

# A child that trains the tiny config through main.main with one fault:
#   fsize_at_save N LIMIT: files may not grow past LIMIT bytes from the N-th
#       checkpoint save on (RLIMIT_FSIZE: writes fail as on a full disk);
#   fsize_now LIMIT: the same from the start;
#   double_signal: SIGINT at step 6, and a second SIGINT while that
#       checkpoint is being saved (the save then takes a minute).
FAULTY = textwrap.dedent("""
    import os, resource, signal, sys, time
    fault, data, workdir, *rest = sys.argv[1:]
    from resnet_jax import checkpoints, loop, main
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death.

    def limit(size):
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(size), resource.RLIM_INFINITY))

    real_save, real_step = checkpoints.save, loop.update_runs
    saves, steps = [0], [0]
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
            steps[0] += 1
            if steps[0] == 6:
                os.kill(os.getpid(), signal.SIGINT)
            return real_step(*args, **kwargs)
        def slow_save(*args, **kwargs):
            if saves[0] == 1:  # The interrupt's save (the first is epoch 1's).
                print('second signal', file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(60)
            saves[0] += 1
            return real_save(*args, **kwargs)
        loop.update_runs, checkpoints.save = step, slow_save
    sys.exit(main.main([
        'main', '--config', 'configs/default.py', '--workdir', workdir,
        '--config.num_epochs=3', '--config.batch_size=32', '--config.eval_batch_size=32',
        '--config.decay_every_epochs=1', '--config.decay_factor=2.0', '--config.steps_per_call=1',
        f'--config.data.path={data}',
    ]))
""")


def _faulty(fault, data, workdir, *rest):
    return subprocess.run(
        [sys.executable, '-c', FAULTY, fault, data, str(workdir), *map(str, rest)],
        cwd=REPO,
        env=dict(os.environ, JAX_PLATFORMS='cpu'),
        capture_output=True,  # Pipes: not limited by RLIMIT_FSIZE.
        text=True,
        timeout=600,
    )


def _steps(path):
    return sorted(int(s) for s in os.listdir(os.path.join(path, 'checkpoints')) if s.isdigit())


def _one_error_line(proc, *fragments):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _corrupt_arrays(folder):
    """Overwrites the array data files (TensorStore's) of every checkpoint in ``folder``."""
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if os.sep + 'd' + os.sep in path:
                size = os.path.getsize(path)
                with open(path, 'r+b') as f:
                    f.write(b'garbage!' * max(1, size // 8))


# 1. Configs without the sections main.py reads first.


@pytest.mark.parametrize(
    'body,fragment',
    [
        (
            'c = default.get_config(); del c.distributed; return c',
            'config.distributed.enabled is missing',
        ),
        ('return dict(default.get_config())', 'must return an ml_collections.ConfigDict'),
    ],
)
def test_a_config_without_distributed_or_not_a_configdict_is_one_error(tmp_path, body, fragment):
    config = tmp_path / 'configs' / 'odd.py'
    config.parent.mkdir()
    config.write_text(
        f'from configs import default\n\n\ndef get_config():\n    {body}\n',
    )
    env = {'PYTHONPATH': REPO}
    proc = run_cli(['--config', str(config), '--workdir', str(tmp_path / 'w')], env=env)
    _one_error_line(proc, fragment)


# 2. The disk fills during a checkpoint.


def test_disk_full_during_a_checkpoint_is_one_line_and_cleans_up(cifar_py, tmp_path):
    proc = _faulty('fsize_at_save', cifar_py.path, tmp_path, 2, 1000)
    _one_error_line(
        proc,
        f'could not write the checkpoint of step 8 in {tmp_path}/checkpoints',
        'the earlier checkpoints are intact',
    )
    assert os.listdir(tmp_path / 'checkpoints') == ['4']  # No orbax temporary folder left.
    assert not (tmp_path / '.lock').exists()
    # With space again, a rerun resumes from the intact checkpoint and finishes.
    _, summary = loop.train_and_evaluate(make_tiny_config(cifar_py.path), str(tmp_path))
    assert summary['status'] == 'completed' and _steps(tmp_path) == [4, 8, 12]


# 3. The disk is full before the start.


def test_disk_full_at_the_start_names_the_path_and_leaves_no_lock(cifar_py, tmp_path):
    proc = _faulty('fsize_now', cifar_py.path, tmp_path, 0)
    line = _one_error_line(proc, str(tmp_path))
    assert 'File too large' in line or 'No space' in line
    assert not (tmp_path / '.lock').exists()
    assert [n for n in os.listdir(tmp_path) if n.startswith('.lock')] == []


@pytest.mark.parametrize('content', ['', 'garbage', None])
def test_an_empty_or_unreadable_lock_is_stale(tmp_path, content):
    path = tmp_path / workdir.LOCK_FILE
    if content is None:
        path.mkdir()  # Unreadable as a file.
        (path / 'x').write_text('')
        with pytest.raises(workdir.WorkdirBusy):  # It cannot be removed: says so.
            with workdir.lock(str(tmp_path)):
                pass
        return
    path.write_text(content)
    with workdir.lock(str(tmp_path)):
        assert path.read_text().split()[1] == str(os.getpid())
    assert not path.exists()


def test_a_live_lock_is_respected_and_a_lock_is_never_empty(tmp_path):
    with workdir.lock(str(tmp_path)):
        assert (tmp_path / workdir.LOCK_FILE).read_text().strip()
        with pytest.raises(workdir.WorkdirBusy, match='is in use by process'):
            with workdir.lock(str(tmp_path)):
                pass


# 4. Every checkpoint corrupt; 5. eval mode with a corrupt latest checkpoint.


def test_no_readable_checkpoint_is_exactly_one_line_and_rewrites_nothing(cifar_py, tmp_path):
    args = ['--config', 'configs/default.py', '--workdir', str(tmp_path), *TINY]
    args.append(f'--config.data.path={cifar_py.path}')
    assert run_cli([*args[:-5], '--config.num_epochs=2', *args[-4:]]).returncode == 0
    before = (tmp_path / 'config.json').read_text()
    _corrupt_arrays(tmp_path / 'checkpoints')
    proc = run_cli(args)  # num_epochs 2 -> 3
    _one_error_line(proc, f'no readable checkpoint in {tmp_path}/checkpoints (steps 8, 4')
    assert (tmp_path / 'config.json').read_text() == before
    assert _steps(tmp_path) == [4, 8] and not (tmp_path / 'checkpoints_corrupt').exists()


def test_eval_falls_back_to_the_newest_readable_checkpoint(cifar_py, tmp_path):
    config = make_tiny_config(cifar_py.path)
    config.num_epochs = 2
    _, summary = loop.train_and_evaluate(config, str(tmp_path))
    _corrupt_arrays(tmp_path / 'checkpoints' / '8')
    args = ['--config', 'configs/default.py', '--workdir', str(tmp_path), '--mode=eval']
    proc = run_cli(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'checkpoint 8 is unreadable' in proc.stdout and 'using checkpoint 4' in proc.stdout
    first = writers.read_metrics(str(tmp_path))[0]
    assert f'test accuracy {100 * first["test_accuracy"]:.2f}%' in proc.stdout
    assert proc.stderr == '' and _steps(tmp_path) == [4, 8]  # Read-only: nothing moved.
    _corrupt_arrays(tmp_path / 'checkpoints' / '4')
    _one_error_line(run_cli(args), 'no readable checkpoint')


def test_the_corrupt_checkpoint_warning_is_one_line(cifar_py, tmp_path, caplog):
    config = make_tiny_config(cifar_py.path)
    config.num_epochs = 2
    loop.train_and_evaluate(config, str(tmp_path))
    _corrupt_arrays(tmp_path / 'checkpoints' / '8')
    caplog.clear()
    loop.train_and_evaluate(config, str(tmp_path))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
    [moved] = [w for w in warnings if 'checkpoint 8 is unreadable' in w]
    assert '\n' not in moved and len(moved) < 500, moved
    [target] = os.listdir(tmp_path / 'checkpoints_corrupt')
    assert moved.endswith(f'moved to {tmp_path}/checkpoints_corrupt/{target}')


# 6. Help; extra arguments; `~` in --workdir.


@pytest.mark.parametrize('flag', ['--help', '-h'])
def test_help_prints_usage_and_exits_0(flag):
    proc = run_cli([flag])
    assert proc.returncode == 0, proc.stderr
    assert '--workdir' in proc.stdout and '--config.FIELD=VALUE' in proc.stdout
    assert proc.stderr == ''


def test_extra_positional_arguments_are_refused(tmp_path):
    proc = run_cli(['--config', 'configs/smoke.py', '--workdir', str(tmp_path), 'oops'])
    _one_error_line(proc, 'unexpected argument(s): oops')


def test_workdir_tilde_is_the_home_directory(tmp_path, cifar_py):
    home = tmp_path / 'home'
    home.mkdir()
    config = os.path.join(REPO, 'configs/smoke.py')
    args = ['--config', config, '--workdir=~/x', '--config.num_epochs=1']
    args += ['--config.data.train_subset=64', f'--config.data.path={cifar_py.path}']
    proc = run_cli(args, cwd=tmp_path, env={'HOME': str(home), 'PYTHONPATH': REPO})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (home / 'x' / 'summary.json').exists() and not (tmp_path / '~').exists()


# 7. A workdir holding someone else's config.json.


def test_a_foreign_config_json_is_never_overwritten(cifar_py, tmp_path):
    (tmp_path / 'config.json').write_text('{"name": "my-app"}')
    for extra in ([], ['--overwrite']):
        args = ['--config', 'configs/smoke.py', '--workdir', str(tmp_path), *extra]
        proc = run_cli(
            [*args, '--config.data.train_subset=0', f'--config.data.path={cifar_py.path}']
        )
        _one_error_line(proc, 'is not the config of a resnet_jax run')
        assert (tmp_path / 'config.json').read_text() == '{"name": "my-app"}'
    assert sorted(os.listdir(tmp_path)) == ['config.json']


# Non-finite numbers.


@pytest.mark.parametrize('value', ['inf', 'nan'])
def test_non_finite_learning_rate_is_refused(value):
    config = make_tiny_config('')
    config.learning_rate = float(value)
    with pytest.raises(validation.ConfigError, match='learning_rate must be a finite number'):
        validation.validate_config(config)


def test_nan_is_written_as_null(tmp_path):
    workdir.write_json(str(tmp_path / 's.json'), {'a': float('nan'), 'b': [1.0, float('inf')]})
    assert json.loads((tmp_path / 's.json').read_text()) == {'a': None, 'b': [1.0, None]}
    logger = writers.MetricLogger(str(tmp_path))
    record = dict.fromkeys(train.METRIC_KEYS, 1.0) | {'epoch': 1, 'test_loss': float('nan')}
    logger.write(record)
    logger.close()
    line = (tmp_path / 'metrics.jsonl').read_text()
    assert json.loads(line, parse_constant=pytest.fail)['test_loss'] is None


def test_a_nan_test_loss_stops_the_run(cifar_py, tmp_path, monkeypatch):
    config = make_tiny_config(cifar_py.path)
    real = train.evaluate

    def poisoned(states, *args, **kwargs):
        results = real(states, *args, **kwargs)
        if int(states.step[0]) == 8:
            return [r | {'loss': float('nan')} for r in results]
        return results

    monkeypatch.setattr(train, 'evaluate', poisoned)
    _, summary = loop.train_and_evaluate(config, str(tmp_path))
    assert summary['status'] == 'diverged'
    assert summary['error'] == 'non-finite test loss in epoch 2'
    assert _steps(tmp_path) == [4] and len(writers.read_metrics(str(tmp_path))) == 1


# A second Ctrl-C.


def test_a_second_ctrl_c_stops_at_once(cifar_py, tmp_path):
    start = time.monotonic()
    proc = _faulty('double_signal', cifar_py.path, tmp_path)
    assert 'second signal' in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == -signal.SIGINT, proc.stderr[-3000:]
    assert time.monotonic() - start < 55  # Not after the minute-long save.
    assert _steps(tmp_path) == [4]  # The cut-short save left no checkpoint.
    _, summary = loop.train_and_evaluate(make_tiny_config(cifar_py.path), str(tmp_path))
    assert summary['status'] == 'completed'
