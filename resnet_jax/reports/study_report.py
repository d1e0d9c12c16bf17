"""The report of a study (a grid or a search): trials, the best one, compute, plots.

    python -m resnet_jax.main --workdir runs/search --mode=report

writes into the workdir:

- ``trials.csv``: one row per trial: state, parameters, run folder, epochs
  trained, final validation and test accuracy, the epoch it was pruned at,
  images trained;
- ``history.csv``: trials in the order they ended, with the images trained so
  far and the best objective so far (how fast the study found its answer);
- ``importances.csv``: Optuna's parameter importances (fANOVA), once enough
  trials have completed;
- ``search.md``: the best trial and its parameters, selected on the study's
  metric, with its test accuracy as the held-out estimate; the compute spent
  next to what the full grid, or every trial trained to the end, would cost;
  and the trials table;
- ``history.png``, ``importances.png``, ``search_curves.png`` (the metric of
  every trial by epoch, pruned trials dashed).

``optuna-dashboard`` reads the same storage for an interactive view.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import pandas as pd

from resnet_jax.rundir import workdir as workdir_lib
from resnet_jax.studies import optuna_study, search_space

logger = logging.getLogger('resnet_jax')

TRIALS_CSV = 'trials.csv'
HISTORY_CSV = 'history.csv'
IMPORTANCES_CSV = 'importances.csv'
SEARCH_MD = 'search.md'
HISTORY_PNG = 'history.png'
IMPORTANCES_PNG = 'importances.png'
SEARCH_CURVES_PNG = 'search_curves.png'


def read_description(workdir: str) -> dict[str, Any]:
    """``workdir/search.json``, checked; :class:`workdir_lib.RecordError` naming it if
    it is missing or a field is missing or of the wrong type."""
    return workdir_lib.read_object(
        os.path.join(workdir, optuna_study.DESCRIPTION_FILE),
        search_space.DESCRIPTION_KINDS,
        search_space.DESCRIPTION_NEEDED,
    )


def load_study(workdir: str, described: Mapping[str, Any]) -> Any:
    """The study in its storage (read only)."""
    import optuna  # pylint: disable=g-import-not-at-top

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = described['storage']
    if '***' in url:  # Recorded without its password.
        url = os.environ.get('RESNET_JAX_STORAGE', '')
        if not url:
            raise search_space.SearchError(
                f'the study storage {described["storage"]} needs its password: set '
                'RESNET_JAX_STORAGE to the full URL'
            )
    url = optuna_study.storage_url(url, workdir)
    try:
        return optuna.load_study(study_name=described['study_name'], storage=url)
    except Exception as e:  # pylint: disable=broad-except  # Any driver error: one line.
        raise search_space.SearchError(
            f'cannot read study {described["study_name"]!r} from {search_space.redact(url)}: {e}'
        ) from None


def _run_numbers(workdir: str, name: str | None) -> dict[str, Any]:
    """Epochs trained, final metrics and training-set size of one run folder."""
    if not name:
        return {}
    run_dir = os.path.join(workdir, name)
    try:
        records = workdir_lib.read_metrics(run_dir)
        summary = workdir_lib.read_summary(os.path.join(run_dir, workdir_lib.SUMMARY_FILE)) or {}
    except workdir_lib.RecordError:  # Unreadable: reported as such.
        return {'run_status': 'unreadable'}
    last = records[-1] if records else {}
    data = summary.get('data') if isinstance(summary.get('data'), dict) else {}
    return {
        'epochs': len(records),
        'val_accuracy': last.get('val_accuracy'),
        'test_accuracy': last.get('test_accuracy'),
        'num_train': data.get('num_train'),
        'run_status': summary.get('status'),
        'pruned_at_epoch': summary.get('pruned_at_epoch'),
        'records': records,
    }


def read_runs(study: Any, workdir: str) -> dict[str | None, dict[str, Any]]:
    """The numbers and records of every run folder of the study, each read once
    (a retried trial shares its folder with the trial it retries)."""
    names = {optuna_study.trial_run(trial) for trial in study.get_trials(deepcopy=False)}
    return {name: _run_numbers(workdir, name) for name in names}


def trials_frame(
    study: Any, workdir: str, runs: Mapping[str | None, dict[str, Any]] | None = None
) -> pd.DataFrame:
    """One row per trial, with its run folder's numbers (``runs``: :func:`read_runs`)."""
    runs = read_runs(study, workdir) if runs is None else runs
    rows = []
    for trial in study.get_trials(deepcopy=False):
        name = optuna_study.trial_run(trial)
        numbers = runs[name]
        rows.append(
            {
                'trial': trial.number,
                'state': trial.state.name.lower(),
                **{f'param.{k}': v for k, v in trial.params.items()},
                'run': name,
                'run_status': numbers.get('run_status') or optuna_study.trial_status(trial),
                'epochs': numbers.get('epochs', 0),
                'pruned_at_epoch': numbers.get('pruned_at_epoch'),
                'value': trial.value,
                'val_accuracy': numbers.get('val_accuracy'),
                'test_accuracy': numbers.get('test_accuracy'),
                'num_train': numbers.get('num_train'),
                'retry_of': trial.system_attrs.get('failed_trial'),
                'ended': trial.datetime_complete,
            }
        )
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    num_train = frame['num_train'].dropna()
    fallback = int(num_train.iloc[0]) if len(num_train) else 0
    frame['num_train'] = frame['num_train'].fillna(fallback).astype(int)
    frame['images'] = frame['epochs'] * frame['num_train']
    return frame


