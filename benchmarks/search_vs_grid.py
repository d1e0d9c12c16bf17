"""Compares arms of searches with the grid they should match: compute to reach the grid's best.

    python benchmarks/search_vs_grid.py --grid runs/cpu_grid \\
        --arm 'TPE + SH' runs/tpe_sh_s0 runs/tpe_sh_s1 --arm 'random + SH' runs/rand_sh_s* \\
        [--within 0.005] [--out results/search_seeds]

Every workdir is a study (resnet_jax.studies.search) selecting on the grid's
metric and validation split; the studies of an arm differ only in their seed
(``config.search.seed``). For each study: the images it had trained when its
best validation accuracy so far first came within noise of the grid's best
(none if never), the images it trained in all, and its pick (the best trial on
the study's metric) with the pick's validation and test accuracy. For each arm:
the median and range (min-max) of these over its studies, how many reached the
grid's best, and the images as fractions of the grid's. The grid is a row of
its own, its trials in the order it ran them.

Within noise is one binomial standard error of the grid's best validation
accuracy p on the n validation images, sqrt(p (1 - p) / n), unless ``--within``
gives it as a fraction (0.005 is half a point). A study that never reached
counts as needing more than any that did: an arm's median is "not reached"
when at most half of its studies reached.

Prints the per-arm table as Markdown, with the target: the median search of an
arm reaches the grid's best with at most a third of the grid's compute. With
``--out DIR`` it also writes DIR/seeds.md, DIR/seeds.csv (one row per arm) and
DIR/studies.csv (one row per study), accuracies as fractions and images as
integers. Bad input is one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import fractions
import math
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd

from resnet_jax.reports import study_report
from resnet_jax.rundir import workdir as workdir_lib
from resnet_jax.studies import optuna_study, search_space

TARGET_FRACTION = fractions.Fraction(
    1, 3
)  # Of the grid's images, for the median search to reach its best.
SEEDS_MD = 'seeds.md'
SEEDS_CSV = 'seeds.csv'
STUDIES_CSV = 'studies.csv'
GRID = 'grid'
# The per-study numbers an arm summarises by their median, min and max.
SUMMARISED = (
    'images_to_reach',
    'images_to_reach_of_grid',
    'images_trained',
    'images_trained_of_grid',
    'pick_val_accuracy',
    'pick_test_accuracy',
)


class InputError(Exception):
    """Bad input: one error line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # One line, exit code 2.
        sys.stderr.write(f'error: {message}\n')
        raise SystemExit(2)


@dataclasses.dataclass(frozen=True)
class Study:
    """A study workdir as read: its description, trials and history."""

    path: str
    described: dict[str, Any]
    trials: pd.DataFrame
    history: pd.DataFrame


def validation_size(described: dict[str, Any]) -> int:
    """``config.data.validation_size`` of the study's recorded base config (0 if none)."""
    data = described['base_config'].get('data')
    size = data.get('validation_size') if isinstance(data, dict) else None
    return size if isinstance(size, int) and not isinstance(size, bool) else 0


def read_study(path: str) -> Study:
    """The study in ``path``; :class:`InputError` if it is not a readable study workdir."""
    if not os.path.isfile(os.path.join(path, optuna_study.DESCRIPTION_FILE)):
        raise InputError(f'{path} is not a study workdir (no {optuna_study.DESCRIPTION_FILE})')
    try:
        described = study_report.read_description(path)
        if not described['storage'] and not os.path.isfile(
            os.path.join(path, optuna_study.STUDY_DB)
        ):
            raise InputError(f'{path} is not a study workdir (no {optuna_study.STUDY_DB})')
        trials = study_report.trials_frame(study_report.load_study(path, described), path)
    except (workdir_lib.RecordError, search_space.SearchError) as e:
        raise InputError(str(e)) from None
    if trials.empty:
        history = pd.DataFrame({'images_so_far': [], 'best_so_far': []})
    else:
        history = study_report.history_frame(trials, described['direction'])
    return Study(path, described, trials, history)


