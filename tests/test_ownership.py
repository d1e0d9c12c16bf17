"""Only this tool's own files in a workdir are ever replaced or deleted.

A workdir holding checkpoints, records or a summary without this tool's
``config.json`` was written by something else: training into it is refused
with one ``error:`` line, with or without ``--overwrite``, and nothing changes.
"""

import json
import os

import pytest

from resnet_jax.rundir import workdir
from tests.conftest import make_tiny_config, one_error_line, tiny_args


def _another_tools_run(folder):
    """What another training tool leaves: a checkpoint, records and a summary."""
    (folder / 'checkpoints' / 'epoch=3').mkdir(parents=True)
    (folder / 'checkpoints' / 'epoch=3' / 'model.ckpt').write_bytes(b'their weights')
    (folder / 'metrics.jsonl').write_text('{"epoch": 3, "loss": 0.25}\n')
    (folder / 'summary.json').write_text('{"accuracy": 0.93}\n')


def snapshot(folder):
    """``{relative path: bytes}`` of every file under ``folder``."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, 'rb') as f:
                files[os.path.relpath(path, folder)] = f.read()
    return files


def _a_foreign_config_json(folder):
    """A config.json of another application, and nothing else."""
    (folder / 'config.json').write_text('{"name": "my-app"}')


@pytest.mark.parametrize(
    'make,fragments',
    [
        (_another_tools_run, ('checkpoints', 'metrics.jsonl', 'summary.json', 'config.json')),
        (_a_foreign_config_json, ('is not the config of a resnet_jax run',)),
    ],
)
def test_another_tools_files_are_refused_and_kept(cli, cifar_py, tmp_path, make, fragments):
    make(tmp_path)
    before, names = snapshot(tmp_path), sorted(os.listdir(tmp_path))
    for extra in ([], ['--overwrite']):
        one_error_line(cli.run(tiny_args(cifar_py.path, tmp_path, *extra)), *fragments)
        assert snapshot(tmp_path) == before and sorted(os.listdir(tmp_path)) == names


def test_foreign_files_are_named_and_own_ones_are_not(cifar_py, tmp_path):
    assert workdir.foreign_files(str(tmp_path)) == []
    (tmp_path / 'checkpoints').mkdir()  # Empty: a run of ours killed at its start.
    assert workdir.foreign_files(str(tmp_path)) == []
    # A sweep records a run that failed before it started in its summary alone.
    config = workdir.config_json(make_tiny_config(cifar_py.path))
    summary = {'status': 'failed', 'error': 'bad data', 'config': config}
    (tmp_path / 'summary.json').write_text(json.dumps(summary))
    assert workdir.foreign_files(str(tmp_path)) == []
    (tmp_path / 'events.out.tfevents.1.host').write_bytes(b'')
    assert workdir.foreign_files(str(tmp_path)) == ['events.out.tfevents.1.host']
    # With this tool's config.json, the run's files are its own.
    (tmp_path / 'config.json').write_text(json.dumps(config))
    assert workdir.foreign_files(str(tmp_path)) == []


def test_overwrite_still_replaces_this_tools_own_run(cli, cifar_py, tmp_path):
    proc = cli.run(tiny_args(cifar_py.path, tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = cli.run(
        tiny_args(cifar_py.path, tmp_path, '--overwrite', '--config.learning_rate=0.001')
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / 'config.json') as f:
        assert json.load(f)['learning_rate'] == 0.001
