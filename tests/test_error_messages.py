"""Error messages: one ``error:`` line that names what went wrong, nothing left behind.

A config file whose ``get_config()`` returns None, overrides without
``--config``, a full disk while writing records, and an error found once
the data is loaded (the workdir it created is removed again).
"""

import errno
import os

import pytest

from resnet_jax.rundir import writers
from tests.conftest import one_error_line, tiny_args


def test_get_config_returning_none_is_one_line(cli, tmp_path):
    config = tmp_path / 'none.py'
    config.write_text('def get_config():\n    return None\n')
    proc = cli.run(['--config', str(config), '--workdir', str(tmp_path / 'run')])
    one_error_line(proc, 'get_config() returned None')
    assert 'WARNING' not in proc.stderr + proc.stdout


def test_overrides_without_a_config_file_say_that_it_is_missing(cli, tmp_path):
    proc = cli.run(['--workdir', str(tmp_path), '--config.num_epochs=2', '--config.batch_size=50'])
    line = one_error_line(proc, '--config', 'configs/default.py')
    assert 'config_config' not in line


def test_an_error_found_after_loading_the_data_leaves_no_workdir(cli, cifar_py, tmp_path):
    workdir = tmp_path / 'runs' / 'big_batch'
    proc = cli.run(tiny_args(cifar_py.path, workdir, '--config.batch_size=1000'))
    one_error_line(proc, 'batch', 'larger than the training set')
    assert not workdir.exists()


class _FullDisk:
    """A file whose writes fail as on a full disk."""

    def write(self, data):
        raise OSError(errno.ENOSPC, 'No space left on device')

    def flush(self):
        pass

    def close(self):
        pass

    def fileno(self):
        return 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_a_full_disk_while_writing_records_names_the_file(tmp_path, monkeypatch):
    logger = writers.MetricLogger(str(tmp_path))
    monkeypatch.setattr(writers, 'open', lambda *a, **k: _FullDisk(), raising=False)
    record = {'epoch': 1, 'test_accuracy': 0.5}
    with pytest.raises(OSError) as raised:
        logger.write(record, log=False)
    assert raised.value.strerror == 'No space left on device'
    assert raised.value.filename == os.path.join(str(tmp_path), 'metrics.jsonl')
    logger.close()


def test_a_full_disk_while_writing_a_summary_names_the_file(tmp_path, monkeypatch):
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, 'fdopen', lambda fd, *a: (real_fdopen(fd, *a).close(), _FullDisk())[1])
    path = str(tmp_path / 'summary.json')
    with pytest.raises(OSError) as raised:
        from resnet_jax.rundir import workdir  # pylint: disable=g-import-not-at-top

        workdir.write_json(path, {'status': 'completed'})
    assert raised.value.filename == path
    assert os.listdir(tmp_path) == []  # No temporary file left.
