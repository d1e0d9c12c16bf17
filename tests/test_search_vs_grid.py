"""benchmarks/search_vs_grid.py: arms of several studies against the grid (no training).

The studies are copies of the committed grid and search of results/search/; a
shorter study is a copy of the search holding only the trials that ended first
(a study stopped early). Expected numbers come from the committed trials.csv and
history.csv, read with pandas.
"""

import json
import math
import os
import shutil
import subprocess
import sys

import optuna
import pandas as pd
import pytest

from tests.conftest import REPO, load_benchmark

RESULTS = os.path.join(REPO, 'results', 'search')


svg = load_benchmark('search_vs_grid')


def _csv(study: str, name: str) -> pd.DataFrame:
    return pd.read_csv(os.path.join(RESULTS, study, name))


def copy_study(name: str, dst: str, keep: int | None = None) -> str:
    """A copy of results/search/<name>; with ``keep``, only its first ``keep`` trials
    to end, in a study database of their own, and their run folders."""
    shutil.copytree(os.path.join(RESULTS, name), dst)
    if keep is None:
        return dst
    db = os.path.join(dst, 'study.db')
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    whole = optuna.load_study(study_name='search', storage=f'sqlite:///{db}')
    ended = sorted(whole.get_trials(), key=lambda t: t.datetime_complete)
    os.remove(db)
    short = optuna.create_study(
        study_name='search', storage=f'sqlite:///{db}', direction='maximize'
    )
    short.add_trials(ended[:keep])
    for trial in ended[keep:]:
        shutil.rmtree(os.path.join(dst, trial.user_attrs['run']))
    return dst


def expected(name: str, target: float, keep: int | None = None) -> dict:
    """A study's numbers from its committed trials.csv and history.csv."""
    history = _csv(name, 'history.csv')
    history = history if keep is None else history.head(keep)
    trials = _csv(name, 'trials.csv').set_index('trial')
    reached = history.loc[history['best_so_far'] >= target, 'images_so_far']
    done = trials.loc[history.loc[history['state'] == 'complete', 'trial']]
    pick = done['value'].idxmax()
    return {
        'images_to_reach': int(reached.iloc[0]) if len(reached) else None,
        'images_trained': int(trials.loc[history['trial'], 'images'].sum()),
        'pick_val_accuracy': done.loc[pick, 'value'],
        'pick_test_accuracy': done.loc[pick, 'test_accuracy'],
    }


def grid_target() -> tuple[float, float]:
    """The grid's best validation accuracy and its binomial standard error."""
    best = _csv('grid', 'trials.csv')['value'].max()
    with open(os.path.join(RESULTS, 'grid', 'search.json')) as f:
        size = json.load(f)['base_config']['data']['validation_size']
    return best, math.sqrt(best * (1 - best) / size)


def median_range(values: list, missing_is_worst: bool = False) -> tuple:
    """Median, min, max by pandas; a missing count is worse than any (None when hit)."""
    series = pd.Series([math.inf if v is None else v for v in values], dtype=float)
    if not missing_is_worst:
        series = series[series != math.inf]
    triple = (series.median(), series.min(), series.max())
    return tuple(None if v == math.inf else v for v in triple)


def check_arm(arm: str, row: pd.Series, found: list[dict], grid_images: int) -> None:
    """An arm's row of seeds.csv against its studies' expected numbers."""
    assert row['studies'] == len(found)
    assert row['reached'] == sum(f['images_to_reach'] is not None for f in found)
    for column in svg.SUMMARISED:
        base = column.removesuffix('_of_grid')
        values = [f[base] for f in found]
        if column.endswith('_of_grid'):
            values = [None if v is None else v / grid_images for v in values]
        want = median_range(values, missing_is_worst=base == 'images_to_reach')
        got = [row[f'{column}_{k}'] for k in ('median', 'min', 'max')]
        for g, w in zip(got, want, strict=True):
            if w is None:
                assert pd.isna(g), (arm, column)
            elif base in ('images_to_reach', 'images_trained') and column == base:
                assert g == round(w), (arm, column)
            else:
                assert g == pytest.approx(w, rel=1e-6), (arm, column)


