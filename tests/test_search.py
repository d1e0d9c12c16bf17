"""Studies (resnet_jax.studies): validation split, bad configs, pruning, workers
sharing one queue on SQLite and on a real PostgreSQL server, and a killed worker's
trial finished from its checkpoint."""

import json
import os
import re
import signal
import sqlite3
import textwrap
import time

import ml_collections
import numpy as np
import pytest

from resnet_jax import datasets
from resnet_jax.configs import default
from resnet_jax.studies import optuna_study, run_folders, search, search_space, sweep
from tests import fake_data, postgres_server
from tests.conftest import REPO, make_tiny_config, one_error_line, read_hparams


@pytest.fixture(scope='module')
def learnable(tmp_path_factory) -> fake_data.FakeCifar:
    """A fake CIFAR-10 (python version) whose classes a model learns: 200 train + 50 test."""
    root = tmp_path_factory.mktemp('learnable')
    return fake_data.write_cifar_py(root, n_train_per_batch=40, n_test=50, learnable=True)


def search_config(data_path: str, **search_options) -> ml_collections.ConfigDict:
    """A tiny study: 40 images held out, learning rates on a grid, 4 epochs at a
    constant rate (no decay within the run), a whole epoch per compiled call."""
    config = make_tiny_config(data_path)
    config.num_epochs = 4
    config.batch_size = 20
    config.eval_batch_size = 50
    config.steps_per_call = 0
    config.decay_every_epochs = 10
    config.data.validation_size = 40
    config.search = search_space.default_section()
    config.search.space.learning_rate = search_space.categorical((0.003, 1e-7))
    config.search.sampler = 'grid'
    for key, value in search_options.items():
        config.search[key] = value
    return config


def write_config_file(tmp_path, body: str) -> str:
    """A config file that builds on ``search_config``; returns its path."""
    path = tmp_path / 'study_config.py'
    path.write_text(
        textwrap.dedent(
            """
            from resnet_jax.studies import search_space
            from tests.test_search import search_config

            def get_config():
                config = search_config(DATA)
            """
        ).replace('DATA', repr(str(tmp_path / 'unused')))
        + textwrap.indent(textwrap.dedent(body).strip('\n') + '\n', '    ')
        + '    return config\n'
    )
    return str(path)


def one_point_study(tmp_path, epochs: int, *extra: str) -> str:
    """A one-point grid of ``epochs`` short epochs, heartbeats every second (2 s grace)."""
    body = f"""
        config.num_epochs = {epochs}
        config.batch_size = 10
        config.steps_per_call = 1
        config.search.space.learning_rate = search_space.categorical((0.003,))
        config.search.heartbeat_seconds = 1
        config.search.grace_seconds = 2
        config.search.poll_seconds = 0.5
        """
    return write_config_file(
        tmp_path, body.rstrip(' ') + ''.join(f'        {line}\n' for line in extra)
    )


