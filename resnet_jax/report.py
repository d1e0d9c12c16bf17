"""Sweep reports: results tables, the comparison with the study, training curves.

    from resnet_jax import report
    results = report.collect('runs/paper')     # one RunResult per manifest run
    paths = report.write_report('runs/paper')  # {kind: path} of the files written

or ``python -m resnet_jax.main --workdir runs/paper --mode=report`` (no training; a
sweep may be partly done). All is read from disk: the manifest ``sweep.json``
(``axes``, ``runs`` with ``name`` and ``overrides``, ``base_config``) and in each run
folder ``<sweep_dir>/<name>/`` ``metrics.jsonl`` (a record per epoch), ``summary.json``
(written when the run ends) and ``config.json``; a run without records is 'pending',
one with records but no summary 'incomplete'. ``write_report`` writes into the sweep
dir, each file atomically (``os.replace`` of a unique temporary file: concurrent
writers never leave a torn file):

* ``results.csv`` / ``results.md``: a row per run in manifest order in the study's
  layout (``epochs``, the axes, final train and test accuracy in %), then best test
  accuracy and its epoch, wall time, images/s and status; the best run is starred.
  ``read_results_csv`` parses any csv of the report back.
* ``comparison.csv`` (and a section of ``results.md``): ours vs the study's final
  accuracies where (batch_size, learning_rate, shuffle) is a row of its table.
* ``curves.png`` (the study's Figure 3: test and train accuracy and loss per epoch, a
  line per run) and ``heatmap.png`` (final test accuracy over batch size x learning
  rate, a panel per shuffle setting); without matplotlib, skipped as ``results.md`` says.
* With a ``seed`` axis (``config.sweep.seed`` or ``.repeats``), the runs differing only
  in their seed form a cell: ``cells.csv`` (and a section) gives per cell n, mean ±
  sample sd and the 95% Student t interval of final test and train accuracy over the
  completed runs (failed and diverged ones counted and left out); ``paired.csv`` (and
  a section) the differences between the two values of each two-valued axis, paired on
  seed and the other axes, per cell and pooled, and whether their interval excludes 0.
  The comparison then uses cell means, the heatmap mean ± sd and the curves a mean
  line per cell in a min–max band.

The study's table (``PAPER_SOURCE``: final train and test accuracy in % of 18 runs,
batch size x learning rate x shuffle) ships as ``resnet_jax/data/paper_results.csv``.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import functools
import importlib.resources
import io
import json
import math
import os
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from resnet_jax import writers
from resnet_jax.validation import get_field, set_field
from resnet_jax.workdir import (
    CONFIG_FILE,
    MANIFEST_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    RecordError,
    read_json_object,
    read_run_config,
    read_summary,
    write_atomic,
)
from resnet_jax.workdir import read_manifest as read_checked_manifest

RESULTS_CSV = 'results.csv'
RESULTS_MD = 'results.md'
COMPARISON_CSV = 'comparison.csv'
CURVES_PNG = 'curves.png'
HEATMAP_PNG = 'heatmap.png'
CELLS_CSV = 'cells.csv'
PAIRED_CSV = 'paired.csv'
SEED_AXIS = 'seed'  # Runs differing only in it form a cell of the statistics over seeds.

# 'unreadable': a run whose records, summary or config are malformed (its error says which).
STATUSES = ('completed', 'incomplete', 'failed', 'diverged', 'pending', 'unreadable')
PROBLEM_STATUSES = ('failed', 'diverged', 'unreadable')  # Runs left out, with their error.
STUDY_AXES = ('batch_size', 'learning_rate', 'shuffle')
PAPER_CSV = 'paper_results.csv'
PAPER_SOURCE = (
    'Rane, Jathar, Yadav, "ResNet with Hyper Parameters Tuning", NYU; '
    'results table, 50 epochs, Adam, original CIFAR-10'
)
MISSING = '—'  # Markdown cell of a value that does not exist (yet).
LOSS_STYLES = (('train', '-'), ('test', '--'))  # Line styles of the loss panel.

# The numbers of results.csv (after 'epochs' and the axes): (RunResult field and csv
# column, results.md header, decimals).
RESULT_NUMBERS = (
    ('train_accuracy', 'train acc', 2),
    ('test_accuracy', 'test acc', 2),
    ('best_test_accuracy', 'best test acc', 2),
    ('best_epoch', 'best epoch', None),
    ('wall_seconds', 'wall s', 1),
    ('images_per_second', 'images/s', 1),
)
RESULT_COLUMNS = (*(field for field, _, _ in RESULT_NUMBERS), 'status', 'best', 'error')
COMPARISON_COLUMNS = (
    *(*STUDY_AXES, 'epochs', 'paper_epochs'),
    *('train_accuracy', 'paper_train_accuracy', 'train_difference'),
    *('test_accuracy', 'paper_test_accuracy', 'test_difference'),
    *('status', 'note', 'name'),
)
# comparison.csv of a sweep over seeds: one row per cell, ours the mean over its seeds.
CELL_COMPARISON_COLUMNS = (*COMPARISON_COLUMNS[:-3], 'n', 'test_sd', *COMPARISON_COLUMNS[-3:])
_STATS = ('mean', 'sd', 'ci95_low', 'ci95_high')  # An estimate's csv columns.
# cells.csv: the axes but the seed, then these.
CELL_COLUMNS = (
    *('n', 'excluded', 'unfinished', 'seeds'),
    *(f'{field}_{stat}' for field in ('test_accuracy', 'train_accuracy') for stat in _STATS),
)
# paired.csv: 'axis', 'first', 'second', 'scope' ('cell' or 'all'), the axes but the
# seed (the compared one left empty), then these; differences first - second.
PAIRED_COLUMNS = ('pairs', 'unpaired', 'mean_difference', *_STATS[1:], 'excludes_zero')


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What one run of a sweep has produced so far; accuracies in %.

    The numbers are the run's ``summary.json``'s or, while it has none (or an outdated
    one), what :func:`resnet_jax.writers.summarize` makes of its records.
    """

    name: str  # The run's folder in the sweep dir.
    overrides: dict[str, Any]  # Its values of the sweep axes (dotted config names).
    status: str  # One of STATUSES.
    # The metrics.jsonl records, one per epoch in epoch order (accuracies as fractions).
    epochs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    # The full config: its summary's or config.json, else the manifest's with overrides.
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    num_epochs: int | None = None  # As configured.
    epochs_completed: int = 0
    train_accuracy: float | None = None
    test_accuracy: float | None = None
    best_test_accuracy: float | None = None
    best_epoch: int | None = None
    wall_seconds: float | None = None
    # The median over epochs, without epoch 1 (compilation) when there are others.
    images_per_second: float | None = None
    error: str | None = None  # Why a failed or diverged run stopped.
    # {'source', 'path', ...} of the dataset copy: the summary's, else as configured.
    data: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def has_results(self) -> bool:
        """Whether the run has a final test accuracy to show."""
        return self.test_accuracy is not None