def check_alike(grid: Study, studies: Sequence[Study]) -> None:
    """:class:`InputError` unless every study selects as the grid does."""
    aspects = (
        ('the metric', lambda d: d['metric']),
        ('the direction', lambda d: d['direction']),
        ('the validation size', validation_size),
    )
    for study in studies:
        for name, get in aspects:
            if get(study.described) != get(grid.described):
                raise InputError(
                    f'{study.path} differs from the grid {grid.path} in {name}: '
                    f'{get(study.described)!r}, not {get(grid.described)!r}'
                )


def pick_of(study: Study) -> pd.Series | None:
    """The study's best completed trial on its metric; None if none completed."""
    trials = study.trials
    done = trials[trials['state'] == 'complete'] if len(trials) else trials
    if done.empty:
        return None
    values = done['value'].astype(float)
    best = values.idxmax() if study.described['direction'] == 'maximize' else values.idxmin()
    return done.loc[best]


def noise(best: float, described: dict[str, Any], within: float | None) -> tuple[float, str]:
    """How close to the grid's best counts as reaching it, and how that was chosen."""
    if within is not None:
        return within, f'{100 * within:.2f} points (--within {within:g})'
    size = validation_size(described)
    metric = described['metric']
    if metric != 'val_accuracy' or size <= 0:
        raise InputError(
            f'the grid selects on {metric} (validation size {size}): the default noise is '
            "a validation accuracy's standard error; give --within"
        )
    error = math.sqrt(best * (1 - best) / size)
    text = (
        f'one binomial standard error of it on {size:,} validation images, '
        f'sqrt(p (1 - p) / n) = {100 * error:.2f} points'
    )
    return error, text


def _of(count: int | None, whole: int) -> float | None:
    return None if count is None else count / whole


def study_row(arm: str, study: Study, target: float, grid_images: int) -> dict[str, Any]:
    """One study's numbers (accuracies as fractions, images as integers)."""
    described, trials = study.described, study.trials
    direction = described['direction']
    reach = study_report.images_to_reach(study.history, target, direction)
    trained = study_report.images_trained(trials)
    pick = pick_of(study)
    states = trials['state'].value_counts() if len(trials) else pd.Series(dtype=int)
    row = {
        'arm': arm,
        'study': study.path,
        'seed': described.get('seed'),
        'sampler': described.get('sampler', GRID),
        'pruner': described.get('pruner', 'none'),
        'trials': len(trials),
        'complete': int(states.get('complete', 0)),
        'pruned': int(states.get('pruned', 0)),
        'reached': reach is not None,
        'images_to_reach': reach,
        'images_to_reach_of_grid': _of(reach, grid_images),
        'images_trained': trained,
        'images_trained_of_grid': _of(trained, grid_images),
        'pick_trial': None,
        'pick': None,
        'pick_val_accuracy': None,
        'pick_test_accuracy': None,
    }
    if pick is not None:
        val = pick['value'] if described['metric'] == 'val_accuracy' else pick['val_accuracy']
        row['pick_trial'] = int(pick['trial'])
        row['pick'] = ', '.join(
            f'{k[len("param.") :]}={_short(pick[k])}'
            for k in trials
            if k.startswith('param.') and pd.notna(pick[k])
        )
        row['pick_val_accuracy'] = _fraction(val)
        row['pick_test_accuracy'] = _fraction(pick['test_accuracy'])
    return row


def _short(value: Any) -> str:
    return f'{value:.4g}' if isinstance(value, float) else str(value)


def _fraction(value: Any) -> float | None:
    return None if value is None or pd.isna(value) else float(value)


def spread(values: Sequence[float | None], missing_is_worst: bool) -> tuple[Any, Any, Any]:
    """Median, min and max; a missing value is worse than any (``missing_is_worst``,
    so None when the median or max is one) or left out (None if all are)."""
    if missing_is_worst:
        ordered = sorted(math.inf if v is None else v for v in values)
    else:
        ordered = sorted(v for v in values if v is not None)
    if not ordered:
        return None, None, None
    triple = (statistics.median(ordered), ordered[0], ordered[-1])
    return tuple(None if v == math.inf else v for v in triple)