def wait_for_checkpoint(proc, run_dir, timeout=300) -> None:
    """Waits until ``run_dir`` holds a finished checkpoint (orbax renames it into place)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if any(p.name.isdigit() for p in (run_dir / 'checkpoints').glob('*')):
            return
        time.sleep(0.05)
    raise AssertionError(f'no checkpoint in {run_dir}: {proc.poll()}')


def trials_of(storage: str, study_name: str | None = None) -> list:
    import optuna

    return optuna.load_study(study_name=study_name, storage=storage).get_trials()


def draw_learning_rates(spec, workdir: str, n: int, value) -> list[float]:
    """Claims ``n`` trials of ``spec``'s study one after the other (as one worker
    would), telling each ``value(learning rate)``; the rates drawn."""
    study = optuna_study.open_study(spec, workdir)
    rates = []
    for _ in range(n):
        with optuna_study.claim_lock(workdir):
            (trial,) = optuna_study.claim(study, spec)
        rates.append(search_space.sample(trial, spec.params, spec.base)['learning_rate'])
        study.tell(trial, value(rates[-1]))
    return rates


def records(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------- validation ----


def test_validation_split_is_balanced_and_independent_of_the_run_seed(learnable):
    config = default.get_config()
    config.data.path = learnable.path
    config.data.validation_size = 30
    splits = []
    for seed in (0, 1):
        config.seed = seed
        data = datasets.load_for_config(config)
        splits.append(data)
        assert len(data.validation_labels) == 30 and len(data.train_labels) == 170
        assert np.bincount(data.validation_labels, minlength=10).tolist() == [3] * 10
    # The same held-out images whatever the run's seed, and none of them in training.
    np.testing.assert_array_equal(splits[0].validation_images, splits[1].validation_images)
    held = {img.tobytes() for img in splits[0].validation_images}
    assert not held & {img.tobytes() for img in splits[0].train_images}
    config.data.validation_seed = 1
    other = datasets.load_for_config(config)
    assert not np.array_equal(other.validation_images, splits[0].validation_images)


def test_a_validation_split_larger_than_a_class_is_an_error(learnable):
    config = default.get_config()
    config.data.path = learnable.path
    config.data.validation_size = 199
    with pytest.raises(datasets.DataError, match='validation_size=199'):
        datasets.load_for_config(config)


# --------------------------------------------------------- bad configs ----


BAD = {
    'unknown field': (
        'config.search.space.learning_rat = search_space.float_param(0.1, 1.0)',
        'no field learning_rat',
    ),
    'low above high': (
        'config.search.space.learning_rate = search_space.float_param(0.1, 0.01)',
        'low=0.1 is greater than high=0.01',
    ),
    'log with low <= 0': (
        'config.search.space.learning_rate = search_space.float_param(0.0, 0.1, log=True)',
        'log scale needs low > 0',
    ),
    'empty choices': (
        'config.search.space.batch_size = search_space.categorical(())',
        'non-empty list',
    ),
    'unknown sampler': ("config.search.sampler = 'bayes'", "sampler='bayes' is unknown"),
    'unknown pruner': ("config.search.pruner = 'early'", "pruner='early' is unknown"),
    'unknown metric': ("config.search.metric = 'accuracy'", "metric='accuracy' is unknown"),
    'val metric without a split': ('config.data.validation_size = 0', 'needs a validation split'),
    'unreachable storage': (
        "config.search.storage = 'sqlite:////nonexistent/folder/study.db'",
        'cannot open the study storage',
    ),
}


@pytest.mark.parametrize('case', sorted(BAD))
def test_each_bad_search_config_is_named(tmp_path, learnable, case):
    line, message = BAD[case]
    config = search_config(learnable.path)
    exec(line, {'config': config, 'search_space': search_space})  # pylint: disable=exec-used
    with pytest.raises(search_space.SearchError, match=re.escape(message)):
        optuna_study.open_study(search_space.spec_from_config(config), str(tmp_path / 'study'))


def test_a_bad_search_config_is_one_error_line_before_anything_trains(cli, tmp_path, learnable):
    line, message = BAD['low above high']
    config_file = write_config_file(tmp_path, line)
    workdir = tmp_path / 'study'
    result = cli.run(
        [f'--config={config_file}', f'--config.data.path={learnable.path}', f'--workdir={workdir}']
    )
    one_error_line(result, message)
    assert not list(workdir.glob('*/metrics.jsonl'))  # Nothing trained.


def test_a_study_evaluates_the_test_set_when_a_trial_ends_unless_asked(learnable):
    """'auto': the trials of a study selecting on validation evaluate the test set once;
    on a test metric, every epoch; 'end' with a test metric a pruner reads is an error."""
    on_val = search_space.spec_from_config(search_config(learnable.path))
    assert on_val.base.eval_test == 'end'
    on_test = search_space.spec_from_config(search_config(learnable.path, metric='test_accuracy'))
    assert on_test.base.eval_test == 'every_epoch'
    asked = search_config(learnable.path)
    asked.eval_test = 'every_epoch'
    assert search_space.spec_from_config(asked).base.eval_test == 'every_epoch'
    config = search_config(learnable.path, metric='test_accuracy', pruner='median')
    config.eval_test = 'end'
    with pytest.raises(search_space.SearchError, match='eval_test'):
        search_space.spec_from_config(config)
    sweep_config = default.get_config()
    sweep_config.data.path = learnable.path
    sweep_config.sweep = ml_collections.ConfigDict({'learning_rate': (0.1, 0.01)})
    assert search_space.spec_from_config(sweep_config).base.eval_test == 'every_epoch'


def test_distinct_points_get_distinct_folders(tmp_path):
    a = sweep.run_name({'data.path': '/d/a/b'})
    b = sweep.run_name({'data.path': '/d/a_b'})
    assert a != b
    # Plain values keep the readable names of sweeps.
    assert sweep.run_name({'batch_size': 100, 'learning_rate': 0.01}) == (
        'batch_size=100,learning_rate=0.01'
    )
    run_folders.check_overrides(str(tmp_path / 'run'), {'data.path': '/d/a/b'})
    with pytest.raises(search_space.SearchError, match='holds the point'):
        run_folders.check_overrides(str(tmp_path / 'run'), {'data.path': '/d/a_b'})


# ------------------------------------------------------------- pruning ----


@pytest.mark.usefixtures('training')
def test_a_pruner_stops_a_weak_trial_and_the_others_complete(tmp_path, learnable):
    config = search_config(learnable.path, pruner='median', startup_trials=1)
    workdir = str(tmp_path / 'study')
    statuses = search.run_worker(config, workdir)
    assert statuses == {'learning_rate=0.003': 'completed', 'learning_rate=1e-07': 'pruned'}
    pruned_dir = os.path.join(workdir, 'learning_rate=1e-07')
    with open(os.path.join(pruned_dir, 'summary.json')) as f:
        summary = json.load(f)
    assert summary['status'] == 'pruned'
    assert summary['pruned_at_epoch'] < config.num_epochs
    assert [r['epoch'] for r in records(pruned_dir)] == list(
        range(1, summary['pruned_at_epoch'] + 1)
    )
    full = records(os.path.join(workdir, 'learning_rate=0.003'))
    assert len(full) == config.num_epochs and all('val_accuracy' in r for r in full)
    # Selecting on validation, the trials evaluate the test set once, when they end
    # (completed or pruned): the last record holds it, the others do not.
    for run_records in (full, records(pruned_dir)):
        assert [('test_accuracy' in r) for r in run_records] == [False] * (len(run_records) - 1) + [
            True
        ]
    assert summary['test_accuracy'] == records(pruned_dir)[-1]['test_accuracy']
    with open(os.path.join(pruned_dir, 'config.json')) as f:
        assert json.load(f)['eval_test'] == 'end'
    states = [t.state.name for t in trials_of(f'sqlite:///{workdir}/study.db')]
    assert sorted(states) == ['COMPLETE', 'PRUNED']
    _assert_hparams_show_the_trials(workdir, summary)
    # The report (the command line writes it after a study): the trials, the best
    # one on validation and its test accuracy.
    from resnet_jax.reports import study_report

    text = open(study_report.write_study_report(workdir)['search']).read()
    assert 'selected on val_accuracy' in text and 'learning_rate=0.003' in text
    assert 'held-out estimate' in text
    # A rerun of a finished study trains nothing; its report is written the same again.
    assert search.run_worker(config, workdir) == {}
    assert open(study_report.write_study_report(workdir)['search']).read() == text
    assert len(trials_of(f'sqlite:///{workdir}/study.db')) == 2


def _assert_hparams_show_the_trials(workdir, pruned_summary):
    """TensorBoard's HParams tab shows the pruned trial (its status a hyperparameter
    to filter on) and every metric a study selects on, without operational fields."""
    pruned = read_hparams(os.path.join(workdir, 'learning_rate=1e-07'))
    assert pruned['hparams']['status'] == 'pruned' and pruned['hparams']['learning_rate'] == 1e-7
    done = pruned_summary['pruned_at_epoch']
    assert pruned['metrics']['hparam/epochs_completed'] == done
    completed = read_hparams(os.path.join(workdir, 'learning_rate=0.003'))
    assert completed['hparams']['status'] == 'completed'
    assert {f'hparam/{m}' for m in search_space.METRICS} <= set(completed['metrics'])
    last = records(os.path.join(workdir, 'learning_rate=0.003'))[-1]
    assert completed['metrics']['hparam/val_accuracy'] == pytest.approx(last['val_accuracy'])
    assert 'hparam/best_val_accuracy' in completed['metrics']
    for found in (pruned, completed):
        assert not [k for k in found['hparams'] if k.startswith('distributed.')]
        assert 'progress_every_seconds' not in found['hparams']


# ------------------------------------------------------------- workers ----


@pytest.fixture(params=['sqlite', 'postgresql'])
def storage(request, tmp_path):
    """'' (SQLite in the workdir) or the URL of a real PostgreSQL server started here."""
    if request.param == 'sqlite':
        yield ''
        return
    bin_dir = postgres_server.required_server_bin()
    with postgres_server.PostgresServer(bin_dir) as url:
        yield url


def grid_args(config_file, data, workdir, storage, *extra):
    args = [f'--config={config_file}', f'--config.data.path={data}', f'--workdir={workdir}']
    if storage:
        args.append(f'--config.search.storage={storage}')
    return [*args, *extra]


def test_workers_share_a_grid_and_train_every_point_once(cli, tmp_path, learnable, storage):
    config_file = write_config_file(
        tmp_path,
        """
        config.num_epochs = 1
        config.search.space.learning_rate = search_space.categorical((0.01, 0.003, 0.001))
        config.search.space.shuffle = search_space.categorical((True, False))
        """,
    )
    workdir = tmp_path / 'study'
    result = cli.run(grid_args(config_file, learnable.path, workdir, storage, '--workers=2'))
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    trained = [line.split(' ')[3] for line in log.splitlines() if line.endswith(': training')]
    assert len(trained) == 6 and len(set(trained)) == 6, trained
    url = storage or f'sqlite:///{workdir}/study.db'
    trials = trials_of(url)
    assert len(trials) == 6 and all(t.state.name == 'COMPLETE' for t in trials)
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 6
    for trial in trials:
        assert len(records(workdir / trial.user_attrs['run'])) == 1


def test_a_killed_workers_trial_is_finished_from_its_checkpoint(cli, tmp_path, learnable, storage):
    config_file = one_point_study(tmp_path, 6)
    workdir = tmp_path / 'study'
    run_dir = workdir / 'learning_rate=0.003'
    args = grid_args(config_file, learnable.path, workdir, storage)
    proc = cli.start(args)
    wait_for_checkpoint(proc, run_dir)
    proc.send_signal(signal.SIGKILL)  # No checkpoint on the way out, no tell: a dead worker.
    proc.communicate()
    done = [r['epoch'] for r in records(run_dir)]
    assert done and done[-1] < 6, done
    time.sleep(3)  # Past the grace period: the trial's heartbeat is stale.
    result = cli.run(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'resuming after epoch' in result.stdout, result.stdout
    # Epochs up to the checkpoint were not trained again.
    assert 'epoch   1 |' not in result.stdout
    assert [r['epoch'] for r in records(run_dir)] == [1, 2, 3, 4, 5, 6]
    trials = trials_of(storage or f'sqlite:///{workdir}/study.db')
    assert [t.state.name for t in trials] == ['FAIL', 'COMPLETE']
    assert trials[1].system_attrs.get('failed_trial') == 0


def test_a_rerun_with_another_space_is_refused(tmp_path, learnable):
    workdir = str(tmp_path / 'study')
    config = search_config(learnable.path, num_trials=1)
    optuna_study.open_study(search_space.spec_from_config(config), workdir)
    config.search.space.learning_rate = search_space.categorical((0.1,))
    with pytest.raises(search_space.SearchError, match='another search config'):
        optuna_study.open_study(search_space.spec_from_config(config), workdir)
    # The grid was enqueued once, even though the study was opened twice.
    with sqlite3.connect(os.path.join(workdir, 'study.db')) as db:
        assert db.execute('select count(*) from trials').fetchone()[0] == 2


def test_the_sweep_report_selects_on_validation_when_there_is_a_split():
    from resnet_jax.reports import load, tables

    def result(i, val, test):
        return load.RunResult(
            name=f'run{i}',
            overrides={},
            status='completed',
            epochs=[{'epoch': 1}],
            val_accuracy=val,
            test_accuracy=test,
        )

    with_split = [result(0, 0.5, 0.6), result(1, 0.55, 0.4)]
    assert tables.selection_metric(with_split) == 'val_accuracy'
    assert tables.best_run_index(with_split) == 1  # Not the best on test.
    without = [result(0, None, 0.6), result(1, None, 0.4)]
    assert tables.selection_metric(without) == 'test_accuracy'
    assert tables.best_run_index(without) == 0


def test_workers_split_the_cores_and_drop_their_own_flag(monkeypatch):
    from resnet_jax.studies import workers

    assert workers.core_shares([0, 1], 2) == [[0], [1]]
    assert workers.core_shares([0, 1, 2, 3, 4], 2) == [[0, 1, 2], [3, 4]]
    assert workers.core_shares([0], 3) == [[0], [0], [0]]
    argv = ['main.py', '--config=c.py', '--workers', '4', '--workdir=w', '--workers=2']
    assert workers.worker_argv(argv)[-2:] == ['--config=c.py', '--workdir=w']
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '2,3')
    assert workers.visible_gpus() == ['2', '3']
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '')
    assert workers.visible_gpus() == []


def test_two_workers_draw_different_first_trials(tmp_path, learnable):
    """Each worker's sampler is seeded by the trials before its draw: two workers
    starting together never draw the same point (the seeded start of TPE would)."""
    config = search_config(learnable.path, sampler='tpe', num_trials=4)
    config.search.space.learning_rate = search_space.float_param(1e-4, 0.1, log=True)
    spec = search_space.spec_from_config(config)
    workdir = str(tmp_path / 'study')
    studies = [optuna_study.open_study(spec, workdir) for _ in range(2)]  # Two workers.
    drawn = []
    for study in studies:
        with optuna_study.claim_lock(workdir):
            (trial,) = optuna_study.claim(study, spec)
        drawn.append(search_space.sample(trial, spec.params, spec.base))
    assert drawn[0] != drawn[1]
    # And the draws are reproducible: the same seed and history give the same point.
    again = optuna_study.open_study(spec, str(tmp_path / 'again'))
    with optuna_study.claim_lock(str(tmp_path / 'again')):
        (trial,) = optuna_study.claim(again, spec)
    assert search_space.sample(trial, spec.params, spec.base) == drawn[0]


@pytest.mark.parametrize('sampler', ['tpe', 'random', 'qmc'])
def test_two_search_seeds_share_no_draw(tmp_path, learnable, sampler):
    """Each draw's sampler seed comes from the study's seed and the draw's position
    together: seed 1's draws are not seed 0's shifted by one, as with seed + position."""
    drawn = {}
    for seed in (0, 1):
        config = search_config(learnable.path, sampler=sampler, num_trials=15, seed=seed)
        config.search.space.learning_rate = search_space.float_param(1e-4, 0.1, log=True)
        spec = search_space.spec_from_config(config)
        workdir = str(tmp_path / f'seed{seed}')
        # The best value near 3e-3.
        drawn[seed] = draw_learning_rates(spec, workdir, 15, lambda r: -abs(np.log10(r) + 2.5))
    assert not set(drawn[0]) & set(drawn[1])
    assert optuna_study.draw_seed(0, 1) != optuna_study.draw_seed(1, 0)


def test_a_study_reads_cleanly_in_optuna_s_own_tools(tmp_path, learnable):
    """Named after its workdir, its objective named, a few short attributes: what
    optuna.load_study and `optuna studies` show."""
    import subprocess
    import sys

    import optuna

    config = search_config(learnable.path, sampler='tpe', num_trials=3)
    spec = search_space.spec_from_config(config)
    workdir = str(tmp_path / 'lr_search')
    optuna_study.open_study(spec, workdir)
    url = f'sqlite:///{workdir}/study.db'
    study = optuna.load_study(study_name=None, storage=url)
    assert study.study_name == 'lr_search'
    assert study.metric_names == ['val_accuracy']
    assert len(json.dumps(study.user_attrs)) < 300, study.user_attrs
    assert study.user_attrs['searched'] == 'learning_rate'
    optuna_cli = os.path.join(os.path.dirname(sys.executable), 'optuna')
    listed = subprocess.run(
        [optuna_cli, 'studies', '--storage', url, '-f', 'json'],
        capture_output=True,
        text=True,
        check=True,
    )
    (row,) = json.loads(listed.stdout)
    assert row['name'] == 'lr_search' and row['direction'] == ['MAXIMIZE']
    assert len(json.dumps(row)) < 600, row
    # Rejoined under its recorded name; another config is still refused, by field.
    assert optuna_study.open_study(spec, workdir).study_name == 'lr_search'
    other = search_config(learnable.path, sampler='tpe', num_trials=3)
    other.batch_size = 10
    with pytest.raises(search_space.SearchError, match='differs in: base_config'):
        optuna_study.open_study(search_space.spec_from_config(other), workdir)
    named = search_config(learnable.path, sampler='tpe', study_name='mine')
    assert optuna_study.open_study(search_space.spec_from_config(named), workdir).study_name == (
        'mine'
    )


def test_a_study_written_by_the_previous_version_reports_and_resumes(tmp_path, learnable):
    """The committed search (its storage holds the whole key and the name 'search'):
    the same config joins it, names its objective, finds every trial done, and
    the report is written from it."""
    import shutil

    import optuna

    from resnet_jax.configs import cpu_search
    from resnet_jax.reports import study_report

    workdir = str(tmp_path / 'old')
    shutil.copytree(os.path.join(REPO, 'results', 'search', 'search'), workdir)
    config = cpu_search.get_config()
    config.data.path = learnable.path  # Where the data is does not change the study.
    spec = search_space.spec_from_config(config)
    study = optuna_study.open_study(spec, workdir)
    assert study.study_name == 'search' and study.metric_names == ['val_accuracy']
    with optuna_study.claim_lock(workdir):
        assert optuna_study.claim(study, spec) == []  # All 16 trials ended: nothing to train.
    assert len(search.ended_runs(spec, workdir)) == 16
    assert os.path.exists(study_report.write_study_report(workdir)['search'])
    loaded = optuna.load_study(study_name='search', storage=f'sqlite:///{workdir}/study.db')
    assert len(loaded.trials) == 16


def test_an_unreachable_storage_with_workers_is_one_line_and_leaves_nothing(
    cli, tmp_path, learnable
):
    config_file = write_config_file(
        tmp_path, "config.search.storage = 'sqlite:////nonexistent/folder/study.db'"
    )
    workdir = tmp_path / 'study'
    result = cli.run(
        [f'--config={config_file}', f'--config.data.path={learnable.path}',
         f'--workdir={workdir}', '--workers=2']
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: cannot open the study storage')
    assert not workdir.exists()
