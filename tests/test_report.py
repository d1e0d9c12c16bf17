"""Sweep reports from hand-written sweep dirs: tables, the study comparison, plots.

No training: each test writes a ``sweep.json`` manifest and run folders with
``metrics.jsonl`` / ``summary.json`` itself (``make_sweep`` / ``write_run``).
"""

import itertools
import json
import math
import os
import re
import statistics

import pytest

from resnet_jax.reports import load, sweep_report, tables
from resnet_jax.reports.markdown import PAPER_SOURCE
from resnet_jax.rundir import writers

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
JPEG_DATA = {'source': 'folder', 'path': '/srv/data/cifar10-jpeg'}


def run_name(overrides):
    return ','.join(f'{k}={v}' for k, v in overrides.items())


def make_sweep(root, axes, num_epochs=3, data=None):
    """Writes a manifest of the full grid over ``axes``; returns its runs."""
    base = {
        'batch_size': 128,
        'learning_rate': 0.001,
        'shuffle': True,
        'num_epochs': num_epochs,
        'seed': 0,
        'data': dict(data or JPEG_DATA),
    }
    runs = []
    for values in itertools.product(*axes.values()):
        overrides = dict(zip(axes, values, strict=True))
        runs.append({'name': run_name(overrides), 'overrides': overrides})
    manifest = {'axes': axes, 'runs': runs, 'base_config': base}
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, 'sweep.json'), 'w') as f:
        json.dump(manifest, f)
    return runs


def write_run(
    root,
    run,
    *,
    final_test=0.8,
    final_train=0.9,
    epochs=3,
    num_epochs=3,
    status='completed',
    summary=True,
    error=None,
    data=None,
):
    """Writes one run folder: linear accuracy curves ending at the final values."""
    run_dir = os.path.join(root, run['name'])
    os.makedirs(run_dir, exist_ok=True)
    config = load.config_with_overrides(
        {'num_epochs': num_epochs, 'seed': 0, 'data': dict(data or JPEG_DATA)}, run['overrides']
    )
    config.setdefault('batch_size', 128)
    config.setdefault('learning_rate', 0.001)
    config.setdefault('shuffle', True)
    records = [
        {
            'epoch': e,
            'train_loss': 2.0 / e,
            'train_accuracy': final_train * e / epochs,
            'test_loss': 2.2 / e,
            'test_accuracy': final_test * e / epochs,
            'learning_rate': config['learning_rate'],
            'epoch_seconds': 10.0 + e,
            'images_per_second': 1000.0 * e if e > 1 else 5.0,
        }
        for e in range(1, epochs + 1)
    ]
    with open(os.path.join(run_dir, 'config.json'), 'w') as f:
        json.dump(config, f)
    with open(os.path.join(run_dir, 'metrics.jsonl'), 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in records)
    if summary:
        last = records[-1] if records else {}
        best = max(records, key=lambda r: r['test_accuracy']) if records else {}
        obj = {
            'config': config,
            'num_params': 1000,
            'epochs_completed': last.get('epoch', 0),
            'train_accuracy': last.get('train_accuracy'),
            'test_accuracy': last.get('test_accuracy'),
            'best_test_accuracy': best.get('test_accuracy'),
            'best_epoch': best.get('epoch'),
            'wall_seconds': 123.456 + epochs,
            'data': {**config['data'], 'num_train': 50000, 'num_test': 10000},
            'status': status,
        }
        if error:
            obj['error'] = error
        with open(os.path.join(run_dir, 'summary.json'), 'w') as f:
            json.dump(obj, f)
    return records


def read_text(path):
    with open(path) as f:
        return f.read()


def read_markdown(path):
    """A Markdown file with runs of spaces collapsed (its tables pad cells to align)."""
    return re.sub(' +', ' ', read_text(path))


