"""The report's plots: training curves (the paper's Figure 3) and the accuracy heatmap.

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no global backend).
Accuracies (fractions in the records and the report's rows) are plotted in %.
"""

from __future__ import annotations

import io
import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from resnet_jax.reports.load import PERCENT, PROBLEM_STATUSES, RunResult, finite, format_cell
from resnet_jax.reports.stats import SEED_AXIS, Cell, group_cells, matches
from resnet_jax.reports.tables import MISSING, PAPER_AXES, format_estimate, run_label

LOSS_STYLES = (('train', '-'), ('test', '--'))  # Line styles of the loss panel.


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
    records = [
        (int(record['epoch']), finite(record.get(key), scale)) for r in runs for record in r.epochs
    ]
    frame = pd.DataFrame(records, columns=['epoch', 'value'], dtype=float)
    band = frame.groupby('epoch')['value'].agg(['mean', 'min', 'max'])
    return (
        [int(e) for e in band.index],
        band['mean'].tolist(),
        band['min'].tolist(),
        band['max'].tolist(),
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
        runs = [r for r in cell.runs if r.epochs and r.status not in PROBLEM_STATUSES]
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
    """PNG of the paper's Figure 3: test and train accuracy and loss (train solid, test
    dashed) per epoch; a colour per run, or with ``seed_axis`` per cell: the mean over
    its seeds in a min–max band."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    groups = curve_groups(results, seed_axis)
    fig = _new_figure(16, 4.8)
    ax_test, ax_train, ax_loss = panel_axes = fig.subplots(1, 3)
    panels = (
        (ax_test, 'test_accuracy', PERCENT, '-'),
        (ax_train, 'train_accuracy', PERCENT, '-'),
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
    if any((finite(x.get(k)) or 0) > 0 for x in records for k in ('train_loss', 'test_loss')):
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
    """The value (in %) and text of a heatmap cell: the mean final test accuracy of the
    runs (noting unfinished ones), or ``over_seeds`` mean ± sd over the completed ones."""
    if over_seeds:
        cell = Cell({}, tuple(runs))
        e = cell.estimate()
        lines = [format_estimate(e)] + ([f'n={e.n}'] if e.n else [])
        if cell.excluded:
            lines.append(f'{cell.excluded} excluded')
        if cell.unfinished:
            lines.append(f'{cell.unfinished} unfinished')
        return None if e.mean is None else PERCENT * e.mean, '\n'.join(lines)
    accs = [r.test_accuracy for r in runs if r.test_accuracy is not None]
    if not accs:
        return None, MISSING
    acc = PERCENT * statistics.fmean(accs)
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
        return heatmap_cell([r for r in results if matches(r.config, values)], SEED_AXIS in axes)

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
    others = [a for a in axes if a not in PAPER_AXES]
    title = 'Final test accuracy (%)'
    if SEED_AXIS in axes:
        pooled_axes = [a for a in others if a != SEED_AXIS]
        title += ': mean ± sd over seeds (n completed runs)'
        title += f', pooling {", ".join(pooled_axes)}' if pooled_axes else ''
    elif others:
        title += f' (mean over {", ".join(others)})'
    fig.suptitle(title)
    return _png_bytes(fig)
