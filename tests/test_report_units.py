"""One unit for accuracies in every csv of the reports: fractions in [0, 1], read back
with pandas; the sweep report and the study report agree on each run.

The committed reports under ``results/`` are checked as they are, and the study of
``results/search/grid`` (a grid with its ``sweep.json``, ``study.db`` and run folders)
is reported again from a copy, by both reports.
"""

import os
import shutil

import pandas as pd
import pytest

from resnet_jax.reports import study_report, sweep_report
from tests.conftest import REPO
from tests.test_seed_stats import _write_seed_sweep

AXES = ['batch_size', 'learning_rate', 'shuffle']
REPORTS = ('cpu_sweep', 'search/grid', 'search/search')  # Under results/.
ACCURACY_SUFFIXES = ('accuracy', 'accuracy_mean', 'accuracy_sd', '_sd')


def _report_csvs(folder):
    """The csv files of a report folder as {name: frame}."""
    names = sorted(f for f in os.listdir(folder) if f.endswith('.csv'))
    return {name: pd.read_csv(os.path.join(folder, name)) for name in names}


def _assert_fractions(name, frame):
    """Accuracies (means, sds) in [0, 1]; differences in [-1, 1]; no column is in %."""
    checked = 0
    for column in frame.columns:
        values = frame[column].dropna()
        if column.endswith(ACCURACY_SUFFIXES) or column == 'value':
            assert values.between(0, 1).all(), f'{name}: {column} is not a fraction'
            checked += 1
        elif column.endswith('difference'):
            assert values.between(-1, 1).all(), f'{name}: {column} is not a fraction'
            checked += 1
        elif column.startswith(('test_accuracy_ci95', 'train_accuracy_ci95')):
            # n = 2 gives wide intervals, but around a fraction: far below 100.
            assert values.abs().max() < 5, f'{name}: {column} looks like a percentage'
    return checked


def test_every_csv_of_a_sweep_over_seeds_holds_fractions(tmp_path):
    root = str(tmp_path / 'sweep')
    _write_seed_sweep(root)
    sweep_report.write_sweep_report(root)
    csvs = _report_csvs(root)
    assert set(csvs) == {'results.csv', 'comparison.csv', 'cells.csv', 'paired.csv'}
    for name, frame in csvs.items():
        assert _assert_fractions(name, frame), f'{name} has no accuracy column'
    results = csvs['results.csv']
    assert results['test_accuracy'].max() == pytest.approx(0.83)  # bs 100, seed 1, shuffle.
    comparison = csvs['comparison.csv']
    # bs 100, lr 0.01, shuffle: the study's 88.30 (%); bs 500, no shuffle: 89.12.
    assert comparison['paper_test_accuracy'].iloc[0] == pytest.approx(0.8830)
    assert comparison['paper_test_accuracy'].max() == pytest.approx(0.8912)
    paired = csvs['paired.csv']
    overall = paired[(paired['axis'] == 'shuffle') & (paired['scope'] == 'all')].iloc[0]
    assert overall['mean_difference'] == pytest.approx(0.016)  # 1.6 points.


@pytest.mark.parametrize('report', REPORTS)
def test_the_committed_reports_hold_fractions(report):
    csvs = _report_csvs(os.path.join(REPO, 'results', report))
    assert csvs
    for name, frame in csvs.items():
        _assert_fractions(f'{report}/{name}', frame)


def _joined(folder):
    """results.csv and trials.csv of a grid, joined on the run's parameters."""
    results = pd.read_csv(os.path.join(folder, 'results.csv'))
    trials = pd.read_csv(os.path.join(folder, 'trials.csv'))
    trials = trials.rename(columns={f'param.{a}': a for a in AXES})
    joined = results.merge(trials, on=AXES, suffixes=('_sweep', '_study'))
    assert len(joined) == len(results) == len(trials)
    return joined


def _assert_runs_agree(joined):
    """The same run's test accuracy and epochs, as both reports give them."""
    assert joined['test_accuracy_sweep'].between(0, 1).all()
    # results.csv rounds to 4 decimals (2 of the % results.md shows); trials.csv does not.
    diff = (joined['test_accuracy_sweep'] - joined['test_accuracy_study']).abs()
    assert diff.max() <= 5e-5 + 1e-12
    assert (joined['epochs_sweep'] == joined['epochs_study']).all()


def test_the_committed_grid_reports_agree_on_each_run():
    _assert_runs_agree(_joined(os.path.join(REPO, 'results', 'search', 'grid')))


def test_both_reports_of_a_grid_agree_on_each_run(tmp_path):
    source = os.path.join(REPO, 'results', 'search', 'grid')
    folder = str(tmp_path / 'grid')
    ignore = shutil.ignore_patterns('*.csv', '*.md', '*.png', 'events.out.tfevents.*')
    shutil.copytree(source, folder, ignore=ignore)
    sweep_report.write_sweep_report(folder)
    study_report.write_study_report(folder)
    for name, frame in _report_csvs(folder).items():
        _assert_fractions(name, frame)
    _assert_runs_agree(_joined(folder))
