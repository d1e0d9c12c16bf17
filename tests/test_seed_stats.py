"""Statistics over seeds: t quantiles, mean ± sd with 95% intervals, paired differences,
and the report of a sweep over seeds built from hand-written run folders (no training).

Expected numbers are worked by hand in the comments; t(0.975, df) is 12.7062 (df 1),
4.3027 (df 2), 3.1824 (df 3), 2.7764 (df 4).
"""

import json
import math
import os

import ml_collections
import pytest

from resnet_jax.configs import default
from resnet_jax.reports import load, plots, stats, sweep_report, tables
from resnet_jax.studies import sweep
from tests.test_report import make_sweep, read_markdown, read_text, write_run


@pytest.mark.parametrize(
    'df,expected',
    [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (9, 2.262), (30, 2.042), (120, 1.980)],
)
def test_t_quantile_known_values(df, expected):
    assert stats.t_quantile(df) == pytest.approx(expected, abs=5e-4)


def test_t_quantile_tends_to_the_normal_and_rejects_bad_df():
    assert stats.t_quantile(100_000) == pytest.approx(1.95996, abs=1e-4)
    assert stats.t_quantile(1, 0.95) == pytest.approx(6.314, abs=5e-4)
    assert stats.t_quantile(5, 0.5) == pytest.approx(0.0, abs=1e-9)
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError):
            stats.t_quantile(bad)


def test_estimate_by_hand():
    # 1, 2, 3, 4: mean 2.5, sd sqrt(5/3) = 1.290994, half-width 3.182446 * 1.290994 / 2.
    e = stats.estimate([1, 2, 3, 4])
    assert (e.n, e.mean) == (4, 2.5)
    assert e.sd == pytest.approx(math.sqrt(5 / 3))
    assert e.low == pytest.approx(2.5 - 2.054260, abs=1e-6)
    assert e.high == pytest.approx(2.5 + 2.054260, abs=1e-6)
    assert e.excludes_zero is True
    # 80, 82: mean 81, sd sqrt(2); half-width t(1) * sqrt(2) / sqrt(2) = 12.7062.
    e = stats.estimate([80.0, 82.0])
    assert e.mean == 81.0 and e.sd == pytest.approx(math.sqrt(2))
    assert (e.low, e.high) == pytest.approx((81 - 12.7062, 81 + 12.7062), abs=1e-4)
    # -1, 3: mean 1, sd 2.828; the interval [-24.4, 26.4] includes 0.
    assert stats.estimate([-1.0, 3.0]).excludes_zero is False
    assert stats.estimate([5.0]) == stats.Estimate(1, 5.0)
    assert stats.estimate([]) == stats.Estimate(0)
    assert stats.estimate([5.0]).excludes_zero is None


def test_formatting_an_estimate():
    # Fractions shown in %: mean 2, sd 1.414, interval 2 ± 12.7062.
    e = stats.estimate([0.01, 0.03])
    assert tables.format_estimate(e) == '2.00 ± 1.41'
    assert tables.format_estimate(e, signed=True) == '+2.00 ± 1.41'
    assert tables.format_interval(e, signed=True) == '[-10.71, +14.71]'
    assert tables.format_estimate(stats.estimate([0.07])) == '7.00'
    assert tables.format_interval(stats.estimate([0.07])) == tables.MISSING
    assert tables.percent_cell(0.8912) == '89.12' and tables.percent_cell(None) == tables.MISSING
    assert tables.format_estimate(stats.Estimate(0)) == tables.MISSING


# Final test accuracy (%) by (batch_size, seed, shuffle); the run marked None diverges.
# The runs hold it as a fraction (acc / 100), as every record and csv does.
ACCURACY = {
    (100, 0, True): 81.0,
    (100, 1, True): 83.0,
    (100, 2, True): 82.0,
    (100, 0, False): 80.0,
    (100, 1, False): 80.0,
    (100, 2, False): 81.0,
    (500, 0, True): 70.0,
    (500, 1, True): 72.0,
    (500, 2, True): None,
    (500, 0, False): 69.0,
    (500, 1, False): 70.0,
    (500, 2, False): 70.0,
}
AXES = {
    'batch_size': [100, 500],
    'learning_rate': [0.01],
    'seed': [0, 1, 2],
    'shuffle': [True, False],
}