def test_full_grid_rows_in_manifest_order_and_round_trip(tmp_path):
    root = str(tmp_path / 'sweep')
    runs = make_sweep(root, {'batch_size': [100, 500], 'learning_rate': [0.1, 0.01]})
    finals = [0.71234, 0.85678, 0.60001, 0.83333]
    summaries = []
    for run, acc in zip(runs, finals, strict=True):
        write_run(root, run, final_test=acc, final_train=acc + 0.1)
        summaries.append(json.loads(read_text(os.path.join(root, run['name'], 'summary.json'))))

    paths = sweep_report.write_sweep_report(root)
    assert paths['results_csv'] == os.path.join(root, 'results.csv')
    rows = load.read_results_csv(paths['results_csv'])
    with open(paths['results_csv']) as f:
        header = f.readline().strip().split(',')
    assert header[:5] == [
        'epochs',
        'batch_size',
        'learning_rate',
        'train_accuracy',
        'test_accuracy',
    ]
    assert [(r['batch_size'], r['learning_rate']) for r in rows] == [
        (100, 0.1),
        (100, 0.01),
        (500, 0.1),
        (500, 0.01),
    ]
    for row, s in zip(rows, summaries, strict=True):
        assert row['epochs'] == s['epochs_completed'] == 3
        # Fractions, as in summary.json, to 4 decimals (2 of the % results.md shows).
        assert row['train_accuracy'] == round(s['train_accuracy'], 4)
        assert row['test_accuracy'] == round(s['test_accuracy'], 4)
        assert row['best_test_accuracy'] == round(s['best_test_accuracy'], 4)
        assert row['best_epoch'] == s['best_epoch'] == 3
        assert row['wall_seconds'] == round(s['wall_seconds'], 1)
        assert row['images_per_second'] == statistics.median([2000.0, 3000.0])  # Not epoch 1.
        assert row['status'] == 'completed'
        assert row['error'] is None
        assert isinstance(row['batch_size'], int) and isinstance(row['test_accuracy'], float)
    assert [r['best'] for r in rows] == [None, '*', None, None]
    markdown = read_markdown(paths['results_md'])
    assert '★' in markdown and '**85.68**' in markdown
    assert '4 completed' in markdown
    # The base config's shuffle=True puts every run on a study row.
    assert 'comparison_csv' in paths


def test_collect_derived_values(tmp_path):
    root = str(tmp_path / 'sweep')
    (run,) = make_sweep(root, {'learning_rate': [0.01]})
    write_run(root, run, final_test=0.5, epochs=1, num_epochs=1)
    (result,) = load.collect(root)
    assert result.name == 'learning_rate=0.01'
    assert result.overrides == {'learning_rate': 0.01}
    assert result.status == 'completed'
    assert result.test_accuracy == pytest.approx(0.5)
    assert result.images_per_second == 5.0  # One epoch: epoch 1 is all there is.
    assert result.num_epochs == 1 and result.epochs_completed == 1
    with pytest.raises(AttributeError):
        result.status = 'failed'  # Frozen.


def test_partial_sweep(tmp_path):
    root = str(tmp_path / 'sweep')
    runs = make_sweep(root, {'batch_size': [100, 500], 'learning_rate': [0.1, 0.01]}, num_epochs=5)
    pending, incomplete, failed, completed = runs
    write_run(root, incomplete, epochs=2, num_epochs=5, final_test=0.4, summary=False)
    write_run(
        root,
        failed,
        epochs=1,
        num_epochs=5,
        status='failed',
        error='RuntimeError: out of memory | allocating 12 GiB',
    )
    write_run(root, completed, epochs=5, num_epochs=5, final_test=0.75)
    # A half-written last line (a run appending right now) is skipped.
    with open(os.path.join(root, incomplete['name'], 'metrics.jsonl'), 'a') as f:
        f.write('{"epoch": 3, "train_lo')

    results = load.collect(root)
    assert [r.status for r in results] == ['pending', 'incomplete', 'failed', 'completed']
    assert results[0].epochs == [] and results[0].test_accuracy is None
    assert results[1].epochs_completed == 2
    assert results[1].test_accuracy == pytest.approx(0.4)
    assert results[1].wall_seconds == pytest.approx(11.0 + 12.0)
    assert results[2].error.startswith('RuntimeError')

    paths = sweep_report.write_sweep_report(root)
    rows = load.read_results_csv(paths['results_csv'])
    assert [r['status'] for r in rows] == ['pending', 'incomplete', 'failed', 'completed']
    assert rows[0]['test_accuracy'] is None and rows[0]['epochs'] == 0
    assert rows[1]['test_accuracy'] == 0.4
    assert rows[2]['error'] == 'RuntimeError: out of memory | allocating 12 GiB'
    assert [r['best'] for r in rows] == [None, None, None, '*']
    markdown = read_markdown(paths['results_md'])
    assert '1 completed, 1 incomplete, 1 failed, 1 pending' in markdown
    assert 'incomplete (2/5)' in markdown
    assert 'RuntimeError: out of memory \\| allocating 12 GiB' in markdown  # Escaped in tables.
    assert '### Failed and diverged runs' in markdown
    # Leaves no temporary files behind.
    assert not [f for f in os.listdir(root) if f.endswith('.tmp')]


