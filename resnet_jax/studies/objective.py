"""A run as the objective of an Optuna study that your own code drives.

::

    from resnet_jax.studies import objective, search_space

    space = {'learning_rate': search_space.float_param(1e-4, 0.1, log=True),
             'batch_size': search_space.categorical((100, 500))}
    fn = objective.make_objective(base_config, space, workdir='runs/my_study',
                                  metric='val_accuracy')
    study = optuna.create_study(direction=fn.direction, pruner=optuna.pruners.MedianPruner())
    study.optimize(fn, n_trials=20)

Each trial draws the fields of ``space`` (the entries of a ``config.search.space``
section: a dict, dotted names allowed, or a ConfigDict) and trains an ordinary
run into ``workdir/<folder name of its point>`` (:func:`sweep.run_name`, the
folder names studies use), reporting ``metric`` to the trial after every epoch so
that the study's pruner can stop it. The folder of a point that already finished
is not trained again (its recorded epochs are reported, its result returned); an
unfinished one resumes from its last checkpoint. The trial's outcome:

- completed: the run's final ``metric`` (from its ``summary.json``) is returned;
- pruned: :class:`optuna.TrialPruned` is raised (the trial is PRUNED);
- diverged (a loss or parameter stopped being finite): ``nan`` is returned, which
  Optuna records as a FAIL and the study goes on;
- failed (training raised): the failure is recorded in the folder's summary and
  the exception propagates; Optuna records a FAIL and re-raises it unless
  ``study.optimize(..., catch=(...))`` names it. An interrupt (SIGINT/SIGTERM)
  checkpoints the run and stops the study.

The trial's user attributes name its run folder (``run``) and record its
``run_status``, epochs, accuracies and error, as a study's trials do.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from resnet_jax import validation
from resnet_jax.rundir import locks
from resnet_jax.studies import preflight, run_folders, search_space
from resnet_jax.studies import trials as trials_lib

logger = logging.getLogger('resnet_jax')


class Objective:
    """Trains one run per trial of an Optuna study (see :func:`make_objective`)."""

    def __init__(self, spec: search_space.Spec, workdir: str, poll_seconds: float):
        self.spec, self.workdir, self.poll_seconds = spec, workdir, poll_seconds

    @property
    def metric(self) -> str:
        return self.spec.metric

    @property
    def direction(self) -> str:
        """The study's direction for the metric: ``'maximize'`` or ``'minimize'``."""
        return self.spec.direction

    def __call__(self, trial: Any) -> float:
        """Trains the trial's point; its final metric, ``nan`` if it diverged.

        Raises :class:`optuna.TrialPruned` for a pruned run, and the error of a run
        that failed; a study in the wrong direction is a :class:`SearchError`.
        """
        _check_direction(trial, self.spec)
        run = trials_lib.prepare(trial, self.spec, self.workdir)
        if run.error:
            trials_lib.record_outcome(trial, None, run.error)
            raise validation.ConfigError(run.error)
        on_epoch = trials_lib.epoch_reporter(trial, self.metric, run.config.num_epochs)
        summary = trials_lib.replay_finished(run, on_epoch)
        if summary is None:
            summary = self._train(run, on_epoch)
        return _outcome(run, summary, self.metric)

    def _train(
        self, run: trials_lib.TrialRun, on_epoch: Callable[[dict[str, Any]], bool]
    ) -> dict[str, Any]:
        """Trains ``run`` (waiting while another process trains its folder); its summary."""
        from resnet_jax.training import loop  # pylint: disable=g-import-not-at-top  # Heavy.

        logger.info('trial %d %s: training', run.trial.number, run.name)
        while True:
            try:
                _, summary = loop.train_and_evaluate(run.config, run.run_dir, on_epoch=on_epoch)
                return summary
            except locks.WorkdirBusy as e:  # The same point, drawn by another trial.
                logger.info('%s; waiting for it', e)
                time.sleep(self.poll_seconds)
                if (done := trials_lib.replay_finished(run, on_epoch)) is not None:
                    return done
            except Exception as e:
                message = trials_lib.failure_message(e)
                logger.error('trial %d %s failed: %s', run.trial.number, run.name, message)
                run_folders.record_failure(run.run_dir, run.config, message)
                trials_lib.record_outcome(run.trial, None, message)
                raise


