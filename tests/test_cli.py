"""The command line: a smoke run, eval mode, help, `~` in --workdir, and one-line errors
with exit code 2 (bad configs and data, extra arguments, a foreign config.json)."""

import json
import os
import pickle

import pytest

from tests import fake_data
from tests.conftest import REPO, one_error_line, run_cli

pytestmark = pytest.mark.slow  # Every test here trains or starts the CLI.


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
    proc = run_cli(
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

    proc = run_cli(['--config', 'configs/smoke.py', '--workdir', str(workdir), '--mode=eval'])
    assert proc.returncode == 0, proc.stderr
    expected = f'test accuracy {100 * summary["test_accuracy"]:.2f}%'
    assert expected in proc.stdout

    proc = run_cli(['--workdir', str(workdir), '--mode=report'])  # A run's curves.
    assert proc.returncode == 0, proc.stderr
    assert f'curves: {workdir}/curves.png' in proc.stdout
    assert (workdir / 'curves.png').read_bytes().startswith(b'\x89PNG')


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
    proc = run_cli(['--config', 'configs/smoke.py', '--workdir', str(workdir), override])
    _assert_usage_error(proc, fragment)
    assert not (workdir / 'checkpoints').exists()


def test_batch_larger_than_dataset(tmp_path, cifar_py):
    proc = run_cli(
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
    _assert_usage_error(run_cli(['--workdir', str(tmp_path)]), '--config')
    _assert_usage_error(run_cli(['--config', 'configs/smoke.py']), '--workdir')
    _assert_usage_error(run_cli(['--config', 'configs/no_such.py', '--workdir', str(tmp_path)]))
    proc = run_cli(['--config', 'configs/smoke.py', '--workdir', str(tmp_path), '--mode=eval'])
    _assert_usage_error(proc)
    _assert_usage_error(
        run_cli(['--workdir', str(tmp_path), '--mode=report']), 'holds neither a sweep'
    )


class _Exploit:
    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def _damaged_copies(root):
    """Official-format copies, each damaged one way: {name: (path, expected error)}."""
    copies = {}
    truncated = fake_data.write_cifar_py(root / 'truncated')
    with open(os.path.join(truncated.path, 'data_batch_3'), 'r+b') as f:
        f.truncate(1000)
    copies['truncated'] = (truncated.path, 'data_batch_3')
    binary = fake_data.write_cifar_bin(root / 'bin')
    with open(os.path.join(binary.path, 'test_batch.bin'), 'ab') as f:
        f.write(b'\0' * 10)
    copies['bin'] = (binary.path, 'test_batch.bin')
    evil = fake_data.write_cifar_py(root / 'evil')
    exploit = _Exploit()
    exploit.marker = root / 'pwned'
    with open(os.path.join(evil.path, 'data_batch_1'), 'wb') as f:
        pickle.dump({'data': exploit, 'labels': []}, f, protocol=2)
    copies['evil'] = (evil.path, 'refusing to load')
    folder = fake_data.write_image_folder(root / 'folder', n_train_per_class=2, n_test_per_class=1)
    with open(os.path.join(folder.path, 'train', 'cat', 'notes.txt'), 'w') as f:
        f.write('not an image')
    copies['folder'] = (folder.path, 'notes.txt')
    empty = root / 'empty'
    empty.mkdir()
    copies['empty'] = (str(empty), 'empty')
    return copies


def test_damaged_data_is_one_error_line_and_runs_nothing(tmp_path):
    for name, (path, fragment) in _damaged_copies(tmp_path).items():
        workdir = tmp_path / f'w-{name}'
        proc = run_cli(
            [
                '--config',
                'configs/smoke.py',
                '--workdir',
                str(workdir),
                f'--config.data.path={path}',
            ]
        )
        _assert_usage_error(proc, fragment)
        assert not (workdir / 'checkpoints').exists()
    assert not (tmp_path / 'pwned').exists()  # The pickle's code never ran.


def test_unwritable_workdir(tmp_path):
    blocker = tmp_path / 'file'
    blocker.write_text('')
    proc = run_cli(['--config', 'configs/smoke.py', '--workdir', str(blocker / 'run')])
    _assert_usage_error(proc, 'is not writable')


def test_batch_not_divisible_by_the_devices(tmp_path, cifar_py):
    env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
    proc = run_cli(
        [
            '--config',
            'configs/smoke.py',
            '--workdir',
            str(tmp_path / 'w'),
            f'--config.data.path={cifar_py.path}',
            '--config.data.train_subset=0',
            '--config.batch_size=20',
        ],
        env=env,
    )
    _assert_usage_error(proc, 'not divisible by the 8 devices')


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
    config = tmp_path / 'odd.py'
    config.write_text(
        f'from resnet_jax.configs import default\n\n\ndef get_config():\n    {body}\n',
    )
    proc = run_cli(['--config', str(config), '--workdir', str(tmp_path / 'w')], cwd=tmp_path)
    one_error_line(proc, fragment)


def test_a_config_next_to_its_own_configs_folder_imports_it(tmp_path):
    # The older form: `from configs import default` finds the configs/ folder that
    # holds the file, from any working directory.
    folder = tmp_path / 'project' / 'configs'
    folder.mkdir(parents=True)
    (folder / '__init__.py').write_text('')
    (folder / 'default.py').write_text(
        'from resnet_jax.configs import smoke\n\n\ndef get_config():\n'
        '    c = smoke.get_config()\n    c.batch_size = 0\n    return c\n'
    )
    (folder / 'mine.py').write_text(
        'from configs import default\n\nget_config = default.get_config\n'
    )
    proc = run_cli(['--config', str(folder / 'mine.py'), '--workdir', 'w'], cwd=tmp_path)
    one_error_line(proc, 'batch_size')


@pytest.mark.parametrize('form', [['--config', 'smoke'], ['--config=smoke']])
def test_a_shipped_config_by_name_with_overrides(tmp_path, form):
    proc = run_cli([*form, '--workdir', str(tmp_path / 'w'), '--config.learning_rat=0.1'])
    one_error_line(
        proc, 'unknown config field config.learning_rat', 'did you mean config.learning_rate?'
    )
    proc = run_cli([*form, '--workdir', str(tmp_path / 'w'), '--config.batch_size=0'])
    one_error_line(proc, 'batch_size')
    assert not (tmp_path / 'w').exists()


def test_an_unknown_config_name_lists_the_shipped_ones(tmp_path):
    proc = run_cli(['--config', 'no_such', '--workdir', str(tmp_path / 'w')])
    one_error_line(proc, 'config file not found: no_such (shipped configs: cpu_grid, ', 'smoke)')


@pytest.mark.parametrize('flag', ['--help', '-h'])
def test_help_prints_usage_and_exits_0(flag):
    proc = run_cli([flag])
    assert proc.returncode == 0, proc.stderr
    assert '--workdir' in proc.stdout and '--config.FIELD=VALUE' in proc.stdout
    assert proc.stderr == ''
    shipped = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, 'configs')) if f[0] != '_')
    listed = proc.stdout.split('Shipped configs (--config NAME):\n')[1].split('\n\n')[0]
    assert [line.split(':')[0].strip() for line in listed.splitlines()] == shipped
    assert "  paper_sweep: The study's 18-run grid" in listed