def test_stale_summary_of_a_resumed_run_is_ignored(tmp_path):
    root = str(tmp_path / 'sweep')
    (run,) = make_sweep(root, {'seed': [0]}, num_epochs=4)
    write_run(root, run, epochs=2, num_epochs=4, status='incomplete')
    write_run(root, run, epochs=3, num_epochs=4, summary=False)  # Resumed, running.
    (result,) = load.collect(root)
    assert result.status == 'incomplete'
    assert result.epochs_completed == 3


def test_failure_recorded_on_an_old_summary(tmp_path):
    # The sweep records a failure by updating the summary left by an earlier attempt.
    root = str(tmp_path / 'sweep')
    (run,) = make_sweep(root, {'seed': [0]}, num_epochs=4)
    write_run(root, run, epochs=2, num_epochs=4, status='incomplete')
    write_run(root, run, epochs=3, num_epochs=4, final_test=0.3, summary=False)
    summary_path = os.path.join(root, run['name'], 'summary.json')
    summary = json.loads(read_text(summary_path))
    summary.update(status='failed', error='ValueError: boom')
    with open(summary_path, 'w') as f:
        json.dump(summary, f)
    (result,) = load.collect(root)
    assert result.status == 'failed' and result.error == 'ValueError: boom'
    assert result.epochs_completed == 3
    assert result.test_accuracy == pytest.approx(0.3)


def test_regenerating_gives_identical_files(tmp_path):
    root = str(tmp_path / 'sweep')
    runs = make_sweep(root, {'batch_size': [100, 500], 'learning_rate': [0.01], 'shuffle': [True]})
    write_run(root, runs[0], final_test=0.6)
    write_run(root, runs[1], final_test=0.7, summary=False, epochs=2)
    first = sweep_report.write_sweep_report(root)
    contents = {k: open(p, 'rb').read() for k, p in first.items()}
    second = sweep_report.write_sweep_report(root)
    assert second == first
    assert {k: open(p, 'rb').read() for k, p in second.items()} == contents


