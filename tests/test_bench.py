"""The benchmark's plumbing (no timings are asserted: those live in BENCHMARKS.md)."""

import json
import os
import subprocess
import sys

import pytest

from resnet_jax.cli import bench, config_files
from tests.conftest import one_error_line


@pytest.mark.usefixtures('training')
def test_bench_writes_every_case(tmp_path, cifar_py, capsys):
    out = tmp_path / 'bench.json'
    args = ['--data', cifar_py.path, '--batch_sizes', '24', '--steps', '2', '--epochs', '2']
    args += ['--torch', 'none', '--lanes', '2', '--json', str(out)]
    assert bench.main(args) == 0
    report = json.loads(out.read_text())
    assert report['machine']['platform'] == 'cpu'
    single = [r for r in report['results'] if r['impl'] == 'jax']
    lanes = [r for r in report['results'] if r['impl'] == 'jax-vectorized']
    assert [r['batch_size'] for r in single] == [24] and len(lanes) == 1
    for r in single:
        assert r['images_per_second'] > 0 and r['compile_seconds'] >= 0
        assert r['epoch_seconds_estimated'] is False and r['num_train_images'] == 120
        assert r['peak_memory_bytes'] > 0
    assert all(r['lanes'] == 2 and r['speedup_vs_one_run'] > 0 for r in lanes)
    assert '| jax | paper | 24 | float32 |' in capsys.readouterr().out


@pytest.mark.parametrize(
    'args,fragment',
    [
        (['--models', 'vgg'], 'vgg'),
        (['--batch_sizes', '0'], 'positive'),
        (['--epochs', '1'], '--epochs'),
        (['--config', '/no/such.py'], 'no such file'),
        (['--torch', 'tensorflow'], 'tensorflow'),
    ],
)
def test_bad_arguments_are_one_error_line(args, fragment, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(args)
    one_error_line((e.value.code, capsys.readouterr().err), fragment)


def test_a_shipped_config_by_name():
    assert bench.parse_args(['--config', 'smoke']).config == config_files.shipped()['smoke']
    assert bench.load_config(config_files.shipped()['smoke']).data.train_subset == 256


def test_missing_data_is_one_error_line(tmp_path, capsys):
    code = bench.main(['--data', str(tmp_path / 'nothing'), '--torch', 'none'])
    one_error_line((code, capsys.readouterr().err))


def test_bench_needs_nothing_outside_the_package(tmp_path):
    """From any directory: its default config is the package's own, nothing of the
    repository (configs/, benchmarks/, tests/) is imported, and without the PyTorch
    reference script the references are reported as skipped."""
    code = (
        'import sys\n'
        'from resnet_jax.cli import bench\n'
        "config = bench.load_config('')\n"
        "assert (config.model, config.optimizer, config.batch_size) == ('paper', 'adam', 100)\n"
        "print(bench.bench_torch('tuned', 'paper', 8, 'float32', 1, '', 0)['skipped'])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('configs', 'benchmarks', 'tests')))\n"
    )
    env = dict(os.environ, PYTHONPATH='')
    proc = subprocess.run(
        [sys.executable, '-c', code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ['benchmarks/torch_reference.py not found', '[]']
