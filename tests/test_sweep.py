"""Sweeps: grid expansion, sharding, resume, failures, two processes at once."""

import json
import os
import shutil

import ml_collections
import pytest

from resnet_jax import validation
from resnet_jax.configs import paper_sweep
from resnet_jax.reports import load, sweep_report
from resnet_jax.rundir import workdir as workdir_lib
from resnet_jax.studies import search, sweep
from tests.conftest import make_tiny_config


def _grid_config(data_path, **axes):
    config = make_tiny_config(data_path)
    config.num_epochs = 2
    config.sweep = ml_collections.ConfigDict()
    for name, values in axes.items():
        node = config.sweep
        *parents, leaf = name.split('__')
        for part in parents:
            if part not in node:
                node[part] = ml_collections.ConfigDict()
            node = node[part]
        node[leaf] = tuple(values)
    return config


def test_paper_sweep_is_the_studys_18_runs():
    runs = sweep.expand(paper_sweep.get_config())
    assert len(runs) == 18 and len({r.name for r in runs}) == 18
    assert runs[0].name == 'batch_size=100,learning_rate=0.1,shuffle=True'
    triples = {(r.config.batch_size, r.config.learning_rate, r.config.shuffle) for r in runs}
    assert triples == {
        (b, lr, s) for b in (100, 500, 1000) for lr in (0.1, 0.01, 0.001) for s in (True, False)
    }
    assert all(r.config.num_epochs == 50 and r.config.optimizer == 'adam' for r in runs)
    assert all('sweep' not in r.config for r in runs)


def test_nested_axes_and_readable_names():
    config = _grid_config('', data__train_subset=[10, 20], seed=[0])
    runs = sweep.expand(config)
    assert [r.name for r in runs] == ['data.train_subset=10,seed=0', 'data.train_subset=20,seed=0']
    assert runs[1].config.data.train_subset == 20


@pytest.mark.parametrize(
    'axes,fragment',
    [
        ({'no_such_field': [1]}, 'no_such_field'),
        ({'batch_size': [0, 32]}, 'batch_size'),
        ({'learning_rate': ['fast']}, 'learning_rate'),
        ({'batch_size': []}, 'empty'),
    ],
)
def test_bad_sweeps_fail_before_training(axes, fragment):
    with pytest.raises(validation.ConfigError, match=fragment):
        sweep.expand(_grid_config('', **axes))


def test_sweep_shards_are_refused_with_a_pointer_to_workers(cli, tmp_path):
    result = cli.run(
        ['--config', 'configs/paper_sweep.py', '--workdir', str(tmp_path), '--sweep_shard=1/3']
    )
    assert result.returncode == 2
    assert result.stderr.startswith('error: --sweep_shard is replaced by workers')
    assert '--workers=N' in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not os.listdir(tmp_path)


def _mtime(path):
    return os.stat(path).st_mtime_ns


@pytest.mark.usefixtures('training')
def test_grid_end_to_end_and_resume(tmp_path, cifar_py):
    config = _grid_config(cifar_py.path, seed=[0, 1], shuffle=[True, False])
    workdir = str(tmp_path)
    statuses = search.run_study(config, workdir)
    sweep_report.write_sweep_report(workdir)
    assert list(statuses.values()) == ['completed'] * 4
    manifest = json.loads((tmp_path / 'sweep.json').read_text())
    names = [r['name'] for r in manifest['runs']]
    assert names == list(statuses) and manifest['axes'] == {
        'seed': [0, 1],
        'shuffle': [True, False],
    }
    for name in names:
        assert json.loads((tmp_path / name / 'summary.json').read_text())['status'] == 'completed'
        assert len(workdir_lib.read_metrics(str(tmp_path / name))) == 2
    assert (tmp_path / 'results.csv').exists() and (tmp_path / 'results.md').exists()
    accuracy_columns = ('train_accuracy', 'test_accuracy', 'best_test_accuracy', 'status')
    rows_before = [
        {k: row[k] for k in accuracy_columns}
        for row in load.read_results_csv(str(tmp_path / 'results.csv'))
    ]

    # Shuffle on and off train on different orders; different seeds differ too.
    finals = [workdir_lib.read_metrics(str(tmp_path / n))[-1]['train_loss'] for n in names]
    assert len(set(finals)) == 4

    deleted, cut, kept = names[0], names[1], names[2:]
    expected_cut = workdir_lib.read_metrics(str(tmp_path / cut))
    shutil.rmtree(tmp_path / deleted)
    last = max(int(s) for s in os.listdir(tmp_path / cut / 'checkpoints'))
    shutil.rmtree(tmp_path / cut / 'checkpoints' / str(last))  # Killed before epoch 2's.
    os.remove(tmp_path / cut / 'summary.json')
    kept_mtimes = [_mtime(tmp_path / k / 'summary.json') for k in kept]

    statuses = search.run_study(config, workdir)
    sweep_report.write_sweep_report(workdir)
    assert list(statuses.values()) == ['completed'] * 4
    assert [_mtime(tmp_path / k / 'summary.json') for k in kept] == kept_mtimes  # Skipped.
    resumed = workdir_lib.read_metrics(str(tmp_path / cut))
    keys = ('train_loss', 'train_accuracy', 'test_loss', 'test_accuracy')
    assert [{k: r[k] for k in keys} for r in resumed] == [
        {k: r[k] for k in keys} for r in expected_cut
    ]
    # The report is rewritten at the end: same accuracies (timings differ).
    rows_after = [
        {k: row[k] for k in accuracy_columns}
        for row in load.read_results_csv(str(tmp_path / 'results.csv'))
    ]
    assert rows_after == rows_before