def _result(overrides, status='completed', test=None):
    return load.RunResult(
        name=sweep.run_name(overrides), overrides=overrides, status=status, test_accuracy=test
    )


def _results():
    out = []
    for bs in AXES['batch_size']:
        for seed in AXES['seed']:
            for shuffle in AXES['shuffle']:
                acc = ACCURACY[(bs, seed, shuffle)]
                overrides = {
                    'batch_size': bs,
                    'learning_rate': 0.01,
                    'seed': seed,
                    'shuffle': shuffle,
                }
                status = 'diverged' if acc is None else 'completed'
                out.append(_result(overrides, status, 0.1 if acc is None else acc / 100))
    return out


def test_cells_group_runs_by_every_axis_but_the_seed():
    cells = stats.group_cells(_results())
    assert [c.values for c in cells] == [
        {'batch_size': bs, 'learning_rate': 0.01, 'shuffle': s}
        for bs in (100, 500)
        for s in (True, False)
    ]
    assert [len(c.runs) for c in cells] == [3, 3, 3, 3]
    # In %: bs 500, shuffle: 70, 72 and a diverged run (left out): mean 71, sd sqrt(2).
    cell = cells[2]
    assert (len(cell.used), cell.excluded, cell.unfinished) == (2, 1, 0)
    e = cell.estimate()
    assert (e.n, e.mean) == (2, pytest.approx(0.71)) and e.sd == pytest.approx(math.sqrt(2) / 100)
    # bs 100, shuffle: 81, 83, 82: mean 82, sd 1, half-width 4.302653 / sqrt(3) = 2.484138.
    e = cells[0].estimate()
    assert (e.mean, e.sd) == pytest.approx((0.82, 0.01))
    assert (e.low, e.high) == pytest.approx((0.82 - 0.02484138, 0.82 + 0.02484138), abs=1e-8)


def test_paired_differences_by_hand():
    cells = stats.paired_differences(_results(), 'shuffle', (True, False))
    assert [c.values for c in cells] == [
        {'batch_size': 100, 'learning_rate': 0.01},
        {'batch_size': 500, 'learning_rate': 0.01},
    ]
    # In points: bs 100: 81-80, 83-80, 82-81 = 1, 3, 1: mean 5/3, sd sqrt(4/3), half
    # 4.302653 * 2/3 (the differences are fractions: 0.01, 0.03, 0.01).
    assert cells[0].differences == pytest.approx((0.01, 0.03, 0.01)) and cells[0].unpaired == 0
    e = cells[0].estimate
    assert e.mean == pytest.approx(5 / 300) and e.sd == pytest.approx(math.sqrt(4 / 3) / 100)
    assert (e.low, e.high) == pytest.approx(((5 / 3 - 2.868435) / 100, (5 / 3 + 2.868435) / 100))
    assert e.excludes_zero is False
    # bs 500: seed 2 has a diverged run: 70-69, 72-70 = 1, 2; one seed unpaired.
    assert cells[1].differences == pytest.approx((0.01, 0.02)) and cells[1].unpaired == 1
    # All 5 pairs: mean 1.6, sd sqrt(0.8), half 2.776445 * sqrt(0.8) / sqrt(5) = 1.110578.
    overall = stats.pooled('shuffle', (True, False), cells)
    assert overall.values == {} and overall.unpaired == 1
    e = overall.estimate
    assert e.n == 5 and e.mean == pytest.approx(0.016)
    assert e.sd == pytest.approx(math.sqrt(0.8) / 100)
    assert (e.low, e.high) == pytest.approx((0.00489422, 0.02710578), abs=1e-8)
    assert e.excludes_zero is True
    assert stats.noise_verdict(e) == 'yes: the interval excludes 0'
    assert stats.two_level_axes(AXES) == ['batch_size', 'shuffle']


