"""Every file read back, damaged one field at a time, and every place that names a run.

A real study is trained once; each case puts a field of the wrong type, a
missing field or a non-object into one of its files and runs the command that
reads it (a run's resume, ``--mode=eval``, ``--mode=report``): one ``error:``
line naming the file and exit code 2, never a traceback, and nothing already
saved changes. Files that are only caches or extras (the image-folder cache,
the lock, TensorBoard event files) cost a warning or nothing at all.

Points whose names collide once sanitised (``data.path='/d/a/b'`` and
``'/d/a_b'``) train into their own folders, in a grid and in a search, and
both reports show every run with its real status.
"""

import json
import os
import shutil
import sqlite3

import ml_collections
import numpy as np
import optuna
import pytest

from resnet_jax.rundir import workdir as workdir_lib
from resnet_jax.studies import optuna_study, search, search_space, sweep
from tests import fake_data
from tests.conftest import one_error_line
from tests.test_ownership import snapshot
from tests.test_search import search_config

RUN = 'learning_rate=0.003'


@pytest.fixture(scope='module')
def study(tmp_path_factory, training):
    """A finished 2-trial search of 1 epoch each (a checkpoint per epoch)."""
    del training
    root = tmp_path_factory.mktemp('audit')
    data = fake_data.write_cifar_py(root / 'data', n_train_per_batch=40, n_test=50, learnable=True)
    config = search_config(data.path)
    config.num_epochs = 1
    search.run_study(config, str(root / 'study'))
    return root / 'study', data.path


def _set(key, value):
    return lambda obj: {**obj, key: value}


def _drop(key):
    return lambda obj: {k: v for k, v in obj.items() if k != key}


def _meta(workdir):
    (step,) = os.listdir(workdir / RUN / 'checkpoints')
    return f'{RUN}/checkpoints/{step}/meta/metadata'


# (file in the study, what is done to its JSON, the command that reads it back).
CASES = {
    'search.json wrong type': ('search.json', _set('grid', 5), 'report'),
    'search.json metric': ('search.json', _set('metric', 5), 'report'),
    'search.json storage': ('search.json', _set('storage', 5), 'report'),
    'search.json base_config': ('search.json', _set('base_config', 5), 'report'),
    'search.json missing': ('search.json', _drop('metric'), 'report'),
    'search.json non-object': ('search.json', lambda _: [1], 'report'),
    'summary.json wrong type': (f'{RUN}/summary.json', _set('pruned_at_epoch', 'x'), 'train'),
    'summary.json non-object': (f'{RUN}/summary.json', lambda _: 5, 'train'),
    'config.json wrong type': (f'{RUN}/config.json', _set('data', 5), 'eval'),
    'config.json missing': (f'{RUN}/config.json', _drop('model'), 'eval'),
    'config.json non-object': (f'{RUN}/config.json', lambda _: 5, 'train'),
    'meta wrong type': (_meta, _set('epoch', 'x'), 'train'),
    'meta missing': (_meta, _drop('epoch'), 'train'),
    'meta non-object': (_meta, lambda _: [1], 'train'),
    'metrics.jsonl wrong type': (f'{RUN}/metrics.jsonl', _set('epoch', 'x'), 'report-run'),
}


def _command(kind, workdir, data):
    run = str(workdir / RUN)
    if kind == 'report':
        return ['--workdir', str(workdir), '--mode=report']
    if kind == 'report-run':
        return ['--workdir', run, '--mode=report']
    config = json.loads((workdir / RUN / 'config.json').read_text())
    args = ['--config', 'configs/default.py', '--workdir', run]
    if kind == 'eval':
        return [*args, '--mode=eval']
    same = ('batch_size', 'eval_batch_size', 'steps_per_call', 'decay_every_epochs',
            'decay_factor', 'checkpoint_every_epochs', 'keep_checkpoints', 'learning_rate')  # fmt: skip
    return [
        *args, *(f'--config.{k}={config[k]}' for k in same), '--config.num_epochs=2',
        f'--config.data.path={data}', '--config.data.validation_size=40',
    ]  # fmt: skip


