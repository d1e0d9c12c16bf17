"""A run's workdir: strict atomic JSON, the lock, config changes, foreign files.

Unit tests of resnet_jax/workdir.py on files written here (no training).
"""

import json
import os

import pytest

from resnet_jax import validation
from resnet_jax.configs import default
from resnet_jax.rundir import locks, workdir, writers
from resnet_jax.training import train

# ---------------------------------------------------------------- JSON ----


def test_nan_is_written_as_null(tmp_path):
    workdir.write_json(str(tmp_path / 's.json'), {'a': float('nan'), 'b': [1.0, float('inf')]})
    assert json.loads((tmp_path / 's.json').read_text()) == {'a': None, 'b': [1.0, None]}
    logger = writers.MetricLogger(str(tmp_path))
    record = dict.fromkeys(train.METRIC_KEYS, 1.0) | {'epoch': 1, 'test_loss': float('nan')}
    logger.write(record)
    logger.close()
    line = (tmp_path / 'metrics.jsonl').read_text()
    assert json.loads(line, parse_constant=pytest.fail)['test_loss'] is None


def test_json_safe_walks_nested_containers_and_keeps_other_values():
    value = {'a': (1.0, float('-inf')), 'b': {'c': [float('nan'), 'x', 2]}, 'd': None}
    assert workdir.json_safe(value) == {'a': [1.0, None], 'b': {'c': [None, 'x', 2]}, 'd': None}
    assert workdir.dumps({'x': float('inf')}) == '{"x": null}'


def test_write_atomic_replaces_whole_files_and_leaves_no_temporary(tmp_path):
    path = tmp_path / 'f.txt'
    workdir.write_atomic(str(path), 'first')
    workdir.write_atomic(str(path), b'second')
    assert path.read_text() == 'second'
    assert os.listdir(tmp_path) == ['f.txt']
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    workdir.write_atomic(str(tmp_path / 'new' / 'f.txt'), 'x')  # The folder is created.
    assert sorted(os.listdir(tmp_path)) == ['f.txt', 'new']
    assert os.listdir(tmp_path / 'new') == ['f.txt']


def test_write_atomic_removes_its_temporary_when_the_write_fails(tmp_path):
    with pytest.raises(TypeError):  # Neither str nor bytes: fails inside the write.
        workdir.write_atomic(str(tmp_path / 'f.txt'), 12345)
    assert os.listdir(tmp_path) == []


def test_read_json_object_is_none_for_missing_garbled_or_non_objects(tmp_path):
    assert workdir.read_json_object(str(tmp_path / 'missing.json')) is None
    (tmp_path / 'half.json').write_text('{"status": "compl')
    assert workdir.read_json_object(str(tmp_path / 'half.json')) is None
    (tmp_path / 'list.json').write_text('[1, 2]')
    assert workdir.read_json_object(str(tmp_path / 'list.json')) is None
    (tmp_path / 'ok.json').write_text('{"a": 1}')
    assert workdir.read_json_object(str(tmp_path / 'ok.json')) == {'a': 1}


# ---------------------------------------------------------------- lock ----


@pytest.mark.parametrize('content', ['', 'garbage', None])
def test_an_empty_or_unreadable_lock_is_stale(tmp_path, content):
    path = tmp_path / locks.LOCK_FILE
    if content is None:
        path.mkdir()  # Unreadable as a file.
        (path / 'x').write_text('')
        with pytest.raises(locks.WorkdirBusy):  # It cannot be removed: says so.
            with locks.lock(str(tmp_path)):
                pass
        return
    path.write_text(content)
    with locks.lock(str(tmp_path)):
        assert path.read_text().split()[1] == str(os.getpid())
    assert not path.exists()


def test_a_live_lock_is_respected_and_a_lock_is_never_empty(tmp_path):
    with locks.lock(str(tmp_path)):
        assert (tmp_path / locks.LOCK_FILE).read_text().strip()
        with pytest.raises(locks.WorkdirBusy, match='is in use by process'):
            with locks.lock(str(tmp_path)):
                pass


