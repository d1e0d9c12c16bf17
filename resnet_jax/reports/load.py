"""Reading a sweep from disk: the manifest, each run's records and summary, csv files.

    results = load.collect('runs/paper')        # one RunResult per manifest run
    rows = load.read_results_csv('runs/paper/results.csv')

A run without records is 'pending', one with records but no summary 'incomplete'.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.resources
import io
import json
import math
import os
import statistics
from collections.abc import Mapping
from typing import Any

import pandas as pd

from resnet_jax.rundir import workdir as workdir_lib
from resnet_jax.rundir import writers
from resnet_jax.rundir.workdir import (
    CONFIG_FILE,
    MANIFEST_FILE,
    SUMMARY_FILE,
    RecordError,
    read_json_object,
    read_run_config,
    read_summary,
)
from resnet_jax.rundir.workdir import read_manifest as read_checked_manifest
from resnet_jax.validation import set_field

# 'unreadable': a run whose records, summary or config are malformed (its error says which).
STATUSES = ('completed', 'incomplete', 'failed', 'diverged', 'pending', 'unreadable')
PROBLEM_STATUSES = ('failed', 'diverged', 'unreadable')  # Runs left out, with their error.
PAPER_CSV = 'paper_results.csv'
# Every csv and json of the reports holds accuracies (and their differences, sds and
# intervals) as fractions in [0, 1]; Markdown and the console show them times PERCENT, in %.
PERCENT = 100.0


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What one run of a sweep has produced so far; accuracies as fractions in [0, 1].

    The numbers are the run's ``summary.json``'s or, while it has none (or an outdated
    one), what :func:`resnet_jax.rundir.writers.summarize` makes of its records.
    """

    name: str  # The run's folder in the sweep dir.
    overrides: dict[str, Any]  # Its values of the sweep axes (dotted config names).
    status: str  # One of STATUSES.
    # The metrics.jsonl records, one per epoch in epoch order.
    epochs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    # The full config: its summary's or config.json, else the manifest's with overrides.
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    num_epochs: int | None = None  # As configured.
    epochs_completed: int = 0
    train_accuracy: float | None = None
    test_accuracy: float | None = None
    best_test_accuracy: float | None = None
    # On the held-out training images, when the config has a validation split.
    val_accuracy: float | None = None
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
        records = workdir_lib.read_metrics(run_dir)
        summary = read_summary(os.path.join(run_dir, SUMMARY_FILE))
        if os.path.exists(os.path.join(run_dir, CONFIG_FILE)):
            read_run_config(os.path.join(run_dir, CONFIG_FILE), whole=False)
    except RecordError as e:
        config = config_with_overrides(base_config or {}, overrides)
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
        or config_with_overrides(base_config or {}, overrides)
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
    accuracies = ('train_accuracy', 'test_accuracy', 'best_test_accuracy', 'val_accuracy')
    timed = [r for r in records if r.get('epoch') != 1] if len(records) >= 2 else records
    speeds = [v for v in (finite(r.get('images_per_second')) for r in timed) if v is not None]
    return RunResult(
        name=name,
        overrides=dict(overrides),
        status=status,
        epochs=records,
        config=dict(config),
        num_epochs=None if num_epochs is None else int(num_epochs),
        epochs_completed=int(numbers.get('epochs_completed', 0)),
        **{k: finite(numbers.get(k)) for k in accuracies},
        best_epoch=None if best_epoch is None else int(best_epoch),
        wall_seconds=finite(numbers.get('wall_seconds')),
        images_per_second=statistics.median(speeds) if speeds else None,
        error=s.get('error') or None,
        data=s.get('data') or dict(config.get('data') or {}),
    )


def config_with_overrides(
    config: Mapping[str, Any], overrides: Mapping[str, Any]
) -> dict[str, Any]:
    """A deep copy of ``config`` with dotted ``overrides`` ('data.path': ...) set."""
    out = copy.deepcopy(dict(config))
    for key, value in overrides.items():
        set_field(out, key, value, create=True)
    return out


def finite(x: Any, scale: float = 1.0) -> float | None:
    """``scale * x`` as a float, or None if ``x`` is missing or not finite."""
    if x is None or isinstance(x, bool):
        return None
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return scale * x if math.isfinite(x) else None


def load_paper_results(path: str | None = None) -> list[dict[str, Any]]:
    """The paper's table (default: the packaged one): rows of ``epochs, batch_size,
    learning_rate, shuffle, train_accuracy, test_accuracy``; the file holds accuracies in
    % as published, the rows fractions like every other accuracy of the reports."""
    if path is None:
        resource = importlib.resources.files('resnet_jax') / 'data' / PAPER_CSV
        rows = _parse_rows(io.StringIO(resource.read_text()))
    else:
        rows = read_results_csv(path)
    accuracies = ('train_accuracy', 'test_accuracy')
    return [row | {k: from_percent(row[k]) for k in accuracies if k in row} for row in rows]


def from_percent(x: Any) -> float | None:
    """A percentage as a fraction (72.05 -> 0.7205), None if missing or not finite."""
    value = finite(x)
    return None if value is None else value / PERCENT


def read_results_csv(path: str) -> list[dict[str, Any]]:
    """The rows of a csv of the report as dicts of :func:`parse_cell` values."""
    return _parse_rows(path)


def _parse_rows(source: Any) -> list[dict[str, Any]]:
    """Every cell read as text (``pd.read_csv``), then typed by :func:`parse_cell`."""
    try:
        frame = pd.read_csv(source, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        return []
    return [{k: parse_cell(v) for k, v in row.items()} for row in frame.to_dict('records')]


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