def test_epoch_band_and_curve_groups():
    runs = [
        load.RunResult(
            'a',
            {'seed': 0, 'shuffle': True},
            'completed',
            epochs=[{'epoch': 1, 'test_accuracy': 0.5}, {'epoch': 2, 'test_accuracy': 0.6}],
        ),
        load.RunResult(
            'b',
            {'seed': 1, 'shuffle': True},
            'incomplete',
            epochs=[{'epoch': 1, 'test_accuracy': 0.7}],
        ),
        load.RunResult(
            'c',
            {'seed': 2, 'shuffle': True},
            'diverged',
            epochs=[{'epoch': 1, 'test_accuracy': 0.1}],
        ),
    ]
    epochs, mean, low, high = plots.epoch_band(runs[:2], 'test_accuracy', 100)
    assert epochs == [1, 2]
    assert mean == pytest.approx([60.0, 60.0])
    assert (low, high) == (pytest.approx([50.0, 60.0]), pytest.approx([70.0, 60.0]))
    ((label, grouped),) = plots.curve_groups(runs, 'seed')
    assert grouped == runs[:2]
    assert label == 'shuf (2 seed(s), 1 failed/diverged left out, 1 unfinished)'
    assert [g[1] for g in plots.curve_groups(runs)] == [[r] for r in runs]


def test_heatmap_cell_over_seeds():
    cell = stats.group_cells(_results())[2]  # bs 500, shuffle: 70, 72, diverged.
    value, text = plots.heatmap_cell(cell.runs, over_seeds=True)
    assert value == pytest.approx(71.0)  # Plotted in %.
    assert text == '71.00 ± 1.41\nn=2\n1 excluded'
    assert plots.heatmap_cell(cell.runs[:1], over_seeds=True) == (pytest.approx(70.0), '70.00\nn=1')


def _write_seed_sweep(root):
    runs = make_sweep(root, AXES, num_epochs=3)
    for run in runs:
        o = run['overrides']
        acc = ACCURACY[(o['batch_size'], o['seed'], o['shuffle'])]
        if acc is None:
            write_run(root, run, final_test=0.1, status='diverged', error='loss is nan at epoch 3')
        else:  # Train accuracy 10 points above test.
            write_run(root, run, final_test=acc / 100, final_train=acc / 100 + 0.1)
    return runs


