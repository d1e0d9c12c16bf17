"""The text of ``results.md``: the results, the statistics over seeds, the comparison.

Accuracies are fractions in the report's rows and csv files; ``results.md`` shows them in %.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from resnet_jax.reports.load import PERCENT, PROBLEM_STATUSES, RunResult, format_cell
from resnet_jax.reports.stats import (
    SEED_AXIS,
    Paired,
    group_cells,
    noise_verdict,
    paired_differences,
    pooled,
    two_level_axes,
)
from resnet_jax.reports.tables import (
    MISSING,
    PAPER_AXES,
    RESULT_NUMBERS,
    axis_columns,
    best_run_index,
    data_statement,
    describe_data,
    format_estimate,
    format_interval,
    markdown_table,
    one_line,
    percent_cell,
    result_rows,
    run_label,
    selection_metric,
    status_counts,
)

PAPER_SOURCE = (
    'Rane, Jathar, Yadav, "ResNet with Hyper Parameters Tuning", NYU; '
    'results table, 50 epochs, Adam, original CIFAR-10'
)
CURVES_PNG = 'curves.png'
HEATMAP_PNG = 'heatmap.png'


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
    lines += _results_table(results, axes)
    lines += _best_run_sentence(results)
    lines += _problems_section(results)
    if SEED_AXIS in manifest['axes']:
        lines += ['', *seeds_markdown(results, manifest['axes'])]
    lines += ['', '## Comparison with the study', '', f'Study: {PAPER_SOURCE}.', '']
    lines += _comparison_markdown(results, comparison)
    lines += ['', '## Plots', '', *_plots_lines(plots)]
    return '\n'.join(lines).rstrip('\n') + '\n'


def _status_cell(r: RunResult) -> str:
    """The status column of a run: how far an incomplete one got, why a failed one failed."""
    if r.status == 'incomplete' and r.num_epochs:
        return f'incomplete ({r.epochs_completed}/{r.num_epochs})'
    if r.status in PROBLEM_STATUSES and r.error:
        return f'{r.status}: {one_line(r.error, 60)}'
    return r.status


def _results_table(results: Sequence[RunResult], axes: Sequence[str]) -> list[str]:
    """The table of ``results.md``: a row per run, the best one starred and in bold."""
    header = ['', 'epochs', *axes, *(name for _, name, _ in RESULT_NUMBERS), 'status']
    body = []
    for r, row in zip(results, result_rows(results, axes, markdown=True), strict=True):
        cells = [row['epochs'] if r.status != 'pending' else '', *(row[a] for a in axes)]
        cells = [c or MISSING for c in [*cells, *(row[f] for f, _, _ in RESULT_NUMBERS)]]
        if row['best']:
            cells = [f'**{c}**' for c in cells]
        body.append(['★' if row['best'] else '', *cells, _status_cell(r)])
    return markdown_table(header, body)


def _best_run_sentence(results: Sequence[RunResult]) -> list[str]:
    """The sentence on the best run and the metric it was selected on ([] if none)."""
    best = best_run_index(results)
    if best is None:
        return []
    r = results[best]
    if selection_metric(results) == 'val_accuracy':
        return [
            '',
            f'★ Best run, selected on validation accuracy: {run_label(r.overrides, r.name)}: '
            f'final validation accuracy {PERCENT * r.val_accuracy:.2f}%, test accuracy '
            f'{PERCENT * r.test_accuracy:.2f}% (the held-out estimate) after '
            f'{r.epochs_completed} epoch(s) ({r.status}).',
        ]
    return [
        '',
        f'★ Best run, selected on test accuracy (no validation split): '
        f'{run_label(r.overrides, r.name)}: final test accuracy '
        f'{PERCENT * r.test_accuracy:.2f}% after {r.epochs_completed} epoch(s) ({r.status}).',
    ]


def _problems_section(results: Sequence[RunResult]) -> list[str]:
    """The section listing failed and diverged runs with their errors ([] if none)."""
    problems = [r for r in results if r.status in PROBLEM_STATUSES]
    if not problems:
        return []
    return [
        '',
        '### Failed and diverged runs',
        '',
        *(
            f'- `{r.name}` ({r.status}, {r.epochs_completed} epoch(s)): '
            f'{one_line(r.error or "no reason recorded", 500)}'
            for r in problems
        ),
    ]


def _plots_lines(plots: Mapping[str, str | None]) -> list[str]:
    """An image link per drawn plot, else why it was not drawn."""
    titles = {CURVES_PNG: 'Accuracy and loss per epoch', HEATMAP_PNG: 'Final test accuracy'}
    lines = []
    for file, reason in plots.items():
        drawn = f'![{titles.get(file, file)}]({file})'
        lines += [drawn if reason is None else f'{file} not drawn: {reason}', '']
    return lines


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
    lines += markdown_table([*header, 'excluded', 'unfinished'], body)
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
    lines += markdown_table([*header, 'unpaired seeds'], body)
    return [*lines, '', paired_statement(pooled(axis, levels, cells), len(cells))]


def paired_statement(overall: Paired, num_cells: int) -> str:
    """A sentence on the pooled paired comparison of all cells and seeds."""
    first, second = (f'{overall.axis}={format_cell(v)}' for v in overall.levels)
    e = overall.estimate
    where = f'over {e.n} pair(s) from {num_cells} cell(s)'
    if e.mean is None:
        return f'Overall: no pairs of completed runs yet ({overall.unpaired} unpaired seeds).'
    if e.low is None:
        mean = percent_cell(e.mean, signed=True)
        return f'Overall, {where}: Δ = {mean} points; one pair gives no interval.'
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
    header = [*PAPER_AXES, 'train ours', 'train study', 'Δ train', 'test ours', 'test study']
    body = []
    for row in comparison:
        sd = f' ± {percent_cell(row["test_sd"])}' if row.get('test_sd') is not None else ''
        cells = [format_cell(row[k]) for k in PAPER_AXES]
        for kind in ('train', 'test'):
            cells.append(percent_cell(row[f'{kind}_accuracy']) + (sd if kind == 'test' else ''))
            cells.append(percent_cell(row[f'paper_{kind}_accuracy']))
            cells.append(percent_cell(row[f'{kind}_difference'], signed=True))
        body.append([*cells, row['note']])
    lines += markdown_table([*header, 'Δ test', 'note'], body)
    lines += ['', 'Δ = ours minus the study, in percentage points.']
    done = [row for row in comparison if row['status'] == 'completed']
    diffs = [PERCENT * row['test_difference'] for row in done if row['test_difference'] is not None]
    if diffs:
        lines[-1] += (
            f' Over the {len(diffs)} completed {unit}(s): mean Δ test '
            f'{statistics.fmean(diffs):+.2f}, mean |Δ test| '
            f'{statistics.fmean(abs(d) for d in diffs):.2f}.'
        )
    return lines