def arm_row(arm: str, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """An arm's numbers: its studies, how many reached, median/min/max of each number."""
    summary: dict[str, Any] = {
        'arm': arm,
        'studies': len(rows),
        'reached': sum(r['reached'] for r in rows),
    }
    for name in SUMMARISED:
        worst = name.startswith('images_to_reach')
        median, low, high = spread([r[name] for r in rows], missing_is_worst=worst)
        if median is not None and name in ('images_to_reach', 'images_trained'):
            median = round(median)  # The mean of the middle two: whole images.
        summary.update({f'{name}_median': median, f'{name}_min': low, f'{name}_max': high})
    return summary


def _frame(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Rows as a frame with image counts as (nullable) integers."""
    frame = pd.DataFrame(list(rows))
    for column in frame:
        if column.startswith('images_') and '_of_grid' not in column:
            frame[column] = frame[column].astype('Int64')
    return frame


def _images(count: Any) -> str:
    return 'not reached' if count is None or pd.isna(count) else f'{int(count):,}'


def _cell(row: dict[str, Any], name: str, show: Callable[[Any], str]) -> str:
    """``median (min–max)``, or the median alone when the range is one value."""
    median, low, high = (row[f'{name}_{k}'] for k in ('median', 'min', 'max'))
    if low == high or row['studies'] == 1:
        return show(median)
    return f'{show(median)} ({show(low)}–{show(high)})'


def _percent(digits: int, missing: str) -> Callable[[Any], str]:
    def show(value: Any) -> str:
        return missing if value is None else f'{100 * value:.{digits}f}%'

    return show


def arms_markdown(arms: Sequence[dict[str, Any]]) -> str:
    """The per-arm table, accuracies and fractions of the grid's images as percentages."""
    table = pd.DataFrame(
        {
            'arm': a['arm'],
            'studies': a['studies'],
            'reached': f'{a["reached"]}/{a["studies"]}',
            "images to reach the grid's best": _cell(a, 'images_to_reach', _images),
            "of the grid's images": _cell(a, 'images_to_reach_of_grid', _percent(0, 'not reached')),
            'images trained': _cell(a, 'images_trained', _images),
            "trained, of the grid's": _cell(a, 'images_trained_of_grid', _percent(0, '–')),
            "pick's val. acc.": _cell(a, 'pick_val_accuracy', _percent(2, '–')),
            "pick's test acc.": _cell(a, 'pick_test_accuracy', _percent(2, '–')),
        }
        for a in arms
    )
    return table.to_markdown(index=False, disable_numparse=True)


def _verdicts(arms: Sequence[dict[str, Any]]) -> list[str]:
    lines = []
    for arm in arms:
        if arm['arm'] == GRID:
            continue
        ratio = arm['images_to_reach_of_grid_median']
        if ratio is None:
            lines.append(f"- {arm['arm']}: the median study did not reach the grid's best: not met")
            continue
        met = 'met' if ratio <= TARGET_FRACTION else 'not met'
        lines.append(
            f"- {arm['arm']}: median images to reach / the grid's images = {ratio:.2f} "
            f'({100 * ratio:.0f}%): {met}'
        )
    return lines


def _metric_value(metric: str, value: float) -> str:
    if metric == 'val_accuracy':
        return f'validation accuracy {100 * value:.2f}%'
    return f'{metric} {value:.4g}'


def report_markdown(
    grid: dict[str, Any], metric: str, noise_text: str, target: float, arms: Sequence[dict]
) -> str:
    """The comparison as Markdown: the grid, the noise, the target, the arms, the verdicts."""
    images = grid['images_trained']
    best = _metric_value(metric, grid['pick_value'])
    lines = [
        '# Searches against the grid',
        '',
        f'The grid `{grid["study"]}`: {grid["trials"]} trials, {images:,} images trained; '
        f'best {best} (trial {grid["pick_trial"]}: {grid["pick"]}).',
        '',
        f"Within noise of the grid's best: {noise_text}; a study reaches the grid's best "
        f'once its best trial so far has {_metric_value(metric, target)} or better.',
        '',
        "Target: the median search of an arm reaches the grid's best with at most a third "
        f"of the grid's compute ({math.floor(TARGET_FRACTION * images):,} images).",
        '',
        arms_markdown(arms),
        '',
        *_verdicts(arms),
    ]
    return '\n'.join(lines).rstrip('\n') + '\n'


def compare(
    grid_path: str, arms: Sequence[tuple[str, Sequence[str]]], within: float | None
) -> tuple[str, pd.DataFrame, pd.DataFrame]:
    """The Markdown, the per-arm frame and the per-study frame of the comparison."""
    grid = read_study(grid_path)
    read = [(name, [read_study(path) for path in paths]) for name, paths in arms]
    check_alike(grid, [study for _, studies in read for study in studies])
    pick = pick_of(grid)
    grid_images = study_report.images_trained(grid.trials)
    if pick is None or grid_images == 0:
        raise InputError(f'the grid {grid_path} has no completed trial')
    best = float(pick['value'])
    margin, noise_text = noise(best, grid.described, within)
    target = best - margin if grid.described['direction'] == 'maximize' else best + margin
    grid_row = study_row(GRID, grid, target, grid_images)
    rows = {GRID: [grid_row]}
    for name, studies in read:
        rows[name] = [study_row(name, study, target, grid_images) for study in studies]
    summaries = [arm_row(name, arm_rows) for name, arm_rows in rows.items()]
    text = report_markdown(
        {**grid_row, 'pick_value': best}, grid.described['metric'], noise_text, target, summaries
    )
    studies_frame = _frame([row for arm_rows in rows.values() for row in arm_rows])
    return text, _frame(summaries), studies_frame


def write_outputs(out: str, text: str, arms: pd.DataFrame, studies: pd.DataFrame) -> None:
    """DIR/seeds.md, DIR/seeds.csv and DIR/studies.csv."""
    try:
        os.makedirs(out, exist_ok=True)
        workdir_lib.write_atomic(os.path.join(out, SEEDS_MD), text)
        workdir_lib.write_atomic(os.path.join(out, SEEDS_CSV), arms.to_csv(index=False))
        workdir_lib.write_atomic(os.path.join(out, STUDIES_CSV), studies.to_csv(index=False))
    except OSError as e:
        raise InputError(f'cannot write into {out}: {e.strerror or e}') from None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The flags, checked: every arm names its studies, once; --within is a fraction."""
    parser = _Parser(description=__doc__.splitlines()[0])
    parser.add_argument('--grid', required=True, metavar='DIR', help='the grid study workdir')
    parser.add_argument(
        '--arm',
        action='append',
        nargs='+',
        required=True,
        metavar=('NAME', 'DIR'),
        help='an arm: its name, then its study workdirs (one per seed); repeated',
    )
    parser.add_argument('--within', type=float, help='a fraction: 0.005 is half a point')
    parser.add_argument('--out', metavar='DIR', help='writes seeds.md, seeds.csv, studies.csv')
    args = parser.parse_args(argv)
    names = [arm[0] for arm in args.arm]
    for arm in args.arm:
        if len(arm) < 2:
            parser.error(f'--arm {arm[0]!r} names no study workdir: --arm NAME DIR [DIR ...]')
        if arm[0] == GRID or names.count(arm[0]) > 1:
            parser.error(f'--arm {arm[0]!r}: each arm needs a name of its own, not {GRID!r}')
    if args.within is not None and not 0 <= args.within < 1:
        parser.error(f'--within {args.within:g}: give a fraction (0.005 is half a point)')
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        arms = [(arm[0], arm[1:]) for arm in args.arm]
        text, arm_frame, study_frame = compare(args.grid, arms, args.within)
        if args.out:
            write_outputs(args.out, text, arm_frame, study_frame)
    except InputError as e:
        sys.stderr.write(f'error: {e}\n')
        return 2
    sys.stdout.write(text)
    return 0


if __name__ == '__main__':
    sys.exit(main())