def test_extra_positional_arguments_are_refused(tmp_path):
    proc = run_cli(['--config', 'configs/smoke.py', '--workdir', str(tmp_path), 'oops'])
    one_error_line(proc, 'unexpected argument(s): oops')


def test_workdir_tilde_is_the_home_directory(tmp_path, cifar_py):
    home = tmp_path / 'home'
    home.mkdir()
    config = os.path.join(REPO, 'configs/smoke.py')
    args = ['--config', config, '--workdir=~/x', '--config.num_epochs=1']
    args += ['--config.data.train_subset=64', f'--config.data.path={cifar_py.path}']
    proc = run_cli(args, cwd=tmp_path, env={'HOME': str(home), 'PYTHONPATH': REPO})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (home / 'x' / 'summary.json').exists() and not (tmp_path / '~').exists()


def test_a_foreign_config_json_is_never_overwritten(cifar_py, tmp_path):
    (tmp_path / 'config.json').write_text('{"name": "my-app"}')
    for extra in ([], ['--overwrite']):
        args = ['--config', 'configs/smoke.py', '--workdir', str(tmp_path), *extra]
        proc = run_cli(
            [*args, '--config.data.train_subset=0', f'--config.data.path={cifar_py.path}']
        )
        one_error_line(proc, 'is not the config of a resnet_jax run')
        assert (tmp_path / 'config.json').read_text() == '{"name": "my-app"}'
    assert sorted(os.listdir(tmp_path)) == ['config.json']
