"""The report's tables as data frames: results, cells, paired differences, the
comparison with the paper; their csv (``DataFrame.to_csv``) and Markdown
(``DataFrame.to_markdown``) text; labels and statements about runs.

Accuracies, their differences, sds and intervals are fractions in [0, 1] in every csv
(under their plain names: ``test_accuracy``, ``test_sd``, ``mean_difference``) and
percentages (points) in Markdown cells.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd

from resnet_jax.reports.load import PERCENT, STATUSES, RunResult, format_cell
from resnet_jax.reports.stats import (
    Cell,
    Estimate,
    group_cells,
    matches,
    paired_differences,
    pooled,
    two_level_axes,
)
from resnet_jax.validation import get_field

PAPER_AXES = ('batch_size', 'learning_rate', 'shuffle')
MISSING = '—'  # Markdown cell of a value that does not exist (yet).
# The numbers of results.csv (after 'epochs' and the axes): (RunResult field and csv
# column, results.md header, decimals in results.md: accuracies in %, ACCURACY_DECIMALS
# decimals of a fraction in the csv).
RESULT_NUMBERS = (
    ('train_accuracy', 'train acc', 2),
    ('test_accuracy', 'test acc', 2),
    ('best_test_accuracy', 'best test acc', 2),
    ('best_epoch', 'best epoch', None),
    ('wall_seconds', 'wall s', 1),
    ('images_per_second', 'images/s', 1),
)
ACCURACIES = ('train_accuracy', 'test_accuracy', 'best_test_accuracy')
ACCURACY_DECIMALS = 4  # Of a final accuracy or its difference in a csv (2 of its %).
STAT_DECIMALS = 5  # Of an estimate's mean, sd and interval in cells.csv and paired.csv.
RESULT_COLUMNS = (*(field for field, _, _ in RESULT_NUMBERS), 'status', 'best', 'error')
COMPARISON_COLUMNS = (
    *(*PAPER_AXES, 'epochs', 'paper_epochs'),
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


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> pd.DataFrame:
    """Formatted rows (cells as text) under ``header`` as a frame."""
    return pd.DataFrame(list(rows), columns=list(header), dtype=object)


def csv_text(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """The csv text of formatted rows (``DataFrame.to_csv``)."""
    return table(header, rows).to_csv(index=False, lineterminator='\n')


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """The lines of a Markdown table of formatted rows (``DataFrame.to_markdown``);
    each cell on one line, ``|`` escaped."""
    cells = [[one_line(c).replace('|', '\\|') for c in row] for row in rows]
    text = table(header, cells).to_markdown(index=False, tablefmt='pipe', disable_numparse=True)
    return text.splitlines()


def percent_cell(x: float | None, signed: bool = False) -> str:
    """A markdown cell: the fraction ``x`` in % with 2 decimals (and a sign), or '—'."""
    return MISSING if x is None else format(PERCENT * x, '+.2f' if signed else '.2f')


def format_estimate(e: Estimate, signed: bool = False) -> str:
    """An estimate of fractions in %: '85.12 ± 0.34' (several values), '85.12' (one) or
    '—' (none)."""
    mean = percent_cell(e.mean, signed)
    return mean if e.sd is None else f'{mean} ± {percent_cell(e.sd)}'


def format_interval(e: Estimate, signed: bool = False) -> str:
    """The interval of an estimate of fractions in %: '[84.50, 85.74]', or '—' without one."""
    if e.low is None or e.high is None:
        return MISSING
    return f'[{percent_cell(e.low, signed)}, {percent_cell(e.high, signed)}]'


def estimate_cells(e: Estimate) -> list[str]:
    """The csv cells (fractions) of an estimate's mean, sd and interval (``_STATS``)."""
    return [format_cell(v, STAT_DECIMALS) for v in (e.mean, e.sd, e.low, e.high)]


def axis_columns(axes: Iterable[str]) -> list[str]:
    """The axes as table columns: the paper's three first (when axes), then the rest."""
    axes = list(axes)
    return [a for a in PAPER_AXES if a in axes] + [a for a in axes if a not in PAPER_AXES]


def selection_metric(results: Sequence[RunResult]) -> str:
    """What the best run is selected on: ``val_accuracy`` when the runs have a
    validation split, else ``test_accuracy`` (the paper's way)."""
    return 'val_accuracy' if any(r.val_accuracy is not None for r in results) else 'test_accuracy'