@pytest.mark.parametrize('case', list(CASES))
def test_a_damaged_file_read_back_is_one_error_line(cli, study, tmp_path, case):
    source, data = study
    name, change, kind = CASES[case]
    workdir = tmp_path / 'study'
    shutil.copytree(source, workdir)
    path = workdir / (name(workdir) if callable(name) else name)
    command = _command(kind, workdir, data)  # Read before the damage.
    if path.name == 'metrics.jsonl':
        first = json.loads(path.read_text().splitlines()[0])
        path.write_text(json.dumps(change(first)) + '\n' + json.dumps(first) + '\n')
    else:
        path.write_text(json.dumps(change(json.loads(path.read_text()))))
    before = snapshot(workdir)
    proc = cli.run(command)
    assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    one_error_line(proc, str(path) if kind != 'train' or 'meta' not in case else 'meta')
    assert snapshot(workdir) == before


def test_bad_user_attributes_are_ignored_by_the_report(study, tmp_path):
    source, _ = study
    workdir = tmp_path / 'study'
    shutil.copytree(source, workdir)
    with sqlite3.connect(workdir / 'study.db') as db:  # Finished trials: edited in place.
        db.execute("UPDATE trial_user_attributes SET value_json = '5' WHERE key = 'run'")
        db.execute("""UPDATE trial_user_attributes SET value_json = '["x"]'
                      WHERE key = 'run_status'""")
    from resnet_jax.reports import study_report  # pylint: disable=g-import-not-at-top

    paths = study_report.write_study_report(str(workdir))
    assert os.path.exists(paths['search'])
    loaded = optuna.load_study(study_name=None, storage=f'sqlite:///{workdir}/study.db')
    assert [optuna_study.trial_run(t) for t in loaded.get_trials()] == [None, None]


def test_caches_and_extras_read_back_cost_at_most_a_warning(tmp_path):
    from resnet_jax.datasets import image_folder  # pylint: disable=g-import-not-at-top
    from resnet_jax.rundir import locks, writers  # pylint: disable=g-import-not-at-top

    cache = tmp_path / 'cache.npz'
    np.savez(cache, train=np.zeros((2, 3), np.float32))  # Wrong dtype, and no 'test'.
    assert image_folder._read_cache(str(cache), {'train': (2, 3)}) == {}  # pylint: disable=protected-access
    cache.write_bytes(b'not an npz')
    assert image_folder._read_cache(str(cache), {'train': (2, 3)}) == {}  # pylint: disable=protected-access
    (tmp_path / 'events.out.tfevents.1.x').write_bytes(b'\xff' * 40)
    assert writers.tensorboard_steps(str(tmp_path)) == {}
    (tmp_path / locks.LOCK_FILE).write_text('{"not": "a lock"}')
    os.utime(tmp_path / locks.LOCK_FILE, (0, 0))
    with locks.lock(str(tmp_path)):  # An unreadable lock is taken over.
        pass


# ------------------------------------------------------ names of runs ----


def _two_folders(root):
    """Two copies of a fake CIFAR-10 whose paths collide once sanitised."""
    a = fake_data.write_cifar_py(root / 'd' / 'a' / 'b', n_train_per_batch=40, n_test=50)
    b = fake_data.write_cifar_py(root / 'd' / 'a_b', n_train_per_batch=40, n_test=50)
    return a.path, b.path


def test_one_function_names_every_run():
    a, b = {'data.path': '/d/a/b'}, {'data.path': '/d/a_b'}
    assert sweep.run_name(a) != sweep.run_name(b)
    assert not hasattr(search_space, 'folder_name')


@pytest.mark.usefixtures('training')
@pytest.mark.parametrize('kind', ['grid', 'search'])
def test_points_that_collide_once_sanitised_train_and_report_apart(tmp_path, kind):
    paths = _two_folders(tmp_path)
    config = search_config(paths[0])
    config.num_epochs = 1
    if kind == 'grid':
        del config['search']
        config.sweep = ml_collections.ConfigDict({'data': {'path': paths}})
    else:
        config.search.space = ml_collections.ConfigDict(
            {'data': {'path': search_space.categorical(paths)}}
        )
    workdir = tmp_path / 'study'
    statuses = search.run_study(config, str(workdir))
    names = [sweep.run_name({'data.path': p}) for p in paths]
    assert statuses == dict.fromkeys(names, 'completed')
    for name in names:
        assert len(workdir_lib.read_metrics(str(workdir / name))) == 1
    from resnet_jax.reports import study_report, sweep_report  # pylint: disable=g-import-not-at-top

    if kind == 'grid':
        sweep_report.write_sweep_report(str(workdir))
        results = (workdir / 'results.md').read_text()
        assert 'pending' not in results
    text = open(study_report.write_study_report(str(workdir))['search']).read()
    for name in names:
        assert name in text
    assert 'pending' not in text
