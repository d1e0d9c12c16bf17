"""Statistics over seeds: estimates with Student t intervals, cells, paired differences.

    e = stats.estimate([0.81, 0.83, 0.82])      # n, mean, sd, 95% t interval
    cells = stats.group_cells(results)          # runs differing only in their seed
    pairs = stats.paired_differences(results, 'shuffle', (True, False))

Intervals and quantiles come from ``scipy.stats``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

from resnet_jax.reports.load import PROBLEM_STATUSES, RunResult, format_cell
from resnet_jax.validation import get_field

SEED_AXIS = 'seed'  # Runs differing only in it form a cell of the statistics over seeds.


CONFIDENCE = 0.95  # Of every interval of the report.


def t_quantile(df: int, probability: float = 0.975) -> float:
    """The ``probability`` quantile (>= 0.5) of Student's t with ``df`` degrees of
    freedom: 12.706 for df 1, 2.262 for df 9, tending to the normal 1.960."""
    if not isinstance(df, int) or df < 1 or not 0.5 <= probability < 1:
        raise ValueError(
            f't_quantile needs an integer df >= 1 and 0.5 <= p < 1, got {df}, {probability}'
        )
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
    """Mean, sample sd (ddof=1) and 95% Student t interval of ``values``
    (``scipy.stats.t.interval`` around the mean, scaled by the standard error)."""
    xs = np.array([float(v) for v in values])
    if not xs.size:
        return Estimate(0)
    mean = float(np.mean(xs))
    if xs.size == 1:
        return Estimate(1, mean)
    sd = float(np.std(xs, ddof=1))
    if sd == 0:  # (scipy wants a positive scale.)
        return Estimate(xs.size, mean, sd, mean, mean)
    low, high = stats.t.interval(CONFIDENCE, xs.size - 1, loc=mean, scale=stats.sem(xs))
    return Estimate(xs.size, mean, sd, float(low), float(high))


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
        """How many runs failed or diverged (left out of the statistics)."""
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
    """Paired differences (first minus second level, as fractions) of final test accuracy:
    one per seed of the cell ``values`` ({} for all cells) where both runs completed;
    ``unpaired`` counts the seeds where a run is missing, unfinished, failed or diverged."""

    axis: str
    levels: tuple[Any, Any]
    values: dict[str, Any]
    differences: tuple[float, ...]
    unpaired: int = 0

    @property
    def estimate(self) -> Estimate:
        """Mean difference with its 95% t interval over the pairs (the paired t-test's)."""
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
                if same_value(r.overrides[axis], value):
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


def same_value(a: Any, b: Any) -> bool:
    if isinstance(a, float | int) and isinstance(b, float | int) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    return a == b


def matches(config: Mapping[str, Any], values: Mapping[str, Any]) -> bool:
    """Whether ``config`` has the (dotted) fields ``values`` (numbers to a tolerance)."""
    return all(same_value(get_field(config, k, None), v) for k, v in values.items())