def images_trained(trials: pd.DataFrame) -> int:
    """The images the study trained: each run folder counted once."""
    return int(trials.drop_duplicates('run')['images'].sum()) if len(trials) else 0


def history_frame(trials: pd.DataFrame, direction: str) -> pd.DataFrame:
    """Ended trials in the order they ended, with images so far and the best value so far.

    Images count each run folder once (a retried trial resumes its folder).
    """
    ended = trials[trials['ended'].notna()].sort_values('ended')
    seen: set[str] = set()
    images = []
    for run, count in zip(ended['run'], ended['images'], strict=True):
        images.append(0 if run in seen else int(count))
        seen.add(run)
    history = ended[['trial', 'state', 'run', 'value']].copy()
    history['images_so_far'] = pd.Series(images, index=ended.index).cumsum()
    completed = history['value'].where(history['state'] == 'complete')
    best = completed.cummax() if direction == 'maximize' else completed.cummin()
    history['best_so_far'] = best.ffill()
    return history.reset_index(drop=True)


def images_to_reach(history: pd.DataFrame, target: float, direction: str) -> int | None:
    """Images trained until the best value so far first reached ``target``; None if never."""
    reached = (
        history['best_so_far'] >= target
        if direction == 'maximize'
        else (history['best_so_far'] <= target)
    )
    hits = history.loc[reached.fillna(False), 'images_so_far']
    return int(hits.iloc[0]) if len(hits) else None


def importances(study: Any) -> pd.Series:
    """Optuna's fANOVA importances of the searched fields (empty if not yet computable)."""
    import optuna  # pylint: disable=g-import-not-at-top

    try:
        values = optuna.importance.get_param_importances(study)
    except Exception as e:  # pylint: disable=broad-except  # Too few or too alike trials.
        logger.info('parameter importances not computed: %s', e)
        return pd.Series(dtype=float)
    return pd.Series(values, name='importance').rename_axis('field')


def compute_table(
    trials: pd.DataFrame, described: Mapping[str, Any]
) -> list[tuple[str, int | None]]:
    """Images trained, next to the full grid or every trial trained to the end."""
    num_epochs = int(described['base_config'].get('num_epochs', 0))
    num_train = int(trials['num_train'].max()) if len(trials) else 0
    rows: list[tuple[str, int | None]] = [('images trained', images_trained(trials))]
    if described['grid']:
        rows.append(
            ('full grid, every point to the end', len(described['grid']) * num_epochs * num_train)
        )
    else:
        counted = int((trials['retry_of'].isna()).sum()) if len(trials) else 0
        rows.append(('every trial to the end', counted * num_epochs * num_train))
        choices = [p for p in described['params'] if p['type'] == 'categorical']
        if len(choices) == len(described['params']):
            size = 1
            for p in choices:
                size *= len(p['choices'])
            rows.append(('the full grid of this space', size * num_epochs * num_train))
    return rows


def best_trial(study: Any) -> Any | None:
    try:
        return study.best_trial
    except ValueError:  # No completed trial yet.
        return None


def _missing_best_folder(workdir: str, best: Any | None) -> str:
    """A warning when the best trial's run folder was deleted ('' if it is there)."""
    name = optuna_study.trial_run(best) if best is not None else None
    if not name or os.path.isdir(os.path.join(workdir, name)):
        return ''
    return (
        f'Warning: the run folder of the best trial, {name}, was deleted; its value comes '
        'from the study database alone (no checkpoint, metrics or test accuracy).'
    )