@pytest.fixture(scope='module')
def studies(tmp_path_factory):
    root = tmp_path_factory.mktemp('studies')
    paths = {
        'grid': copy_study('grid', str(root / 'grid')),
        'grid_as_arm': copy_study('grid', str(root / 'grid_as_arm')),
        's0': copy_study('search', str(root / 's0')),
        's1': copy_study('search', str(root / 's1')),
        'first10': copy_study('search', str(root / 'first10'), keep=10),
        'first12': copy_study('search', str(root / 'first12'), keep=12),
        'first4': copy_study('search', str(root / 'first4'), keep=4),
    }
    return root, paths


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = svg.main(argv)
    except SystemExit as e:  # The flags' own errors.
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_arms_match_the_committed_tables(studies, capsys):
    root, p = studies
    best, error = grid_target()
    target = best - error
    arms = {
        'full': [
            ('search', None, p['s0']),
            ('search', None, p['s1']),
            ('grid', None, p['grid_as_arm']),
        ],
        'short': [
            ('search', 10, p['first10']),
            ('search', 12, p['first12']),
            ('search', None, p['s0']),
        ],
        'pair': [('search', None, p['s0']), ('grid', None, p['grid_as_arm'])],
        'never': [('search', 10, p['first10']), ('search', 4, p['first4'])],
    }
    argv = ['--grid', p['grid'], '--out', str(root / 'out')]
    for name, members in arms.items():
        argv += ['--arm', name, *(path for _, _, path in members)]
    code, out, err = run_main(argv, capsys)
    assert (code, err) == (0, '')
    seeds = pd.read_csv(root / 'out' / 'seeds.csv').set_index('arm')
    per_study = pd.read_csv(root / 'out' / 'studies.csv')
    with open(root / 'out' / 'seeds.md') as f:
        assert f.read() == out
    grid = expected('grid', target)
    grid_images = grid['images_trained']
    assert grid_images == 324_000
    assert list(seeds.index) == ['grid', *arms]
    assert list(per_study['arm']) == ['grid'] + [n for n, m in arms.items() for _ in m]
    for arm, members in [('grid', [('grid', None, p['grid'])]), *arms.items()]:
        found = [expected(name, target, keep) for name, keep, _ in members]
        check_arm(arm, seeds.loc[arm], found, grid_images)
    assert pd.isna(seeds.loc['short', 'images_to_reach_max'])
    assert seeds.loc['pair', 'images_to_reach_median'] == (87_000 + 108_000) // 2
    assert pd.isna(seeds.loc['never', 'images_to_reach_median'])
    assert seeds.loc['never', 'reached'] == 0
    # Per study: images as integers, accuracies as fractions.
    first10 = per_study[per_study['study'] == p['first10']].iloc[0]
    assert not first10['reached'] and pd.isna(first10['images_to_reach'])
    assert first10['images_trained'] == expected('search', target, 10)['images_trained']
    assert per_study['pick_test_accuracy'].between(0, 1).all()


def test_the_markdown_states_the_noise_and_the_target(studies, capsys):
    _, p = studies
    best, error = grid_target()
    code, out, _ = run_main(['--grid', p['grid'], '--arm', 'TPE + SH', p['s0'], p['s1']], capsys)
    assert code == 0
    assert f'on 1,000 validation images, sqrt(p (1 - p) / n) = {100 * error:.2f} points' in out
    assert f'validation accuracy {100 * (best - error):.2f}% or better' in out
    assert f'best validation accuracy {100 * best:.2f}%' in out
    assert "at most a third of the grid's compute (108,000 images)" in out
    assert '| TPE + SH |' in out.replace('  ', ' ').replace('  ', ' ')
    assert '87,000' in out and '44.60%' in out and '46.02%' in out
    assert "- TPE + SH: median images to reach / the grid's images = 0.27 (27%): met" in out
    code, out, _ = run_main(
        ['--grid', p['grid'], '--arm', 'short', p['first10'], p['first4'], '--within', '0.005'],
        capsys,
    )
    assert code == 0
    assert '0.50 points (--within 0.005)' in out
    assert f'validation accuracy {100 * (best - 0.005):.2f}% or better' in out
    assert "- short: the median study did not reach the grid's best: not met" in out
    row = next(line for line in out.splitlines() if line.startswith('| short'))
    assert row.count('not reached') == 2 and '0/2' in row


def _edit_description(path: str, edit) -> None:
    name = os.path.join(path, 'search.json')
    with open(name) as f:
        described = json.load(f)
    edit(described)
    with open(name, 'w') as f:
        json.dump(described, f)


def test_bad_input_is_one_error_line(studies, tmp_path, capsys):
    _, p = studies
    other_metric = copy_study('search', str(tmp_path / 'metric'))
    _edit_description(other_metric, lambda d: d.update(metric='val_loss'))
    other_split = copy_study('search', str(tmp_path / 'split'))
    _edit_description(other_split, lambda d: d['base_config']['data'].update(validation_size=500))
    no_db = copy_study('search', str(tmp_path / 'no_db'))
    os.remove(os.path.join(no_db, 'study.db'))
    run_folder = os.path.join(p['s0'], _csv('search', 'trials.csv')['run'][0])
    cases = [
        (['--arm', 'a', p['s0']], '--grid'),
        (['--grid', p['grid']], '--arm'),
        (['--grid', p['grid'], '--arm', 'TPE'], "'TPE' names no study workdir"),
        (['--grid', p['grid'], '--arm', 'a', p['s0'], '--arm', 'a', p['s1']], "'a'"),
        (['--grid', p['grid'], '--arm', 'a', p['s0'], '--within', '5'], 'a fraction'),
        (['--grid', str(tmp_path / 'none'), '--arm', 'a', p['s0']], 'not a study workdir'),
        (['--grid', p['grid'], '--arm', 'a', run_folder], 'not a study workdir'),
        (['--grid', p['grid'], '--arm', 'a', no_db], 'no study.db'),
        (['--grid', p['grid'], '--arm', 'a', p['s0'], other_metric], "the metric: 'val_loss'"),
        (['--grid', p['grid'], '--arm', 'a', other_split], 'the validation size: 500, not 1000'),
    ]
    for argv, message in cases:
        code, out, err = run_main(argv, capsys)
        assert code == 2, argv
        assert out == ''
        assert err.startswith('error: ') and err.count('\n') == 1 and message in err, err
    assert not os.path.exists(os.path.join(no_db, 'study.db'))


def test_the_script_runs_as_a_command(studies, tmp_path):
    _, p = studies
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, 'benchmarks', 'search_vs_grid.py'),
            '--grid',
            p['grid'],
            '--arm',
            'a',
            str(tmp_path / 'missing'),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, 'PYTHONPATH': REPO},
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f'error: {tmp_path / "missing"} is not a study workdir (no search.json)'
    ]