def best_run_index(results: Sequence[RunResult]) -> int | None:
    """The run with the highest final accuracy on :func:`selection_metric` (first on
    ties; completed runs before incomplete ones; never a failed or diverged one)."""
    metric = selection_metric(results)
    scored = [
        (r.status == 'completed', getattr(r, metric), -i)
        for i, r in enumerate(results)
        if r.has_results
        and r.status in ('completed', 'incomplete')
        and getattr(r, metric) is not None
    ]
    return -max(scored)[2] if scored else None


def result_rows(
    results: Sequence[RunResult], axes: Sequence[str], markdown: bool = False
) -> list[dict[str, str]]:
    """The formatted rows of ``results.csv`` (accuracies as fractions), or with
    ``markdown`` of the table of ``results.md`` (accuracies in %)."""
    best = best_run_index(results)
    return [
        {
            'epochs': format_cell(r.epochs_completed),
            **{a: format_cell(get_field(r.config, a, None)) for a in axes},
            **{field: _result_cell(r, field, d, markdown) for field, _, d in RESULT_NUMBERS},
            'status': r.status,
            'best': '*' if i == best else '',
            'error': one_line(r.error or ''),
        }
        for i, r in enumerate(results)
    ]


def _result_cell(r: RunResult, field: str, decimals: int | None, markdown: bool) -> str:
    """A number of a run's row: an accuracy as a fraction, or in % in ``markdown``."""
    value = getattr(r, field)
    if field not in ACCURACIES:
        return format_cell(value, decimals)
    if not markdown:
        return format_cell(value, ACCURACY_DECIMALS)
    return format_cell(None if value is None else PERCENT * value, decimals)


def cell_rows(cells: Sequence[Cell], axes: Sequence[str]) -> list[list[str]]:
    """The rows of ``cells.csv``: statistics over each cell's seeds."""
    rows = []
    for cell in cells:
        row = [format_cell(cell.values.get(a)) for a in axes]
        row += [str(len(cell.used)), str(cell.excluded), str(cell.unfinished), cell.seeds()]
        for field in ('test_accuracy', 'train_accuracy'):
            row += estimate_cells(cell.estimate(field))
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
            row += [str(e.n), str(p.unpaired), *estimate_cells(e), format_cell(e.excludes_zero)]
            rows.append(row)
    return rows


def _ours(unit: RunResult | Cell) -> dict[str, Any]:
    """Our side of a comparison row: a run's final accuracies, or a cell's means."""
    if isinstance(unit, RunResult):
        return {
            'epochs': unit.epochs_completed if unit.status != 'pending' else None,
            'train_accuracy': as_shown(unit.train_accuracy),
            'test_accuracy': as_shown(unit.test_accuracy),
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
        'train_accuracy': as_shown(train.mean),
        'test_accuracy': as_shown(test.mean),
        'n': test.n,
        'test_sd': as_shown(test.sd),
        'status': 'completed' if test.n else status,
        'note': notes,
        'name': ','.join(f'{k}={format_cell(v)}' for k, v in unit.values.items()),
    }


def as_shown(x: float | None) -> float | None:
    """An accuracy (a fraction) rounded as comparison.csv shows it."""
    return None if x is None else round(x, ACCURACY_DECIMALS)


def compare_with_paper(
    results: Sequence[RunResult], paper: Sequence[Mapping[str, Any]], seed_axis: str | None = None
) -> list[dict[str, Any]]:
    """Ours vs the paper's accuracies (fractions, :func:`~resnet_jax.reports.load.
    load_paper_results`) for each run whose (batch_size, learning_rate, shuffle) is a
    paper row (other epochs noted), differences ours minus theirs as shown
    (:func:`as_shown`). With ``seed_axis``, a row per cell: ours the mean (``n``,
    ``test_sd``) over its completed runs."""
    units = results if seed_axis is None else group_cells(results, seed_axis)
    rows = []
    for unit in units:
        config = unit.config if isinstance(unit, RunResult) else unit.runs[0].config
        found = [p for p in paper if matches(config, {k: p.get(k) for k in PAPER_AXES})]
        if not found:
            continue
        match = found[0]
        row = {k: match[k] for k in PAPER_AXES} | _ours(unit)
        row['paper_epochs'] = match.get('epochs')
        if row['epochs'] is not None and row['epochs'] != row['paper_epochs']:
            row['note'].append(f'ours: {row["epochs"]} epochs, theirs: {row["paper_epochs"]}')
        row['note'] = '; '.join(row['note'])
        for kind in ('train', 'test'):  # Differences of the values as shown.
            ours, theirs = row[f'{kind}_accuracy'], match[f'{kind}_accuracy']
            diff = None if ours is None or theirs is None else as_shown(ours - float(theirs))
            row |= {f'paper_{kind}_accuracy': theirs, f'{kind}_difference': diff}
        rows.append(row)
    return rows


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