def test_comparison_with_the_study(tmp_path):
    root = str(tmp_path / 'sweep')
    axes = {'batch_size': [100, 500], 'learning_rate': [0.01], 'shuffle': [False]}
    runs = make_sweep(root, axes, num_epochs=2)
    write_run(root, runs[0], epochs=2, num_epochs=2, final_test=0.41237, final_train=0.5)
    write_run(root, runs[1], epochs=2, num_epochs=2, final_test=0.45, final_train=0.55)
    paths = sweep_report.write_sweep_report(root)

    paper = {
        (r['batch_size'], r['learning_rate'], r['shuffle']): r for r in load.load_paper_results()
    }
    rows = load.read_results_csv(paths['comparison_csv'])
    assert len(rows) == 2
    ours = load.read_results_csv(paths['results_csv'])
    for row, our in zip(rows, ours, strict=True):
        theirs = paper[(row['batch_size'], row['learning_rate'], row['shuffle'])]
        assert row['paper_test_accuracy'] == pytest.approx(theirs['test_accuracy'], abs=1e-12)
        assert row['paper_train_accuracy'] == pytest.approx(theirs['train_accuracy'], abs=1e-12)
        assert row['test_accuracy'] == our['test_accuracy']
        assert row['test_difference'] == pytest.approx(
            our['test_accuracy'] - theirs['test_accuracy'], abs=1e-9
        )
        assert row['train_difference'] == pytest.approx(
            our['train_accuracy'] - theirs['train_accuracy'], abs=1e-9
        )
        assert row['epochs'] == 2 and row['paper_epochs'] == 50
        assert row['note'] == 'ours: 2 epochs, theirs: 50'
    # bs 100, lr 0.01, no shuffle: the study has 95.87 / 88.16 (%), read as fractions.
    assert (rows[0]['paper_train_accuracy'], rows[0]['paper_test_accuracy']) == (0.9587, 0.8816)
    assert rows[0]['test_difference'] == pytest.approx(0.4124 - 0.8816)
    markdown = read_markdown(paths['results_md'])
    assert '## Comparison with the study' in markdown
    assert PAPER_SOURCE in markdown
    assert '88.16' in markdown and '-46.92' in markdown
    assert 'ours: 2 epochs, theirs: 50' in markdown
    assert 'JPEG re-encoding of CIFAR-10 and the study the original' in markdown


def test_comparison_skipped_for_other_grids(tmp_path):
    root = str(tmp_path / 'sweep')
    runs = make_sweep(root, {'batch_size': [64], 'learning_rate': [0.05]})
    write_run(root, runs[0])
    open(os.path.join(root, 'comparison.csv'), 'w').close()  # A stale one is removed.
    paths = sweep_report.write_sweep_report(root)
    assert 'comparison_csv' not in paths
    assert not os.path.exists(os.path.join(root, 'comparison.csv'))
    markdown = read_markdown(paths['results_md'])
    assert 'Not compared: no run of this sweep' in markdown
    assert '| batch_size | learning_rate | shuffle | train ours' not in markdown


def test_packaged_paper_results():
    rows = load.load_paper_results()
    assert len(rows) == 18
    assert list(rows[0]) == [
        'epochs',
        'batch_size',
        'learning_rate',
        'shuffle',
        'train_accuracy',
        'test_accuracy',
    ]
    assert {r['epochs'] for r in rows} == {50}
    grid = {(r['batch_size'], r['learning_rate'], r['shuffle']) for r in rows}
    assert grid == set(itertools.product([100, 500, 1000], [0.1, 0.01, 0.001], [True, False]))
    best = max(rows, key=lambda r: r['test_accuracy'])
    assert (best['batch_size'], best['learning_rate'], best['shuffle']) == (500, 0.01, False)
    assert best['test_accuracy'] == pytest.approx(0.8912)  # 89.12% in the file.
    assert all(0 < r[k] < 1 for r in rows for k in ('train_accuracy', 'test_accuracy'))


def test_paper_csv_argument(tmp_path):
    path = tmp_path / 'paper.csv'
    path.write_text(
        'epochs,batch_size,learning_rate,shuffle,train_accuracy,test_accuracy\n'
        '50,64,0.05,True,90.00,80.00\n'
    )
    root = str(tmp_path / 'sweep')
    runs = make_sweep(root, {'batch_size': [64], 'learning_rate': [0.05]})
    write_run(root, runs[0], final_test=0.8123)
    paths = sweep_report.write_sweep_report(root, paper_csv=str(path))
    (row,) = load.read_results_csv(paths['comparison_csv'])
    assert row['paper_test_accuracy'] == 0.8  # The file's 80.00 (%).
    assert row['test_difference'] == pytest.approx(0.0123)


def _assert_png(path, min_bytes=5000):
    with open(path, 'rb') as f:
        data = f.read()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > min_bytes