def _search_markdown(
    described: Mapping[str, Any],
    trials: pd.DataFrame,
    best: Any | None,
    compute: list[tuple[str, int | None]],
    imp: pd.Series,
    note: str = '',
) -> str:
    metric = described['metric']
    lines = [f'# Study {described["study_name"]}', '']
    sampler = described.get('sampler', 'grid')
    lines.append(
        f'{len(trials)} trials; sampler {sampler}, pruner {described.get("pruner", "none")}; '
        f'selected on {metric} ({described["direction"]}d).'
    )
    if metric.startswith('test_'):
        lines.append(
            'Selected on the test set (no validation split): its accuracy is not a '
            'held-out estimate. Set config.data.validation_size to select on validation.'
        )
    lines.append('')
    lines.append('## Best trial')
    lines.append('')
    if note:
        lines += [note, '']
    if best is None:
        lines.append('No trial has completed yet.')
    else:
        row = trials.loc[trials['trial'] == best.number].iloc[0]
        lines.append(f'Trial {best.number} (`{row["run"]}`): {metric} {best.value:.4f}.')
        if pd.notna(row['test_accuracy']) and not metric.startswith('test_'):
            lines.append(
                f'Its test accuracy, the held-out estimate: {100 * row["test_accuracy"]:.2f}%.'
            )
        lines.append('')
        lines.extend(f'- {k} = {v!r}' for k, v in best.params.items())
    lines += ['', '## Compute', '']
    compute_frame = pd.DataFrame(compute, columns=['', 'images'])
    compute_frame['images'] = compute_frame['images'].map(lambda n: f'{n:,}')
    lines.append(compute_frame.to_markdown(index=False))
    if len(imp):
        lines += ['', '## Parameter importances (fANOVA)', '']
        lines.append(imp.round(3).to_frame().to_markdown())
    lines += ['', '## Trials', '']
    shown = trials.drop(columns=['ended', 'num_train'])
    lines.append(shown.to_markdown(index=False, floatfmt='.4g'))
    return '\n'.join(lines) + '\n'


def _draw_plots(
    workdir: str,
    runs: Mapping[str | None, dict[str, Any]],
    trials: pd.DataFrame,
    history: pd.DataFrame,
    imp: pd.Series,
    metric: str,
) -> dict[str, str]:
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

    paths = {}
    if len(history):
        fig, ax = plt.subplots(figsize=(7, 4))
        done = history[history['state'] == 'complete']
        ax.scatter(done['images_so_far'], done['value'], s=14, label='completed trial')
        ax.step(history['images_so_far'], history['best_so_far'], where='post', label='best so far')
        ax.set_xlabel('images trained (all trials so far)')
        ax.set_ylabel(metric)
        ax.legend()
        ax.set_title('optimisation history')
        fig.tight_layout()
        paths['history'] = os.path.join(workdir, HISTORY_PNG)
        fig.savefig(paths['history'], dpi=120)
        plt.close(fig)
    if len(imp):
        fig, ax = plt.subplots(figsize=(6, 0.5 + 0.4 * len(imp)))
        imp.sort_values().plot.barh(ax=ax)
        ax.set_xlabel('importance (fANOVA)')
        fig.tight_layout()
        paths['importances'] = os.path.join(workdir, IMPORTANCES_PNG)
        fig.savefig(paths['importances'], dpi=120)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for _, row in trials.iterrows():
        records = runs.get(row['run'], {}).get('records') or []
        points = [(r['epoch'], r.get(metric)) for r in records if r.get(metric) is not None]
        if points:
            style = '--' if row['state'] == 'pruned' else '-'
            ax.plot(*zip(*points, strict=True), style, linewidth=1)
            drawn = True
    if drawn:
        ax.set_xlabel('epoch')
        ax.set_ylabel(metric)
        ax.set_title('trials by epoch (pruned: dashed)')
        fig.tight_layout()
        paths['search_curves'] = os.path.join(workdir, SEARCH_CURVES_PNG)
        fig.savefig(paths['search_curves'], dpi=120)
    plt.close(fig)
    return paths


def write_study_report(workdir: str) -> dict[str, str]:
    """Writes the study's report files into ``workdir``; returns ``{kind: path}``."""
    described = read_description(workdir)
    study = load_study(workdir, described)
    runs = read_runs(study, workdir)
    trials = trials_frame(study, workdir, runs)
    paths: dict[str, str] = {}
    if trials.empty:
        logger.info('study %s has no trials yet', described['study_name'])
        return paths
    history = history_frame(trials, described['direction'])
    imp = importances(study)
    best = best_trial(study)
    paths['trials'] = os.path.join(workdir, TRIALS_CSV)
    workdir_lib.write_atomic(paths['trials'], trials.to_csv(index=False))
    paths['history_csv'] = os.path.join(workdir, HISTORY_CSV)
    workdir_lib.write_atomic(paths['history_csv'], history.to_csv(index=False))
    if len(imp):
        paths['importances_csv'] = os.path.join(workdir, IMPORTANCES_CSV)
        workdir_lib.write_atomic(paths['importances_csv'], imp.to_frame().to_csv())
    note = _missing_best_folder(workdir, best)
    if note:
        logger.warning('%s', note)
    text = _search_markdown(described, trials, best, compute_table(trials, described), imp, note)
    paths['search'] = os.path.join(workdir, SEARCH_MD)
    workdir_lib.write_atomic(paths['search'], text)
    try:
        paths.update(_draw_plots(workdir, runs, trials, history, imp, described['metric']))
    except Exception as e:  # pylint: disable=broad-except  # Plots are extras.
        logger.warning('search plots not drawn: %s', e)
    return paths