def make_objective(
    base_config: ml_collections.ConfigDict,
    space: Mapping[str, Any] | ml_collections.ConfigDict,
    workdir: str,
    metric: str = 'val_accuracy',
    *,
    poll_seconds: float = 5.0,
) -> Objective:
    """An Optuna objective that trains ``base_config`` with the trial's draw of ``space``.

    ``space`` maps config fields (nested sections or dotted names) to
    :func:`search_space.float_param`, :func:`~search_space.int_param` or
    :func:`~search_space.categorical` entries. ``metric`` is a per-epoch metric of
    :data:`search_space.METRICS`; create the study with ``direction=fn.direction``.
    A ``search`` section of ``base_config`` is ignored. Checked once, up front:
    the config, every field of the space, the metric (a ``val_`` metric needs
    ``config.data.validation_size``) and that every batch size the space can
    draw fits the data; the first problem raises :class:`ConfigError`
    (:class:`SearchError` for the space or metric) or :class:`DataError`.
    A trial whose folder is being trained by another process waits for it,
    checking every ``poll_seconds``.
    """
    if 'sweep' in base_config:
        raise search_space.SearchError(
            'make_objective trains one run per trial: remove the sweep section of the config '
            '(the trials draw from the space)'
        )
    config = ml_collections.ConfigDict(base_config.to_dict())
    section = ml_collections.ConfigDict(dict(search_space.SEARCH_DEFAULTS, metric=metric))
    section.space = _space_section(space)
    config.search = section
    spec = search_space.spec_from_config(config)
    preflight.check_data(spec)
    return Objective(spec, os.fspath(workdir), poll_seconds)


def _space_section(space: Any) -> ml_collections.ConfigDict:
    """``space`` as a ``config.search.space`` section (dotted names as nested sections)."""
    if isinstance(space, ml_collections.ConfigDict):
        return space
    if not isinstance(space, Mapping):
        raise search_space.SearchError(
            f'the space must map config fields to search_space entries, got {space!r}'
        )
    nested: dict[str, Any] = {}
    for name, node in space.items():
        if not isinstance(name, str) or not all(name.split('.')):
            raise search_space.SearchError(f'the space has a bad field name {name!r}')
        *sections, field = name.split('.')
        where = nested
        for part in sections:
            where = where.setdefault(part, {})
            if not isinstance(where, dict):
                raise search_space.SearchError(
                    f'the space names {part} both as a field and a section'
                )
        where[field] = node
    return ml_collections.ConfigDict(nested)


def _check_direction(trial: Any, spec: search_space.Spec) -> None:
    """A study that optimises the metric the wrong way is an error (before anything trains)."""
    try:
        direction = trial.study.direction.name.lower()
    except (AttributeError, RuntimeError):  # Not a study's trial, or several objectives.
        return
    if direction != spec.direction:
        raise search_space.SearchError(
            f'the study is to {direction}, but {spec.metric} is to be {spec.direction}d: create '
            f'it with optuna.create_study(direction={spec.direction!r})'
        )


def _outcome(run: trials_lib.TrialRun, summary: Mapping[str, Any], metric: str) -> float:
    """The trial's value: the final metric of a completed run, ``nan`` for a diverged one."""
    import optuna  # pylint: disable=g-import-not-at-top

    status, error = trials_lib.record_outcome(run.trial, summary)
    value = summary.get(metric)
    if status == 'pruned':
        logger.info('trial %d %s: pruned', run.trial.number, run.name)
        raise optuna.TrialPruned(f'{run.name}: pruned at epoch {summary.get("pruned_at_epoch")}')
    if status == 'completed' and validation.is_finite_number(value):
        logger.info('trial %d %s: completed (%s %.4f)', run.trial.number, run.name, metric, value)
        return float(value)
    detail = f' ({error})' if error else ''
    logger.warning(
        'trial %d %s: %s%s: its value is nan', run.trial.number, run.name, status, detail
    )
    return math.nan
