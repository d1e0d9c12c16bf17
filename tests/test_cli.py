"""The command line: a smoke run, eval mode, help, `~` in --workdir, and one-line errors
with exit code 2 (bad configs and data, extra arguments)."""

import json
import os
import pickle

import pytest

from tests import fake_data
from tests.conftest import REPO, one_error_line


def test_smoke_config_trains_and_evaluates(cli, tmp_path, cifar_py):
    workdir = tmp_path / 'smoke'
    # Run from another directory: the config must still find configs/default.py.
    proc = cli.run(
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

    proc = cli.run(['--config', 'configs/smoke.py', '--workdir', str(workdir), '--mode=eval'])
    assert proc.returncode == 0, proc.stderr
    expected = f'test accuracy {100 * summary["test_accuracy"]:.2f}%'
    assert expected in proc.stdout

    proc = cli.run(['--workdir', str(workdir), '--mode=report'])  # A run's curves.
    assert proc.returncode == 0, proc.stderr
    assert f'curves: {workdir}/curves.png' in proc.stdout
    assert (workdir / 'curves.png').read_bytes().startswith(b'\x89PNG')


@pytest.mark.parametrize(
    'override,fragment',
    [
        ('--config.learning_rate=0', 'learning_rate'),  # Refused by validate_config.
        ('--config.batch_size=abc', 'batch_size'),  # Not of the field's type.
        ('--config.no_such_field=1', 'no_such_field'),  # Not a field.
    ],
)
def test_invalid_config_is_one_error_line(cli, tmp_path, override, fragment):
    """Each kind of bad override; the values refused are tested in test_validation.py."""
    workdir = tmp_path / 'w'
    proc = cli.run(['--config', 'configs/smoke.py', '--workdir', str(workdir), override])
    one_error_line(proc, fragment)
    assert not (workdir / 'checkpoints').exists()


def test_missing_flags_and_eval_without_checkpoint(cli, tmp_path):
    one_error_line(cli.run(['--config', 'configs/smoke.py']), '--workdir')
    one_error_line(cli.run(['--config', 'configs/no_such.py', '--workdir', str(tmp_path)]))
    proc = cli.run(['--config', 'configs/smoke.py', '--workdir', str(tmp_path), '--mode=eval'])
    one_error_line(proc)
    one_error_line(cli.run(['--workdir', str(tmp_path), '--mode=report']), 'holds neither a sweep')


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


def test_damaged_data_is_one_error_line_and_runs_nothing(cli, tmp_path):
    for name, (path, fragment) in _damaged_copies(tmp_path).items():
        workdir = tmp_path / f'w-{name}'
        proc = cli.run(
            [
                '--config',
                'configs/smoke.py',
                '--workdir',
                str(workdir),
                f'--config.data.path={path}',
            ]
        )
        one_error_line(proc, fragment)
        assert not (workdir / 'checkpoints').exists()
    assert not (tmp_path / 'pwned').exists()  # The pickle's code never ran.


def test_unwritable_workdir(cli, tmp_path):
    blocker = tmp_path / 'file'
    blocker.write_text('')
    proc = cli.run(['--config', 'configs/smoke.py', '--workdir', str(blocker / 'run')])
    one_error_line(proc, 'is not writable')


def test_batch_not_divisible_by_the_devices(cli, tmp_path, cifar_py):
    env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
    proc = cli.run(
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
    one_error_line(proc, 'not divisible by the 8 devices')


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
def test_a_config_without_distributed_or_not_a_configdict_is_one_error(
    cli, tmp_path, body, fragment
):
    config = tmp_path / 'odd.py'
    config.write_text(
        f'from resnet_jax.configs import default\n\n\ndef get_config():\n    {body}\n',
    )
    proc = cli.run(['--config', str(config), '--workdir', str(tmp_path / 'w')], cwd=tmp_path)
    one_error_line(proc, fragment)


def test_a_config_next_to_its_own_configs_folder_imports_it(cli, tmp_path):
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
    proc = cli.run(['--config', str(folder / 'mine.py'), '--workdir', 'w'], cwd=tmp_path)
    one_error_line(proc, 'batch_size')


@pytest.mark.parametrize('form', [['--config', 'smoke'], ['--config=smoke']])
def test_a_shipped_config_by_name_with_overrides(cli, tmp_path, form):
    proc = cli.run([*form, '--workdir', str(tmp_path / 'w'), '--config.learning_rat=0.1'])
    one_error_line(
        proc, 'unknown config field config.learning_rat', 'did you mean config.learning_rate?'
    )
    proc = cli.run([*form, '--workdir', str(tmp_path / 'w'), '--config.batch_size=0'])
    one_error_line(proc, 'batch_size')
    assert not (tmp_path / 'w').exists()


def test_an_unknown_config_name_lists_the_shipped_ones(cli, tmp_path):
    proc = cli.run(['--config', 'no_such', '--workdir', str(tmp_path / 'w')])
    one_error_line(proc, 'config file not found: no_such (shipped configs: cpu_grid, ', 'smoke)')


@pytest.mark.parametrize('flag', ['--help', '-h'])
def test_help_prints_usage_and_exits_0(cli, flag):
    proc = cli.run([flag])
    assert proc.returncode == 0, proc.stderr
    assert '--workdir' in proc.stdout and '--config.FIELD=VALUE' in proc.stdout
    assert proc.stderr == ''
    shipped = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, 'configs')) if f[0] != '_')
    listed = proc.stdout.split('Shipped configs (--config NAME):\n')[1].split('\n\n')[0]
    assert [line.split(':')[0].strip() for line in listed.splitlines()] == shipped
    assert "  paper_sweep: The study's 18-run grid" in listed


def test_extra_positional_arguments_are_refused(cli, tmp_path):
    proc = cli.run(['--config', 'configs/smoke.py', '--workdir', str(tmp_path), 'oops'])
    one_error_line(proc, 'unexpected argument(s): oops')


def test_workdir_tilde_is_the_home_directory(cli, tmp_path, cifar_py):
    home = tmp_path / 'home'
    home.mkdir()
    config = os.path.join(REPO, 'configs/smoke.py')
    args = ['--config', config, '--workdir=~/x', '--config.num_epochs=1']
    args += ['--config.data.train_subset=64', f'--config.data.path={cifar_py.path}']
    proc = cli.run(args, cwd=tmp_path, env={'HOME': str(home), 'PYTHONPATH': REPO})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (home / 'x' / 'summary.json').exists() and not (tmp_path / '~').exists()
