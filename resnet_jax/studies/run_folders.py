"""The run folder of a study's trial: the point it holds, whether it already finished.

Every trial trains in ``workdir/<folder name of its point>``
(:func:`sweep.run_name`), an ordinary run folder. Besides what a run
writes there, ``overrides.json`` records the fields the point sets, so that a
folder is never trained for another point; a run that could not train records
its failure in the folder's ``summary.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from typing import Any

import ml_collections

from resnet_jax import validation
from resnet_jax.rundir import workdir as workdir_lib
from resnet_jax.studies import search_space
from resnet_jax.training import checks

OVERRIDES_FILE = 'overrides.json'  # The fields a run folder's point sets.


def apply_overrides(
    base: ml_collections.ConfigDict, overrides: Mapping[str, Any]
) -> ml_collections.ConfigDict:
    """A validated copy of ``base`` with ``overrides`` set (``ConfigError`` if invalid)."""
    config = ml_collections.ConfigDict(base.to_dict())
    for field, value in overrides.items():
        try:
            validation.set_field(config, field, value)
        except TypeError as e:
            raise validation.ConfigError(f'{field}={value!r}: {e}') from None
    checks.validate_config(config)
    return config


def check_overrides(run_dir: str, overrides: Mapping[str, Any]) -> None:
    """Records the point a run folder holds; a folder holding another point is an error."""
    path = os.path.join(run_dir, OVERRIDES_FILE)
    wanted = workdir_lib.json_safe(dict(overrides))
    if os.path.exists(path):
        found = workdir_lib.read_json_object(path)
        if found is None:
            raise search_space.SearchError(f'{path} is not a JSON object; remove it or the folder')
        if found != json.loads(json.dumps(wanted)):
            raise search_space.SearchError(
                f'{run_dir} holds the point {found}, not {wanted}; move it away to train here'
            )
        return
    os.makedirs(run_dir, exist_ok=True)
    workdir_lib.write_json(path, wanted)


def finished_summary(run_dir: str, config: ml_collections.ConfigDict) -> dict[str, Any] | None:
    """The summary of ``run_dir`` if it already finished ``config``, else None.

    Completed means trained to this config's ``num_epochs`` (a larger one resumes
    the run); fields that do not change a run's result may differ.
    """
    summary = workdir_lib.read_json_object(os.path.join(run_dir, workdir_lib.SUMMARY_FILE))
    if not summary or not isinstance(summary.get('config'), dict):
        return None
    status = summary.get('status')
    if status not in ('completed', 'pruned', 'diverged'):
        return None
    if workdir_lib.config_differences(summary['config'], workdir_lib.config_json(config)):
        return None
    if status == 'completed' and summary.get('epochs_completed') != config.num_epochs:
        return None
    return summary


def record_failure(run_dir: str, config: ml_collections.ConfigDict | None, message: str) -> None:
    """Records a run that could not train in its folder's summary (with ``config`` if known)."""
    path = os.path.join(run_dir, workdir_lib.SUMMARY_FILE)
    try:
        summary = workdir_lib.read_summary(path) or {}
    except workdir_lib.RecordError:
        return  # A malformed summary is kept as it is: the error names it.
    if config is not None:
        summary['config'] = workdir_lib.config_json(config)
    summary.update(status='failed', error=message)
    with contextlib.suppress(OSError):
        workdir_lib.write_json(path, summary)
