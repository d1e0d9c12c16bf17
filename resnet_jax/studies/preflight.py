"""What every trial of a study shares, checked once before the first trial.

A single run checks that its config fits its data once the data is loaded
(:func:`resnet_jax.training.checks.check_data_fits`). A study checks the same
before it creates anything, so that a config that cannot fit the data is one
error line rather than a failed trial each (and a study database that refuses
the corrected config): a search for every batch size its space can draw, a grid
for its points, refusing only when none of them fits (a grid lists its points
one by one: a point that cannot fit fails alone, as its own run).
"""

from __future__ import annotations

from resnet_jax import datasets, validation
from resnet_jax.studies import run_folders, search_space
from resnet_jax.training import checks

BATCH_FIELD = 'batch_size'


def batch_sizes(spec: search_space.Spec) -> list[int]:
    """Every batch size a trial of ``spec`` can train with, largest first."""
    base = spec.base.batch_size
    if spec.grid:
        sizes = {point.get(BATCH_FIELD, base) for point in spec.grid}
    else:
        searched = [p for p in spec.params if p.name == BATCH_FIELD]
        sizes = set() if any(p.when is None for p in searched) else {base}
        for p in searched:
            sizes |= set(p.choices) if p.type == 'categorical' else {int(p.high)}
    return sorted((s for s in sizes if isinstance(s, int)), reverse=True)


def check_data(spec: search_space.Spec) -> None:
    """:class:`ConfigError` or :class:`DataError` if a trial of ``spec`` cannot fit its data.

    Loads the study's data (a split larger than the data is a ``DataError``; the
    trials then reuse what was loaded) and checks each batch size the study can
    draw. The device count is left to each trial: a worker's devices are its own.
    """
    if spec.grid:
        _check_grid(spec)
        return
    data = datasets.load_for_config(spec.base)
    for size in batch_sizes(spec):
        config = run_folders.apply_overrides(spec.base, {BATCH_FIELD: size})
        checks.check_data_fits(config, data, num_devices=1)


def _check_grid(spec: search_space.Spec) -> None:
    """The first point's error if no point of the grid fits its data."""
    first_error: Exception | None = None
    for point in spec.grid:
        config = run_folders.apply_overrides(spec.base, point)
        try:
            checks.check_data_fits(config, datasets.load_for_config(config), num_devices=1)
        except (validation.ConfigError, datasets.DataError) as e:
            first_error = first_error or e
        else:
            return
    if first_error is not None:
        raise first_error