# Reading runs. --------------------------------------------------------------


def read_manifest(sweep_dir: str) -> dict[str, Any]:
    """The sweep's ``sweep.json`` with ``axes``, ``runs`` and ``base_config``."""
    path = os.path.join(sweep_dir, MANIFEST_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{sweep_dir} holds no sweep ({MANIFEST_FILE} not found)')
    return read_checked_manifest(path)


def collect(sweep_dir: str) -> list[RunResult]:
    """One ``RunResult`` per manifest run, in manifest order, read from disk only."""
    manifest = read_manifest(sweep_dir)
    base = manifest['base_config']
    return [
        load_run(os.path.join(sweep_dir, r['name']), r['name'], r.get('overrides', {}), base)
        for r in manifest['runs']
    ]


def load_run(
    run_dir: str,
    name: str,
    overrides: Mapping[str, Any],
    base_config: Mapping[str, Any] | None = None,
) -> RunResult:
    """Reads one run folder (which may not exist yet) into a ``RunResult``; a run
    whose files are malformed is 'unreadable', its error naming the file."""
    try:
        records = writers.read_metrics(run_dir)
        summary = read_summary(os.path.join(run_dir, SUMMARY_FILE))
        if os.path.exists(os.path.join(run_dir, CONFIG_FILE)):
            read_run_config(os.path.join(run_dir, CONFIG_FILE), whole=False)
    except RecordError as e:
        config = apply_overrides(base_config or {}, overrides)
        return RunResult(name, dict(overrides), 'unreadable', config=config, error=str(e))
    last_epoch = int(records[-1]['epoch']) if records else 0
    if summary is not None and int(summary.get('epochs_completed') or 0) < last_epoch:
        # A summary older than the records: the run was resumed and is running again
        # ('incomplete'), unless it has since failed or diverged (the sweep then updates the
        # old summary's status and error): those hold, the numbers come from the records.
        kept = {k: summary[k] for k in ('status', 'error', 'config') if k in summary}
        summary = kept if summary.get('status') in ('failed', 'diverged') else None
    s = summary or {}
    config = (
        s.get('config')
        or read_json_object(os.path.join(run_dir, CONFIG_FILE))
        or apply_overrides(base_config or {}, overrides)
    )
    num_epochs = config.get('num_epochs')
    if summary is None:
        status = 'incomplete' if records else 'pending'
    else:
        done = s.get('epochs_completed')
        finished = done is not None and done == num_epochs
        status = str(s.get('status') or ('completed' if finished else 'incomplete'))
    # Each number is the summary's, else what writers.summarize (which the training loop
    # writes the summary with) makes of the records.
    numbers = writers.summarize(records) if records else {}
    numbers.update((k, v) for k, v in s.items() if v is not None)
    best_epoch = numbers.get('best_epoch')
    percents = ('train_accuracy', 'test_accuracy', 'best_test_accuracy')
    timed = [r for r in records if r.get('epoch') != 1] if len(records) >= 2 else records
    speeds = [v for v in (_finite(r.get('images_per_second')) for r in timed) if v is not None]
    return RunResult(
        name=name,
        overrides=dict(overrides),
        status=status,
        epochs=records,
        config=dict(config),
        num_epochs=None if num_epochs is None else int(num_epochs),
        epochs_completed=int(numbers.get('epochs_completed', 0)),
        **{k: _finite(numbers.get(k), 100.0) for k in percents},
        best_epoch=None if best_epoch is None else int(best_epoch),
        wall_seconds=_finite(numbers.get('wall_seconds')),
        images_per_second=statistics.median(speeds) if speeds else None,
        error=s.get('error') or None,
        data=s.get('data') or dict(config.get('data') or {}),
    )


def apply_overrides(config: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of ``config`` with dotted ``overrides`` ('data.path': ...) set."""
    out = copy.deepcopy(dict(config))
    for key, value in overrides.items():
        set_field(out, key, value, create=True)
    return out


def _finite(x: Any, scale: float = 1.0) -> float | None:
    """``scale * x`` as a float, or None if ``x`` is missing or not finite."""
    if x is None or isinstance(x, bool):
        return None
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return scale * x if math.isfinite(x) else None


# CSV files. -----------------------------------------------------------------


def load_paper_results(path: str | None = None) -> list[dict[str, Any]]:
    """The study's table (default: the packaged one): rows of ``epochs, batch_size,
    learning_rate, shuffle, train_accuracy, test_accuracy`` (accuracies in %)."""
    if path is None:
        resource = importlib.resources.files('resnet_jax') / 'data' / PAPER_CSV
        return _parse_rows(resource.read_text())
    return read_results_csv(path)


def read_results_csv(path: str) -> list[dict[str, Any]]:
    """The rows of a csv of the report as dicts of :func:`parse_cell` values."""
    with open(path, newline='') as f:
        return _parse_rows(f.read())


def _parse_rows(text: str) -> list[dict[str, Any]]:
    return [{k: parse_cell(v) for k, v in row.items()} for row in csv.DictReader(io.StringIO(text))]


def parse_cell(text: str | None) -> Any:
    """The value of a csv cell: int, float, bool, None ('') or str."""
    if text is None or text == '':
        return None
    if text in ('True', 'False'):
        return text == 'True'
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def format_cell(value: Any, digits: int | None = None) -> str:
    """A csv cell: '' for None, 'True'/'False', ``digits`` decimals for floats."""
    if value is None:
        return ''
    if isinstance(value, bool | int | str):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return ''
        return f'{value:.{digits}f}' if digits is not None else repr(value)
    return json.dumps(value, sort_keys=True)


def _csv_text(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator='\n').writerows([header, *rows])
    return buf.getvalue()


# Statistics over seeds. -----------------------------------------------------


@functools.lru_cache(maxsize=256)
def t_quantile(df: int, probability: float = 0.975) -> float:
    """The ``probability`` quantile (>= 0.5) of Student's t with ``df`` degrees of
    freedom: 12.706 for df 1, 2.262 for df 9, tending to the normal 1.960."""
    if not isinstance(df, int) or df < 1 or not 0.5 <= probability < 1:
        raise ValueError(
            f't_quantile needs an integer df >= 1 and 0.5 <= p < 1, got {df}, {probability}'
        )
    from scipy import stats  # pylint: disable=g-import-not-at-top  # (A JAX dependency.)

    return float(stats.t.ppf(probability, df))


@dataclasses.dataclass(frozen=True)
class Estimate:
    """The mean of ``n`` values (None without any), their sample sd and the 95% interval
    mean ± t(0.975, n-1) sd / sqrt(n) (both None for fewer than 2 values)."""

    n: int
    mean: float | None = None
    sd: float | None = None
    low: float | None = None
    high: float | None = None

    @property
    def excludes_zero(self) -> bool | None:
        """Whether the interval lies wholly above or below 0 (None: no interval)."""
        if self.low is None or self.high is None:
            return None
        return self.low > 0 or self.high < 0


def estimate(values: Iterable[float]) -> Estimate:
    """Mean, sample sd (ddof=1) and 95% t interval of ``values``."""
    xs = [float(v) for v in values]
    if not xs:
        return Estimate(0)
    mean = statistics.fmean(xs)
    if len(xs) == 1:
        return Estimate(1, mean)
    sd = statistics.stdev(xs)
    half = t_quantile(len(xs) - 1) * sd / math.sqrt(len(xs))
    return Estimate(len(xs), mean, sd, mean - half, mean + half)


def _number(x: float | None, signed: bool = False) -> str:
    """A markdown cell: ``x`` with 2 decimals (and a sign), or '—'."""
    return MISSING if x is None else format(x, '+.2f' if signed else '.2f')


def format_estimate(e: Estimate, signed: bool = False) -> str:
    """'85.12 ± 0.34' (several values), '85.12' (one) or '—' (none)."""
    mean = _number(e.mean, signed)
    return mean if e.sd is None else f'{mean} ± {e.sd:.2f}'


def format_interval(e: Estimate, signed: bool = False) -> str:
    """'[84.50, 85.74]', or '—' without an interval."""
    if e.low is None or e.high is None:
        return MISSING
    return f'[{_number(e.low, signed)}, {_number(e.high, signed)}]'


def _estimate_cells(e: Estimate) -> list[str]:
    """The csv cells (3 decimals) of an estimate's mean, sd and interval (``_STATS``)."""
    return [format_cell(v, 3) for v in (e.mean, e.sd, e.low, e.high)]


@dataclasses.dataclass(frozen=True)
class Cell:
    """The runs of a sweep (in manifest order) that differ only in their seed;
    ``values`` are theirs of the other axes."""

    values: dict[str, Any]
    runs: tuple[RunResult, ...]

    @property
    def used(self) -> list[RunResult]:
        """The runs the statistics are over: the completed ones."""
        return [r for r in self.runs if r.status == 'completed' and r.has_results]

    @property
    def excluded(self) -> int:
        """How many runs failed, diverged or are unreadable (left out of the statistics)."""
        return sum(r.status in PROBLEM_STATUSES for r in self.runs)

    @property
    def unfinished(self) -> int:
        """How many runs are pending or incomplete (not in the statistics yet)."""
        return sum(r.status in ('pending', 'incomplete') for r in self.runs)

    def estimate(self, field: str = 'test_accuracy') -> Estimate:
        """``field`` of the completed runs ('test_accuracy', 'train_accuracy')."""
        return estimate(getattr(r, field) for r in self.used if getattr(r, field) is not None)

    def seeds(self, seed_axis: str = SEED_AXIS) -> str:
        """The seeds of the completed runs, separated by spaces."""
        return ' '.join(format_cell(r.overrides.get(seed_axis)) for r in self.used)


def _key(overrides: Mapping[str, Any], leave_out: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """A hashable key of ``overrides`` without the fields ``leave_out``."""
    dropped = set(leave_out)
    return tuple(
        (k, json.dumps(v, sort_keys=True)) for k, v in sorted(overrides.items()) if k not in dropped
    )


def group_cells(results: Sequence[RunResult], seed_axis: str = SEED_AXIS) -> list[Cell]:
    """The runs grouped by their values of every axis but ``seed_axis``, in manifest order."""
    groups: dict[tuple[tuple[str, str], ...], list[RunResult]] = {}
    for r in results:
        groups.setdefault(_key(r.overrides, [seed_axis]), []).append(r)
    return [
        Cell({k: v for k, v in runs[0].overrides.items() if k != seed_axis}, tuple(runs))
        for runs in groups.values()
    ]


@dataclasses.dataclass(frozen=True)
class Paired:
    """Paired differences (first minus second level, in points) of final test accuracy:
    one per seed of the cell ``values`` ({} for all cells) where both runs completed;
    ``unpaired`` counts the seeds where a run is missing, unfinished, failed or diverged."""

    axis: str
    levels: tuple[Any, Any]
    values: dict[str, Any]
    differences: tuple[float, ...]
    unpaired: int = 0

    @property
    def estimate(self) -> Estimate:
        """Mean difference with its 95% t interval over the pairs."""
        return estimate(self.differences)


def two_level_axes(axes: Mapping[str, Sequence[Any]], seed_axis: str = SEED_AXIS) -> list[str]:
    """The axes other than the seed with exactly two values (e.g. shuffle)."""
    return [a for a, values in axes.items() if a != seed_axis and len(values) == 2]


def paired_differences(
    results: Sequence[RunResult], axis: str, levels: Sequence[Any], seed_axis: str = SEED_AXIS
) -> list[Paired]:
    """Per cell of the other axes: ``levels[0]`` minus ``levels[1]`` of test accuracy, of
    the completed runs with the same seed and the same value of every other axis."""
    cells: dict[Any, tuple[dict[str, Any], dict[Any, dict[int, float]]]] = {}
    for r in results:
        if axis not in r.overrides:
            continue
        values = {k: v for k, v in r.overrides.items() if k not in (axis, seed_axis)}
        _, seeds = cells.setdefault(_key(r.overrides, [axis, seed_axis]), (values, {}))
        level = seeds.setdefault(_key(r.overrides, [axis]), {})
        if r.status == 'completed' and r.test_accuracy is not None:
            for i, value in enumerate(levels):
                if _same_value(r.overrides[axis], value):
                    level[i] = r.test_accuracy
    out = []
    for values, seeds in cells.values():
        differences = tuple(s[0] - s[1] for s in seeds.values() if 0 in s and 1 in s)
        unpaired = len(seeds) - len(differences)
        out.append(Paired(axis, (levels[0], levels[1]), values, differences, unpaired))
    return out


def pooled(axis: str, levels: Sequence[Any], cells: Sequence[Paired]) -> Paired:
    """The differences of all ``cells`` (of ``axis``) as one sample."""
    differences = tuple(d for c in cells for d in c.differences)
    return Paired(axis, (levels[0], levels[1]), {}, differences, sum(c.unpaired for c in cells))


def noise_verdict(e: Estimate) -> str:
    """Whether a 95% interval of a difference excludes 0, in words."""
    if e.excludes_zero is None:
        return f'no interval ({e.n} pair(s))'
    return 'yes: the interval excludes 0' if e.excludes_zero else 'no: the interval includes 0'


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, float | int) and isinstance(b, float | int) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    return a == b


def _matches(config: Mapping[str, Any], values: Mapping[str, Any]) -> bool:
    """Whether ``config`` has the (dotted) fields ``values`` (numbers to a tolerance)."""
    return all(_same_value(get_field(config, k, None), v) for k, v in values.items())


# Tables. --------------------------------------------------------------------


def axis_columns(axes: Iterable[str]) -> list[str]:
    """The axes as table columns: the study's three first (when axes), then the rest."""
    axes = list(axes)
    return [a for a in STUDY_AXES if a in axes] + [a for a in axes if a not in STUDY_AXES]


def best_run_index(results: Sequence[RunResult]) -> int | None:
    """The run with the highest final test accuracy (first on ties; completed runs before
    incomplete ones; never a failed or diverged one)."""
    scored = [
        (r.status == 'completed', r.test_accuracy, -i)
        for i, r in enumerate(results)
        if r.has_results and r.status in ('completed', 'incomplete')
    ]
    return -max(scored)[2] if scored else None


def result_rows(results: Sequence[RunResult], axes: Sequence[str]) -> list[dict[str, str]]:
    """The formatted rows of ``results.csv``."""
    best = best_run_index(results)
    return [
        {
            'epochs': format_cell(r.epochs_completed),
            **{a: format_cell(get_field(r.config, a, None)) for a in axes},
            **{field: format_cell(getattr(r, field), d) for field, _, d in RESULT_NUMBERS},
            'status': r.status,
            'best': '*' if i == best else '',
            'error': one_line(r.error or ''),
        }
        for i, r in enumerate(results)
    ]


def cell_rows(cells: Sequence[Cell], axes: Sequence[str]) -> list[list[str]]:
    """The rows of ``cells.csv``: statistics over each cell's seeds."""
    rows = []
    for cell in cells:
        row = [format_cell(cell.values.get(a)) for a in axes]
        row += [str(len(cell.used)), str(cell.excluded), str(cell.unfinished), cell.seeds()]
        for field in ('test_accuracy', 'train_accuracy'):
            row += _estimate_cells(cell.estimate(field))
        rows.append(row)
    return rows


def paired_rows(
    results: Sequence[RunResult], axes: Mapping[str, Sequence[Any]], columns: Sequence[str]
) -> list[list[str]]:
    """The rows of ``paired.csv``: per two-valued axis, its cells' paired differences,
    then all pooled ('scope=all')."""
    rows = []
    for axis in two_level_axes(axes):
        cells = paired_differences(results, axis, axes[axis])
        for p in [*cells, pooled(axis, axes[axis], cells)]:
            e = p.estimate
            row = [p.axis, *(format_cell(v) for v in p.levels), 'cell' if p.values else 'all']
            row += [format_cell(p.values.get(a)) for a in columns]
            row += [str(e.n), str(p.unpaired), *_estimate_cells(e), format_cell(e.excludes_zero)]
            rows.append(row)
    return rows


def _ours(unit: RunResult | Cell) -> dict[str, Any]:
    """Our side of a comparison row: a run's final accuracies, or a cell's means."""
    if isinstance(unit, RunResult):
        return {
            'epochs': unit.epochs_completed if unit.status != 'pending' else None,
            'train_accuracy': _round2(unit.train_accuracy),
            'test_accuracy': _round2(unit.test_accuracy),
            'status': unit.status,
            'note': [] if unit.status == 'completed' else [unit.status],
            'name': unit.name,
        }
    test, train = unit.estimate('test_accuracy'), unit.estimate('train_accuracy')
    notes = [f'mean of {test.n} seeds' if test.n > 1 else f'{test.n} completed run(s)']
    if unit.excluded:
        notes.append(f'{unit.excluded} failed/diverged left out')
    if unit.unfinished:
        notes.append(f'{unit.unfinished} unfinished')
    counts = status_counts(unit.runs)  # Without completed runs: their one status, or counts.
    status = ', '.join(f'{n} {s}' for s, n in counts.items()) if len(counts) > 1 else [*counts][0]
    return {
        'epochs': max((r.epochs_completed for r in unit.used), default=None),
        'train_accuracy': _round2(train.mean),
        'test_accuracy': _round2(test.mean),
        'n': test.n,
        'test_sd': _round2(test.sd),
        'status': 'completed' if test.n else status,
        'note': notes,
        'name': ','.join(f'{k}={format_cell(v)}' for k, v in unit.values.items()),
    }


def _round2(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def compare_with_paper(
    results: Sequence[RunResult], paper: Sequence[Mapping[str, Any]], seed_axis: str | None = None
) -> list[dict[str, Any]]:
    """Ours vs the study's accuracies for each run whose (batch_size, learning_rate,
    shuffle) is a study row (other epochs noted), differences ours minus theirs as shown
    (2 decimals). With ``seed_axis``, a row per cell: ours the mean (``n``, ``test_sd``)
    over its completed runs."""
    units = results if seed_axis is None else group_cells(results, seed_axis)
    rows = []
    for unit in units:
        config = unit.config if isinstance(unit, RunResult) else unit.runs[0].config
        matches = [p for p in paper if _matches(config, {k: p.get(k) for k in STUDY_AXES})]
        if not matches:
            continue
        match = matches[0]
        row = {k: match[k] for k in STUDY_AXES} | _ours(unit)
        row['paper_epochs'] = match.get('epochs')
        if row['epochs'] is not None and row['epochs'] != row['paper_epochs']:
            row['note'].append(f'ours: {row["epochs"]} epochs, theirs: {row["paper_epochs"]}')
        row['note'] = '; '.join(row['note'])
        for kind in ('train', 'test'):  # Differences of the values as shown.
            ours, theirs = row[f'{kind}_accuracy'], match[f'{kind}_accuracy']
            diff = None if ours is None or theirs is None else round(ours - float(theirs), 2)
            row |= {f'paper_{kind}_accuracy': theirs, f'{kind}_difference': diff}
        rows.append(row)
    return rows


# Labels and statements. -----------------------------------------------------


def run_label(overrides: Mapping[str, Any], name: str = 'run') -> str:
    """A short legend label: 'bs100 lr0.01 shuf', other axes as 'name=value'."""
    parts = []
    for key in axis_columns(overrides):
        value = overrides[key]
        if key == 'batch_size':
            parts.append(f'bs{value}')
        elif key == 'learning_rate':
            parts.append(f'lr{value:g}' if isinstance(value, int | float) else f'lr{value}')
        elif key == 'shuffle':
            parts.append('shuf' if value else 'noshuf')
        else:
            parts.append(f'{key}={format_cell(value)}')
    return ' '.join(parts) or name


def one_line(text: str, limit: int | None = None) -> str:
    """``text`` on one line (whitespace collapsed), cut to ``limit`` characters."""
    text = ' '.join(str(text).split())
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + '…'
    return text


def describe_data(data: Mapping[str, Any]) -> str:
    """Which dataset copy a run used, in words."""
    source = str(data.get('source') or '')
    path = str(data.get('path') or '')
    sizes = ''
    if data.get('num_train') is not None and data.get('num_test') is not None:
        sizes = f', {data["num_train"]} train / {data["num_test"]} test images'
    caveat = (
        'accuracies are comparable only with runs on this copy, not with published CIFAR-10 numbers'
    )
    if 'jpeg' in path.lower() or 'jpg' in path.lower():
        kind = 'image folder' if source in ('folder', 'auto', '') else f'{source} source at'
        return f'{kind} {path} (JPEG re-encoding of CIFAR-10{sizes}: {caveat})'
    if source == 'folder':
        return f'image folder {path} (a re-encoded copy of CIFAR-10{sizes}: {caveat})'
    if source == 'cifar':
        return f'official CIFAR-10 files at {path}{sizes and f" ({sizes[2:]})"}'
    if source == 'tfds':
        where = f' (data dir {path})' if path else ''
        return f'TFDS cifar10{where}{sizes and f" ({sizes[2:]})"}'
    return f'source {source or "?"}, path {path or "?"} (as configured; no run has finished yet)'


def data_statement(results: Sequence[RunResult]) -> str:
    """'Data: ...': the dataset copies (by path, else source; pending runs only if
    nothing ran) the runs used, each as its most detailed record describes it."""
    started = [r for r in results if r.status != 'pending'] or list(results)
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in started:
        path = r.data.get('path')
        key = os.path.normpath(str(path)) if path else r.data.get('source')
        groups.setdefault(str(key), []).append(r.data)
    texts = [describe_data(max(g, key=len)) for g in groups.values()]
    if not texts:
        return 'Data: unknown (no runs).'
    if len(texts) == 1:
        return f'Data: {texts[0]}.'
    lines = [f'Data: the runs used {len(texts)} dataset copies:']
    lines += [f'  - {len(g)} run(s): {t}' for g, t in zip(groups.values(), texts, strict=True)]
    return '\n'.join(lines)


def status_counts(results: Sequence[RunResult]) -> dict[str, int]:
    """Number of runs by status, the known statuses first, zero counts left out."""
    statuses = dict.fromkeys([*STATUSES, *(r.status for r in results)])
    counts = {status: sum(r.status == status for r in results) for status in statuses}
    return {status: n for status, n in counts.items() if n}


# Markdown. ------------------------------------------------------------------


def _md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    lines += [
        '| ' + ' | '.join(one_line(c).replace('|', '\\|') for c in row) + ' |' for row in rows
    ]
    return lines


def results_markdown(
    sweep_dir: str,
    manifest: Mapping[str, Any],
    results: Sequence[RunResult],
    comparison: Sequence[Mapping[str, Any]],
    plots: Mapping[str, str | None],
) -> str:
    """The text of ``results.md``; ``comparison``: the rows of ``compare_with_paper``,
    ``plots``: file name -> None if drawn, else why not."""
    axes = axis_columns(manifest['axes'])
    counts = ', '.join(f'{n} {s}' for s, n in status_counts(results).items())
    values = [f'{a} ({", ".join(format_cell(v) for v in manifest["axes"][a])})' for a in axes]
    lines = [
        '# Sweep report',
        '',
        f'- Sweep: `{sweep_dir}`',
        f'- Runs: {len(results)} ({counts or "none"})',
        f'- Axes: {"; ".join(values) or "none"}',
        '- ' + data_statement(results),
        '',
        '## Results',
        '',
        'Final accuracies after the last completed epoch (`epochs`), in %; '
        '`images/s` is the median over the epochs after the first (which includes compilation).',
        '',
    ]
    header = ['', 'epochs', *axes, *(name for _, name, _ in RESULT_NUMBERS), 'status']
    body = []
    for r, row in zip(results, result_rows(results, axes), strict=True):
        cells = [row['epochs'] if r.status != 'pending' else '', *(row[a] for a in axes)]
        cells = [c or MISSING for c in [*cells, *(row[f] for f, _, _ in RESULT_NUMBERS)]]
        if row['best']:
            cells = [f'**{c}**' for c in cells]
        status = r.status
        if r.status == 'incomplete' and r.num_epochs:
            status = f'incomplete ({r.epochs_completed}/{r.num_epochs})'
        elif r.status in PROBLEM_STATUSES and r.error:
            status = f'{r.status}: {one_line(r.error, 60)}'
        body.append(['★' if row['best'] else '', *cells, status])
    lines += _md_table(header, body)
    best = best_run_index(results)
    if best is not None:
        r = results[best]
        lines += [
            '',
            f'★ Best run: {run_label(r.overrides, r.name)}: final test accuracy '
            f'{r.test_accuracy:.2f}% after {r.epochs_completed} epoch(s) ({r.status}).',
        ]
    problems = [r for r in results if r.status in PROBLEM_STATUSES]
    if problems:
        lines += ['', '### Failed and diverged runs', '']
        lines += [
            f'- `{r.name}` ({r.status}, {r.epochs_completed} epoch(s)): '
            f'{one_line(r.error or "no reason recorded", 500)}'
            for r in problems
        ]
    if SEED_AXIS in manifest['axes']:
        lines += ['', *seeds_markdown(results, manifest['axes'])]
    lines += ['', '## Comparison with the study', '', f'Study: {PAPER_SOURCE}.', '']
    lines += _comparison_markdown(results, comparison)
    lines += ['', '## Plots', '']
    titles = {CURVES_PNG: 'Accuracy and loss per epoch', HEATMAP_PNG: 'Final test accuracy'}
    for file, reason in plots.items():
        drawn = f'![{titles.get(file, file)}]({file})'
        lines += [drawn if reason is None else f'{file} not drawn: {reason}', '']
    return '\n'.join(lines).rstrip('\n') + '\n'


def seeds_markdown(results: Sequence[RunResult], axes: Mapping[str, Sequence[Any]]) -> list[str]:
    """The sections of ``results.md`` on statistics over seeds and paired comparisons."""
    columns = [a for a in axis_columns(axes) if a != SEED_AXIS]
    lines = [
        '## Over seeds',
        '',
        f'One row per cell (a value of every axis but `{SEED_AXIS}`), over its completed runs '
        '(`n`, seeds listed): mean ± sample sd (n − 1) of the final accuracy in %, and the '
        '95% interval mean ± t(0.975, n − 1)·sd/√n (none for n = 1). Failed and diverged '
        'runs are left out (`excluded`), as are pending and incomplete ones (`unfinished`).',
        '',
    ]
    header = [*columns, 'n', 'seeds', 'test acc', 'test 95% CI', 'train acc', 'train 95% CI']
    body = []
    for cell in group_cells(results):
        row = [*(format_cell(cell.values.get(a)) for a in columns), str(len(cell.used))]
        row.append(cell.seeds() or MISSING)
        for field in ('test_accuracy', 'train_accuracy'):
            e = cell.estimate(field)
            row += [format_estimate(e), format_interval(e)]
        body.append([*row, str(cell.excluded), str(cell.unfinished)])
    lines += _md_table([*header, 'excluded', 'unfinished'], body)
    for axis in two_level_axes(axes):
        lines += ['', *paired_markdown(results, axis, axes[axis], columns)]
    return lines


def paired_markdown(
    results: Sequence[RunResult], axis: str, levels: Sequence[Any], columns: Sequence[str]
) -> list[str]:
    """A ``results.md`` section: ``levels[0]`` minus ``levels[1]`` of ``axis``, paired on seeds."""
    cells = paired_differences(results, axis, levels)
    first, second = (f'{axis}={format_cell(v)}' for v in levels)
    others = [c for c in columns if c != axis]
    lines = [
        f'### Paired comparison: {first} − {second}',
        '',
        f'Δ = final test accuracy at {first} minus at {second}, in percentage points, for '
        f'runs with the same `{SEED_AXIS}` and the same value of every other axis (both '
        'completed); per cell, the mean Δ ± sd over its pairs and the 95% t interval. An '
        'interval that excludes 0 means the difference is distinguishable from seed noise.',
        '',
    ]
    header = [*others, 'pairs', 'mean Δ', '95% CI', 'distinguishable from seed noise']
    body = []
    for p in cells:
        e = p.estimate
        row = [format_cell(p.values.get(a)) for a in others]
        row += [str(e.n), format_estimate(e, signed=True), format_interval(e, signed=True)]
        body.append([*row, noise_verdict(e), str(p.unpaired)])
    lines += _md_table([*header, 'unpaired seeds'], body)
    return [*lines, '', paired_statement(pooled(axis, levels, cells), len(cells))]


def paired_statement(overall: Paired, num_cells: int) -> str:
    """A sentence on the pooled paired comparison of all cells and seeds."""
    first, second = (f'{overall.axis}={format_cell(v)}' for v in overall.levels)
    e = overall.estimate
    where = f'over {e.n} pair(s) from {num_cells} cell(s)'
    if e.mean is None:
        return f'Overall: no pairs of completed runs yet ({overall.unpaired} unpaired seeds).'
    if e.low is None:
        return f'Overall, {where}: Δ = {e.mean:+.2f} points; one pair gives no interval.'
    if e.excludes_zero:
        verdict = f'excludes 0: {first} vs {second} is distinguishable'
    else:
        verdict = f'includes 0: {first} vs {second} is not distinguishable'
    return (
        f'Overall, {where}: mean Δ {format_estimate(e, signed=True)} points, 95% interval '
        f'{format_interval(e, signed=True)}; the interval {verdict} from seed noise. (All '
        'pairs pooled as one sample; cells can differ by more than seed noise.)'
    )


def _comparison_markdown(
    results: Sequence[RunResult], comparison: Sequence[Mapping[str, Any]]
) -> list[str]:
    if not comparison:
        return [
            'Not compared: no run of this sweep has the (batch_size, learning_rate, shuffle) '
            "of a row of the study's table."
        ]
    by_cell = 'n' in comparison[0]
    unit = 'cell' if by_cell else 'run'
    unmatched = (len(group_cells(results)) if by_cell else len(results)) - len(comparison)
    jpeg = any('jpeg' in describe_data(r.data).lower() for r in results if r.status != 'pending')
    lines = []
    if unmatched:
        lines += [f"{unmatched} {unit}(s) have no counterpart in the study's table.", '']
    if by_cell:
        lines += [
            "Ours: the mean (± sd) over a cell's completed runs, one per seed; the note "
            'says how many.',
            '',
        ]
    if jpeg:
        lines += [
            'Caveat: our runs use a JPEG re-encoding of CIFAR-10 and the study the original '
            'files; the differences include the effect of the data copy.',
            '',
        ]
    header = [*STUDY_AXES, 'train ours', 'train study', 'Δ train', 'test ours', 'test study']
    body = []
    for row in comparison:
        sd = f' ± {row["test_sd"]:.2f}' if row.get('test_sd') is not None else ''
        cells = [format_cell(row[k]) for k in STUDY_AXES]
        for kind in ('train', 'test'):
            cells.append(_number(row[f'{kind}_accuracy']) + (sd if kind == 'test' else ''))
            cells.append(_number(row[f'paper_{kind}_accuracy']))
            cells.append(_number(row[f'{kind}_difference'], signed=True))
        body.append([*cells, row['note']])
    lines += _md_table([*header, 'Δ test', 'note'], body)
    lines += ['', 'Δ = ours minus the study, in percentage points.']
    done = [row for row in comparison if row['status'] == 'completed']
    diffs = [row['test_difference'] for row in done if row['test_difference'] is not None]
    if diffs:
        lines[-1] += (
            f' Over the {len(diffs)} completed {unit}(s): mean Δ test '
            f'{statistics.fmean(diffs):+.2f}, mean |Δ test| '
            f'{statistics.fmean(abs(d) for d in diffs):.2f}.'
        )
    return lines


# Plots. ---------------------------------------------------------------------


def _new_figure(width: float, height: float, layout: str | None = None) -> Any:
    """A matplotlib Figure on the Agg canvas (no pyplot, no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _png_bytes(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format='png', bbox_inches='tight', metadata={'Software': None})
    return buf.getvalue()


def _run_colors(n: int) -> list[Any]:
    import matplotlib

    if n <= 10:
        return [matplotlib.colormaps['tab10'](i) for i in range(n)]
    if n <= 20:
        # tab20 pairs a dark and a light shade; dark ones first keeps neighbours distinct.
        order = [*range(0, 20, 2), *range(1, 20, 2)]
        return [matplotlib.colormaps['tab20'](order[i]) for i in range(n)]
    return [matplotlib.colormaps['turbo'](i / max(n - 1, 1)) for i in range(n)]


def epoch_band(
    runs: Sequence[RunResult], key: str, scale: float = 1.0
) -> tuple[list[int], list[float], list[float], list[float]]:
    """Per epoch of any run: the mean, min and max of ``key`` over ``runs`` (NaN if none)."""
    by_epoch: dict[int, list[float]] = {}
    for r in runs:
        for record in r.epochs:
            value = _finite(record.get(key), scale)
            values = by_epoch.setdefault(int(record['epoch']), [])
            if value is not None:
                values.append(value)
    stats = [by_epoch[e] for e in sorted(by_epoch)]
    return (
        sorted(by_epoch),
        [statistics.fmean(v) if v else math.nan for v in stats],
        [min(v) if v else math.nan for v in stats],
        [max(v) if v else math.nan for v in stats],
    )


def curve_groups(
    results: Sequence[RunResult], seed_axis: str | None = None
) -> list[tuple[str, list[RunResult]]]:
    """(legend label, runs) per line of the curves: each run with epochs, or with
    ``seed_axis`` each cell's runs with epochs that did not fail or diverge."""
    if seed_axis is None:
        labels = [(r, '' if r.status == 'completed' else f' ({r.status})') for r in results]
        return [(run_label(r.overrides, r.name) + note, [r]) for r, note in labels if r.epochs]
    groups = []
    for cell in group_cells(results, seed_axis):
        runs = [r for r in cell.runs if r.epochs and r.status not in ('failed', 'diverged')]
        if not runs:
            continue
        notes = [f'{len(runs)} seed(s)']
        if cell.excluded:
            notes.append(f'{cell.excluded} failed/diverged left out')
        unfinished = sum(r.status != 'completed' for r in runs)
        if unfinished:
            notes.append(f'{unfinished} unfinished')
        groups.append((f'{run_label(cell.values, "all")} ({", ".join(notes)})', runs))
    return groups


def render_curves(
    results: Sequence[RunResult], title: str = '', seed_axis: str | None = None
) -> bytes:
    """PNG of the study's Figure 3: test and train accuracy and loss (train solid, test
    dashed) per epoch; a colour per run, or with ``seed_axis`` per cell: the mean over
    its seeds in a min–max band."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    groups = curve_groups(results, seed_axis)
    fig = _new_figure(16, 4.8)
    ax_test, ax_train, ax_loss = panel_axes = fig.subplots(1, 3)
    panels = (
        (ax_test, 'test_accuracy', 100.0, '-'),
        (ax_train, 'train_accuracy', 100.0, '-'),
        (ax_loss, 'train_loss', 1.0, '-'),
        (ax_loss, 'test_loss', 1.0, '--'),
    )
    handles = []
    for (label, runs), color in zip(groups, _run_colors(len(groups)), strict=True):
        for ax, key, scale, linestyle in panels:
            epochs, mean, low, high = epoch_band(runs, key, scale)
            marker = 'o' if len(epochs) == 1 else None
            ax.plot(epochs, mean, color=color, lw=1.3, marker=marker, ms=3, ls=linestyle)
            if len(runs) > 1:
                ax.fill_between(epochs, low, high, color=color, alpha=0.18, linewidth=0)
        handles.append(Line2D([], [], color=color, linewidth=2, label=label))
    names = ('Test accuracy (%)', 'Train accuracy (%)', 'Loss (train solid, test dashed)')
    for ax, name in zip(panel_axes, names, strict=True):
        ax.set(title=name, xlabel='epoch')
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if not groups:
            ax.text(0.5, 0.5, 'no epochs yet', ha='center', va='center', transform=ax.transAxes)
    records = [record for _, runs in groups for r in runs for record in r.epochs]
    if any((_finite(x.get(k)) or 0) > 0 for x in records for k in ('train_loss', 'test_loss')):
        ax_loss.set_yscale('log')
    if groups:
        styles = [Line2D([], [], color='0.3', linestyle=s, label=n) for n, s in LOSS_STYLES]
        ax_loss.add_artist(ax_loss.legend(handles=styles, loc='upper right', fontsize='small'))
        legend_title = f'{len(handles)} run(s)'
        if seed_axis is not None:
            over = f'over {seed_axis}s'
            legend_title = f'{len(handles)} cell(s): line = mean {over},\nband = min–max {over}'

        outside = {'loc': 'upper left', 'bbox_to_anchor': (1.03, 1.0), 'borderaxespad': 0.0}
        ncol = math.ceil(len(handles) / 24)
        ax_loss.legend(handles=handles, fontsize='small', ncol=ncol, title=legend_title, **outside)
    if seed_axis is not None:
        title = f'{title}: ' if title else ''
        title += f'mean over {seed_axis}s (line) and their min–max (band)'
    if title:
        fig.suptitle(title)
    return _png_bytes(fig)


def heatmap_cell(runs: Sequence[RunResult], over_seeds: bool = False) -> tuple[float | None, str]:
    """The value and text of a heatmap cell: the mean final test accuracy of the runs
    (noting unfinished ones), or ``over_seeds`` mean ± sd over the completed ones."""
    if over_seeds:
        cell = Cell({}, tuple(runs))
        e = cell.estimate()
        lines = [format_estimate(e)] + ([f'n={e.n}'] if e.n else [])
        if cell.excluded:
            lines.append(f'{cell.excluded} excluded')
        if cell.unfinished:
            lines.append(f'{cell.unfinished} unfinished')
        return e.mean, '\n'.join(lines)
    accs = [r.test_accuracy for r in runs if r.test_accuracy is not None]
    if not accs:
        return None, MISSING
    acc = statistics.fmean(accs)
    unfinished = [r for r in runs if r.status != 'completed' and r.has_results]
    note = ''
    if unfinished and len(runs) == 1:
        note = f'\n{runs[0].status} {runs[0].epochs_completed}/{runs[0].num_epochs or "?"}'
    elif unfinished:
        note = f'\n{len(unfinished)} unfinished'
    return acc, f'{acc:.2f}{note}'


def render_heatmap(results: Sequence[RunResult], axes: Mapping[str, Sequence[Any]]) -> bytes:
    """PNG of final test accuracy over batch size (rows) x learning rate (columns), a
    panel per shuffle value; other axes pooled (:func:`heatmap_cell`)."""
    import matplotlib
    import numpy as np

    batch_sizes, rates = list(axes['batch_size']), list(axes['learning_rate'])
    shuffles = list(axes['shuffle']) if 'shuffle' in axes else [None]
    configured = {bool(r.config.get('shuffle')) for r in results if 'shuffle' in r.config}

    def cell(shuffle: Any, bs: Any, lr: Any) -> tuple[float | None, str]:
        values = {'batch_size': bs, 'learning_rate': lr}
        values |= {} if shuffle is None else {'shuffle': shuffle}
        return heatmap_cell([r for r in results if _matches(r.config, values)], SEED_AXIS in axes)

    # (value, text) per shuffle value, batch size and learning rate.
    cells = [[[cell(s, bs, lr) for lr in rates] for bs in batch_sizes] for s in shuffles]
    grids = [np.array([[np.nan if v is None else v for v, _ in row] for row in c]) for c in cells]
    finite = np.concatenate([g[np.isfinite(g)] for g in grids])
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 100.0)
    if vmax - vmin < 1e-6:
        vmin, vmax = vmin - 1.0, vmax + 1.0

    cmap = matplotlib.colormaps['viridis'].with_extremes(bad='0.92')
    width = 1.5 + len(shuffles) * (1.2 + 1.4 * len(rates))
    fig = _new_figure(width, 1.6 + 0.9 * len(batch_sizes), layout='constrained')
    panels = fig.subplots(1, len(shuffles), squeeze=False)[0]
    image = None
    for k, (ax, s, grid, panel) in enumerate(zip(panels, shuffles, grids, cells, strict=True)):
        image = ax.imshow(
            np.ma.masked_invalid(grid), cmap=cmap, vmin=vmin, vmax=vmax, aspect='auto'
        )
        ax.set_xticks(range(len(rates)), [format_cell(r) for r in rates])
        ax.set_yticks(range(len(batch_sizes)), [format_cell(b) for b in batch_sizes])
        ax.set_xlabel('learning rate')
        if k == 0:
            ax.set_ylabel('batch size')
        shown = s if s is not None else (configured.pop() if len(configured) == 1 else None)
        ax.set_title({True: 'shuffle', False: 'no shuffle', None: 'all runs'}[shown])
        for (i, j), value in np.ndenumerate(grid):
            if np.isfinite(value):
                color = 'white' if (value - vmin) / (vmax - vmin) < 0.6 else 'black'
            else:
                color = '0.4'
            ax.text(j, i, panel[i][j][1], ha='center', va='center', color=color, fontsize=8.5)
    if image is not None:
        fig.colorbar(image, ax=list(panels), label='final test accuracy (%)', shrink=0.85)
    others = [a for a in axes if a not in STUDY_AXES]
    title = 'Final test accuracy (%)'
    if SEED_AXIS in axes:
        pooled_axes = [a for a in others if a != SEED_AXIS]
        title += ': mean ± sd over seeds (n completed runs)'
        title += f', pooling {", ".join(pooled_axes)}' if pooled_axes else ''
    elif others:
        title += f' (mean over {", ".join(others)})'
    fig.suptitle(title)
    return _png_bytes(fig)


# Writing. -------------------------------------------------------------------


def write_run_report(run_dir: str) -> dict[str, str]:
    """Writes ``curves.png`` of one run's workdir (not a sweep), as far as its
    ``metrics.jsonl`` goes (a run in progress too); returns ``{kind: path}``."""
    result = load_run(run_dir, os.path.basename(os.path.abspath(run_dir)), {})
    if not result.epochs:
        raise FileNotFoundError(f'{run_dir} has no epoch records ({METRICS_FILE}) yet')
    path = os.path.join(run_dir, CURVES_PNG)
    title = f'{result.name}: {result.epochs_completed} of {result.num_epochs} epochs'
    write_atomic(path, render_curves([result], title=title))
    return {'curves': path}


def write_report(sweep_dir: str, paper_csv: str | None = None) -> dict[str, str]:
    """Writes the report files (see above) into ``sweep_dir``, removing those that no
    longer apply; returns ``{kind: path}`` (kind: 'results_csv', 'curves', ...).
    ``paper_csv``: the study's table (default: the packaged one)."""
    manifest = read_manifest(sweep_dir)
    results = collect(sweep_dir)
    axes = manifest['axes']
    seed_axis = SEED_AXIS if SEED_AXIS in axes else None
    columns = axis_columns(axes)
    others = [a for a in columns if a != SEED_AXIS]  # The columns of a cell.
    written: dict[str, str] = {}

    def write(file: str, content: str | bytes | None) -> None:
        """Writes ``file`` (None: removes it)."""
        path = os.path.join(sweep_dir, file)
        if content is None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        else:
            write_atomic(path, content)
            written[file.removesuffix('.png').replace('.', '_')] = path  # 'results_csv', 'curves'

    rows = [list(row.values()) for row in result_rows(results, columns)]
    write(RESULTS_CSV, _csv_text(['epochs', *columns, *RESULT_COLUMNS], rows))
    comparison = compare_with_paper(results, load_paper_results(paper_csv), seed_axis)
    header = CELL_COMPARISON_COLUMNS if seed_axis else COMPARISON_COLUMNS
    two = ('accuracy', 'difference', '_sd')  # Columns with 2 decimals.
    rows = [
        [format_cell(row[k], 2 if k.endswith(two) else None) for k in header] for row in comparison
    ]
    write(COMPARISON_CSV, _csv_text(header, rows) if rows else None)
    rows = cell_rows(group_cells(results), others) if seed_axis else None
    write(CELLS_CSV, None if rows is None else _csv_text([*others, *CELL_COLUMNS], rows))
    rows = paired_rows(results, axes, others) if seed_axis else []
    header = ['axis', 'first', 'second', 'scope', *others, *PAIRED_COLUMNS]
    write(PAIRED_CSV, _csv_text(header, rows) if rows else None)

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        reason = 'matplotlib is not installed (pip install matplotlib)'
        plots: dict[str, str | None] = {CURVES_PNG: reason, HEATMAP_PNG: reason}
    else:
        title = os.path.basename(os.path.abspath(sweep_dir))
        write(CURVES_PNG, render_curves(results, title, seed_axis))
        grid = 'batch_size' in axes and 'learning_rate' in axes
        write(HEATMAP_PNG, render_heatmap(results, axes) if grid else None)
        reason = None if grid else 'batch_size and learning_rate are not both sweep axes'
        plots = {CURVES_PNG: None, HEATMAP_PNG: reason}
    write(RESULTS_MD, results_markdown(sweep_dir, manifest, results, comparison, plots))
    return written