def test_plots_for_the_study_grid(tmp_path):
    root = str(tmp_path / 'sweep')
    axes = {
        'batch_size': [100, 500, 1000],
        'learning_rate': [0.1, 0.01, 0.001],
        'shuffle': [True, False],
    }
    runs = make_sweep(root, axes, num_epochs=3)
    for i, run in enumerate(runs[:-2]):  # The last two stay pending: blank heatmap cells.
        write_run(root, run, final_test=0.5 + 0.02 * i, epochs=3 if i % 5 else 2, summary=i % 5 > 0)
    paths = sweep_report.write_sweep_report(root)
    _assert_png(paths['curves'], 20000)
    _assert_png(paths['heatmap'])
    markdown = read_markdown(paths['results_md'])
    assert '![Accuracy and loss per epoch](curves.png)' in markdown
    assert '![Final test accuracy](heatmap.png)' in markdown
    assert len(load.read_results_csv(paths['comparison_csv'])) == 18


def test_generic_axes_skip_the_heatmap(tmp_path):
    root = str(tmp_path / 'sweep')
    runs = make_sweep(root, {'seed': [0, 1], 'data.train_subset': [1000]})
    write_run(root, runs[0], final_test=0.3)
    write_run(root, runs[1], final_test=0.2, status='diverged', error='loss is nan at epoch 3')
    paths = sweep_report.write_sweep_report(root)
    assert 'heatmap' not in paths
    _assert_png(paths['curves'])
    rows = load.read_results_csv(paths['results_csv'])
    assert [(r['seed'], r['data.train_subset']) for r in rows] == [(0, 1000), (1, 1000)]
    markdown = read_markdown(paths['results_md'])
    assert 'heatmap.png not drawn' in markdown
    assert 'diverged: loss is nan at epoch 3' in markdown
    assert (
        tables.run_label({'seed': 1, 'data.train_subset': 1000}) == 'seed=1 data.train_subset=1000'
    )


def test_run_labels():
    assert tables.run_label({'batch_size': 100, 'learning_rate': 0.01, 'shuffle': True}) == (
        'bs100 lr0.01 shuf'
    )
    assert tables.run_label({'shuffle': False, 'learning_rate': 0.001}) == 'lr0.001 noshuf'
    assert tables.run_label({}, 'only') == 'only'


def test_data_statements(tmp_path):
    root = str(tmp_path / 'sweep')
    runs = make_sweep(root, {'learning_rate': [0.01]})
    write_run(root, runs[0])
    markdown = read_markdown(sweep_report.write_sweep_report(root)['results_md'])
    assert (
        'Data: image folder /srv/data/cifar10-jpeg (JPEG re-encoding of CIFAR-10, '
        '50000 train / 10000 test images: accuracies are comparable only with runs on this copy'
    ) in markdown
    cifar = tables.describe_data({'source': 'cifar', 'path': '/d/cifar-10-batches-py'})
    assert cifar == 'official CIFAR-10 files at /d/cifar-10-batches-py'
    assert tables.describe_data({'source': 'tfds', 'path': ''}) == 'TFDS cifar10'


def test_missing_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match='sweep.json'):
        load.collect(str(tmp_path))


def test_a_run_in_flight_reads_as_writers_summarize_makes_of_its_records(tmp_path):
    root = str(tmp_path / 'sweep')
    (run,) = make_sweep(root, {'seed': [0]}, num_epochs=5)
    records = write_run(root, run, epochs=3, num_epochs=5, final_test=0.6, summary=False)
    records[1]['test_accuracy'] = 0.9  # Epoch 2 is the best,
    records[2]['test_accuracy'] = math.nan  # epoch 3's test accuracy is not scorable.
    with open(os.path.join(root, run['name'], 'metrics.jsonl'), 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in records)
    (result,) = load.collect(root)
    expected = writers.summarize(records)
    assert result.status == 'incomplete'
    assert (result.epochs_completed, result.best_epoch) == (3, 2)
    assert (expected['epochs_completed'], expected['best_epoch']) == (3, 2)
    assert result.best_test_accuracy == pytest.approx(expected['best_test_accuracy'])
    assert result.train_accuracy == pytest.approx(expected['train_accuracy'])
    assert result.test_accuracy is None  # NaN: no final test accuracy to show.
    assert result.wall_seconds == pytest.approx(expected['wall_seconds']) == 11 + 12 + 13