def test_report_of_a_sweep_over_seeds(tmp_path):
    root = str(tmp_path / 'sweep')
    runs = _write_seed_sweep(root)
    paths = sweep_report.write_sweep_report(root)
    assert {'cells_csv', 'paired_csv', 'curves', 'heatmap', 'comparison_csv'} <= set(paths)

    # The per-run table is still there, one row per run.
    assert len(load.read_results_csv(paths['results_csv'])) == len(runs) == 12

    cells = load.read_results_csv(paths['cells_csv'])
    assert [(c['batch_size'], c['learning_rate'], c['shuffle']) for c in cells] == [
        (100, 0.01, True),
        (100, 0.01, False),
        (500, 0.01, True),
        (500, 0.01, False),
    ]
    assert 'seed' not in cells[0]
    assert [(c['n'], c['excluded'], c['unfinished'], c['seeds']) for c in cells] == [
        (3, 0, 0, '0 1 2'),
        (3, 0, 0, '0 1 2'),
        (2, 1, 0, '0 1'),
        (3, 0, 0, '0 1 2'),
    ]
    # Means; sds 1, 1/sqrt(3), sqrt(2), 1/sqrt(3); half-widths t * sd / sqrt(n).
    expected = [
        (82.0, 1.0, 2.484138),
        (80 + 1 / 3, math.sqrt(1 / 3), 1.434218),
        (71.0, math.sqrt(2), 12.706205),
        (69 + 2 / 3, math.sqrt(1 / 3), 1.434218),
    ]
    for c, (mean, sd, half) in zip(cells, expected, strict=True):  # In %; the csv: fractions.
        for field, offset in (('test_accuracy', 0.0), ('train_accuracy', 10.0)):
            assert c[f'{field}_mean'] == pytest.approx((mean + offset) / 100, abs=1e-5)
            assert c[f'{field}_sd'] == pytest.approx(sd / 100, abs=1e-5)
            assert c[f'{field}_ci95_low'] == pytest.approx((mean + offset - half) / 100, abs=1e-5)
            assert c[f'{field}_ci95_high'] == pytest.approx((mean + offset + half) / 100, abs=1e-5)

    paired = load.read_results_csv(paths['paired_csv'])
    overall = next(p for p in paired if p['axis'] == 'shuffle' and p['scope'] == 'all')
    assert (overall['pairs'], overall['unpaired'], overall['excludes_zero']) == (5, 1, True)
    assert overall['mean_difference'] == pytest.approx(0.016)
    assert (overall['ci95_low'], overall['ci95_high']) == pytest.approx(
        (0.00489, 0.02711), abs=1e-5
    )
    assert overall['batch_size'] is None

    markdown = read_markdown(paths['results_md'])
    assert '## Over seeds' in markdown
    assert '| 500 | 0.01 | True | 2 | 0 1 | 71.00 ± 1.41 | [58.29, 83.71] |' in markdown
    assert '### Paired comparison: shuffle=True − shuffle=False' in markdown
    assert (
        '| 100 | 0.01 | 3 | +1.67 ± 1.15 | [-1.20, +4.54] | no: the interval includes 0 | 0 |'
        in (markdown)
    )
    assert (
        '| 500 | 0.01 | 2 | +1.50 ± 0.71 | [-4.85, +7.85] | no: the interval includes 0 | 1 |'
        in (markdown)
    )
    assert (
        'Overall, over 5 pair(s) from 2 cell(s): mean Δ +1.60 ± 0.89 points, 95% interval '
        '[+0.49, +2.71]; the interval excludes 0: shuffle=True vs shuffle=False is '
        'distinguishable from seed noise.'
    ) in markdown
    assert '### Paired comparison: batch_size=100 − batch_size=500' in markdown

    # The study comparison: one row per cell, its mean against the study's value.
    comparison = load.read_results_csv(paths['comparison_csv'])
    assert len(comparison) == 4
    first, _, third, _ = comparison
    assert (first['test_accuracy'], first['n'], first['test_sd']) == (0.82, 3, 0.01)
    assert first['test_difference'] == pytest.approx(0.82 - 0.8830)  # The study: 88.30%.
    assert first['name'] == 'batch_size=100,learning_rate=0.01,shuffle=True'
    assert (third['test_accuracy'], third['n']) == (0.71, 2)
    assert '1 failed/diverged left out' in third['note']
    assert '| 82.00 ± 1.00 | 88.30 | -6.30 |' in markdown


def test_seed_tables_removed_without_a_seed_axis(tmp_path):
    root = str(tmp_path / 'sweep')
    (run,) = make_sweep(root, {'learning_rate': [0.01]})
    write_run(root, run)
    for stale in ('cells.csv', 'paired.csv'):
        open(os.path.join(root, stale), 'w').close()
    paths = sweep_report.write_sweep_report(root)
    assert 'cells_csv' not in paths and 'paired_csv' not in paths
    assert not os.path.exists(os.path.join(root, 'cells.csv'))
    assert not os.path.exists(os.path.join(root, 'paired.csv'))
    assert '## Over seeds' not in read_markdown(paths['results_md'])


def test_repeats_from_config_to_report(tmp_path):
    """config.sweep.repeats -> manifest with seeds -> a report over the seeds."""
    config = default.get_config()
    config.sweep = ml_collections.ConfigDict()
    config.sweep.learning_rate = (0.1, 0.01)
    config.sweep.repeats = 2
    root = str(tmp_path / 'sweep')
    runs = sweep.expand(config)
    sweep.write_manifest(config, root, runs)
    manifest = json.loads(read_text(os.path.join(root, 'sweep.json')))
    for run, acc in zip(manifest['runs'], (0.5, 0.6, 0.7, 0.9), strict=True):
        write_run(root, run, final_test=acc)
    cells = load.read_results_csv(sweep_report.write_sweep_report(root)['cells_csv'])
    assert [(c['learning_rate'], c['n'], c['seeds']) for c in cells] == [
        (0.1, 2, '0 1'),
        (0.01, 2, '0 1'),
    ]
    assert [c['test_accuracy_mean'] for c in cells] == pytest.approx([0.55, 0.80])
    assert [c['test_accuracy_sd'] for c in cells] == pytest.approx(
        [math.sqrt(50) / 100, math.sqrt(200) / 100], abs=1e-5
    )