def test_two_workers_at_once_with_failing_and_diverging_runs(cli, tmp_path, cifar_py):
    """Runs: (60, 0.01) completes, (60, 3e38) diverges, (1000, *) fail: subset too big."""
    workdir = str(tmp_path / 'sweep')
    # A sweep config of one's own, outside the repository, built on smoke.py.
    cfg = tmp_path / 'configs' / 'grid.py'
    cfg.parent.mkdir()
    cfg.write_text(
        'import ml_collections\n'
        'from resnet_jax.configs import smoke\n'
        'def get_config():\n'
        '    c = smoke.get_config()\n'
        '    c.sweep = ml_collections.ConfigDict()\n'
        '    c.sweep.data = ml_collections.ConfigDict({"train_subset": (60, 1000)})\n'
        '    c.sweep.learning_rate = (0.01, 3e38)\n'
        '    return c\n'
    )
    common = [
        '--config',
        str(cfg),
        '--workdir',
        workdir,
        f'--config.data.path={cifar_py.path}',
        '--config.num_epochs=1',
        '--config.optimizer=sgd',
        '--config.batch_size=20',
    ]
    procs = [cli.start(common) for _ in range(2)]  # The same command twice: two workers.
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 1, err[-2000:]
        assert 'Traceback' not in err
    statuses = {}
    manifest = json.loads(open(os.path.join(workdir, 'sweep.json')).read())
    for run in manifest['runs']:
        summary = json.loads(open(os.path.join(workdir, run['name'], 'summary.json')).read())
        statuses[run['name']] = (summary['status'], summary.get('error', ''))
    assert statuses['data.train_subset=60,learning_rate=0.01'][0] == 'completed'
    assert statuses['data.train_subset=60,learning_rate=3e+38'][0] == 'diverged'
    for name in (
        'data.train_subset=1000,learning_rate=0.01',
        'data.train_subset=1000,learning_rate=3e+38',
    ):
        assert statuses[name][0] == 'failed' and 'train_subset' in statuses[name][1]
    # The report lists every run with its status; regenerating it needs no training.
    report = cli.start(['--workdir', workdir, '--mode=report'])
    out, err = report.communicate(timeout=120)
    assert report.returncode == 0, err
    md = open(os.path.join(workdir, 'results.md')).read()
    assert 'diverged' in md and 'failed' in md


def test_repeats_are_a_seed_axis_recorded_in_the_manifest(tmp_path):
    config = _grid_config('', learning_rate=[0.1, 0.01])
    config.sweep.repeats = 2
    runs = sweep.expand(config)
    assert [r.name for r in runs] == [
        'learning_rate=0.1,seed=0',
        'learning_rate=0.1,seed=1',
        'learning_rate=0.01,seed=0',
        'learning_rate=0.01,seed=1',
    ]
    assert [r.config.seed for r in runs] == [0, 1, 0, 1]
    assert all('sweep' not in r.config for r in runs)
    sweep.write_manifest(config, str(tmp_path), runs)
    manifest = json.loads((tmp_path / 'sweep.json').read_text())
    assert manifest['axes'] == {'learning_rate': [0.1, 0.01], 'seed': [0, 1]}
    assert manifest['options'] == {'repeats': 2}
    assert manifest['runs'][1]['overrides'] == {'learning_rate': 0.1, 'seed': 1}
    # Counted from config.seed; repeats alone make a sweep.
    config = _grid_config('')
    config.seed = 5
    config.sweep.repeats = 3
    assert sweep.is_sweep(config)
    assert [r.name for r in sweep.expand(config)] == ['seed=5', 'seed=6', 'seed=7']


@pytest.mark.parametrize('repeats', [0, -1, 1.5, True, '2', (1, 2)])
def test_bad_repeats(repeats):
    config = _grid_config('', learning_rate=[0.1])
    config.sweep.repeats = repeats
    with pytest.raises(validation.ConfigError, match=r'config\.sweep\.repeats must be an integer'):
        sweep.expand(config)


def test_repeats_with_a_seed_axis_is_an_error():
    config = _grid_config('', seed=[0, 1])
    config.sweep.repeats = 2
    with pytest.raises(validation.ConfigError, match='repeats=2 and config.sweep.seed are both'):
        sweep.expand(config)


def test_an_axis_the_config_lacks_or_of_the_wrong_type_names_its_sweep_entry():
    for axis in ('data__no_such', 'no_such', 'batch_size__deeper'):
        field = axis.replace('__', '.')
        message = rf'^config\.sweep\.{field}: config has no field {field}$'
        with pytest.raises(validation.ConfigError, match=message):
            sweep.expand(_grid_config('', **{axis: [1]}))
    with pytest.raises(validation.ConfigError, match=r"^config\.sweep\.learning_rate='fast': "):
        sweep.expand(_grid_config('', learning_rate=['fast']))