def test_a_lock_of_a_dead_process_is_taken_over_and_one_of_another_host_respected(tmp_path):
    path = tmp_path / locks.LOCK_FILE
    host = locks._owner().split()[0]
    path.write_text(f'{host} {2**22 + 12345}')  # Above Linux's largest process id.
    with locks.lock(str(tmp_path)):  # Dead: taken over.
        assert path.read_text() == locks._owner()
    path.write_text('some-other-host 1')  # Cannot be checked: taken as held.
    with pytest.raises(locks.WorkdirBusy, match="'some-other-host 1'"):
        with locks.lock(str(tmp_path)):
            pass
    assert path.read_text() == 'some-other-host 1'


# ------------------------------------------------------ config changes ----


def _config_json(**changes):
    config = default.get_config()
    for field, value in changes.items():
        validation.set_field(config, field.replace('__', '.'), value)
    return workdir.config_json(config)


def test_config_differences_name_each_changed_field_but_resumable_ones():
    old = _config_json()
    assert workdir.config_differences(old, old) == []
    new = _config_json(learning_rate=0.1, data__pad=2)
    assert workdir.config_differences(old, new) == [
        'data.pad: 4 -> 2',
        'learning_rate: 0.01 -> 0.1',
    ]
    resumable = _config_json(num_epochs=60, data__path='/elsewhere', distributed__num_processes=2)
    assert workdir.config_differences(old, resumable) == []
    # A cosine schedule's shape depends on the run's length.
    cosine = _config_json(schedule='cosine')
    longer = _config_json(schedule='cosine', num_epochs=60)
    assert workdir.config_differences(cosine, longer) == ['num_epochs: 50 -> 60']
    assert workdir.config_differences({'a': 1}, {'b': 2}) == [
        "a: 1 -> '(absent)'",
        "b: '(absent)' -> 2",
    ]


def test_is_run_config():
    assert workdir.is_run_config(_config_json())
    assert not workdir.is_run_config({'name': 'my-app'})
    assert not workdir.is_run_config([1, 2])
    assert not workdir.is_run_config(None)


def _fake_run(path, config_json):
    """A workdir as a run leaves it: config, metrics, summary, checkpoints, events."""
    os.makedirs(path / 'checkpoints' / '4')
    (path / 'config.json').write_text(json.dumps(config_json))
    (path / 'metrics.jsonl').write_text('{"epoch": 1}\n')
    (path / 'summary.json').write_text('{}')
    (path / 'events.out.tfevents.1.host').write_text('')
    (path / 'notes.txt').write_text('mine')


def test_prepare_refuses_another_config_and_overwrite_clears_only_run_outputs(tmp_path):
    _fake_run(tmp_path, _config_json())
    workdir.prepare(str(tmp_path), default.get_config(), overwrite=False)  # Same: resumes.
    changed = default.get_config()
    changed.batch_size = 16
    with pytest.raises(validation.ConfigError, match=r'batch_size: 100 -> 16\).*--overwrite'):
        workdir.prepare(str(tmp_path), changed, overwrite=False)
    assert len(os.listdir(tmp_path)) == 6  # Nothing changed.
    workdir.prepare(str(tmp_path), changed, overwrite=True)
    assert os.listdir(tmp_path) == ['notes.txt']


def test_prepare_never_touches_a_foreign_config_json(tmp_path):
    (tmp_path / 'config.json').write_text('{"name": "my-app"}')
    for overwrite in (False, True):
        with pytest.raises(validation.ConfigError, match='is not the config of a resnet_jax run'):
            workdir.prepare(str(tmp_path), default.get_config(), overwrite=overwrite)
    assert (tmp_path / 'config.json').read_text() == '{"name": "my-app"}'


def test_check_writable_creates_the_folder_or_says_why_not(tmp_path):
    workdir.check_writable(str(tmp_path / 'a' / 'b'))
    assert (tmp_path / 'a' / 'b').is_dir() and os.listdir(tmp_path / 'a' / 'b') == []
    (tmp_path / 'file').write_text('')
    with pytest.raises(validation.ConfigError, match='file/run is not writable'):
        workdir.check_writable(str(tmp_path / 'file' / 'run'))
