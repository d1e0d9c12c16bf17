"""A grid's report: results tables, the comparison with the paper, training curves.

    from resnet_jax.reports import sweep_report
    paths = sweep_report.write_sweep_report('runs/paper')  # {kind: path} of the files written

The command line writes it after a grid study, and ``--mode=report`` at any time
(``python -m resnet_jax.main --workdir runs/paper --mode=report``: no training; a
sweep may be partly done). All is read from disk: the manifest ``sweep.json``
(``axes``, ``runs`` with ``name`` and ``overrides``, ``base_config``) and in each run
folder ``<sweep_dir>/<name>/`` ``metrics.jsonl`` (a record per epoch), ``summary.json``
(written when the run ends) and ``config.json``; a run without records is 'pending',
one with records but no summary 'incomplete'. ``write_sweep_report`` writes into the sweep
dir, each file atomically (``os.replace`` of a unique temporary file: concurrent
writers never leave a torn file):

* ``results.csv`` / ``results.md``: a row per run in manifest order in the paper's
  layout (``epochs``, the axes, final train and test accuracy), then best test
  accuracy and its epoch, wall time, images/s and status; the best run is starred.
  :func:`~resnet_jax.reports.load.read_results_csv` parses any csv of the report back.
* ``comparison.csv`` (and a section of ``results.md``): ours vs the paper's final
  accuracies where (batch_size, learning_rate, shuffle) is a row of its table.
* ``curves.png`` (the paper's Figure 3: test and train accuracy and loss per epoch, a
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

Every csv holds accuracies, their differences, sds and intervals as fractions in [0, 1]
under their plain names (``test_accuracy``, as in ``metrics.jsonl``, ``summary.json`` and
the study report's ``trials.csv``); ``results.md`` and the plots show them in %.

The paper's table (``markdown.PAPER_SOURCE``: final train and test accuracy in % of 18
runs, batch size x learning rate x shuffle) ships as ``resnet_jax/data/paper_results.csv``;
:func:`~resnet_jax.reports.load.load_paper_results` reads it as fractions.

Modules: :mod:`~resnet_jax.reports.load` (reading runs and csv files; ``collect`` gives a
``RunResult`` per manifest run), :mod:`~resnet_jax.reports.stats` (estimates over seeds,
``scipy.stats``), :mod:`~resnet_jax.reports.tables` (the tables as pandas frames, labels),
:mod:`~resnet_jax.reports.markdown` (``results.md``) and
:mod:`~resnet_jax.reports.plots` (``curves.png``, ``heatmap.png``).
"""

from __future__ import annotations

import contextlib
import os

from resnet_jax.reports.load import (
    collect,
    format_cell,
    load_paper_results,
    load_run,
    read_manifest,
)
from resnet_jax.reports.markdown import CURVES_PNG, HEATMAP_PNG, results_markdown
from resnet_jax.reports.plots import render_curves, render_heatmap
from resnet_jax.reports.stats import SEED_AXIS, group_cells
from resnet_jax.reports.tables import (
    ACCURACY_DECIMALS,
    CELL_COLUMNS,
    CELL_COMPARISON_COLUMNS,
    COMPARISON_COLUMNS,
    PAIRED_COLUMNS,
    RESULT_COLUMNS,
    axis_columns,
    cell_rows,
    compare_with_paper,
    csv_text,
    paired_rows,
    result_rows,
)
from resnet_jax.rundir.workdir import METRICS_FILE, RecordError, write_atomic

RESULTS_CSV = 'results.csv'
RESULTS_MD = 'results.md'
COMPARISON_CSV = 'comparison.csv'
CELLS_CSV = 'cells.csv'
PAIRED_CSV = 'paired.csv'


def write_run_report(run_dir: str) -> dict[str, str]:
    """Writes ``curves.png`` of one run's workdir (not a sweep), as far as its
    ``metrics.jsonl`` goes (a run in progress too); returns ``{kind: path}``."""
    result = load_run(run_dir, os.path.basename(os.path.abspath(run_dir)), {})
    if result.status == 'unreadable':
        raise RecordError(result.error)
    if not result.epochs:
        raise FileNotFoundError(f'{run_dir} has no epoch records ({METRICS_FILE}) yet')
    path = os.path.join(run_dir, CURVES_PNG)
    title = f'{result.name}: {result.epochs_completed} of {result.num_epochs} epochs'
    write_atomic(path, render_curves([result], title=title))
    return {'curves': path}


def write_sweep_report(sweep_dir: str, paper_csv: str | None = None) -> dict[str, str]:
    """Writes the report files (see above) into ``sweep_dir``, removing those that no
    longer apply; returns ``{kind: path}`` (kind: 'results_csv', 'curves', ...).
    ``paper_csv``: the paper's table (default: the packaged one)."""
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
    write(RESULTS_CSV, csv_text(['epochs', *columns, *RESULT_COLUMNS], rows))
    comparison = compare_with_paper(results, load_paper_results(paper_csv), seed_axis)
    header = CELL_COMPARISON_COLUMNS if seed_axis else COMPARISON_COLUMNS
    accuracies = ('accuracy', 'difference', '_sd')  # Fractions, rounded as shown.
    rows = [
        [format_cell(row[k], ACCURACY_DECIMALS if k.endswith(accuracies) else None) for k in header]
        for row in comparison
    ]
    write(COMPARISON_CSV, csv_text(header, rows) if rows else None)
    rows = cell_rows(group_cells(results), others) if seed_axis else None
    write(CELLS_CSV, None if rows is None else csv_text([*others, *CELL_COLUMNS], rows))
    rows = paired_rows(results, axes, others) if seed_axis else []
    header = ['axis', 'first', 'second', 'scope', *others, *PAIRED_COLUMNS]
    write(PAIRED_CSV, csv_text(header, rows) if rows else None)

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
