"""A run as the objective of the user's own Optuna loop (studies/objective.py): trials
train run folders and return their summaries' metric, the pruner stops them through
``optuna.TrialPruned``, a diverged run is nan and a failed one raises, and a bad space
or metric is one error before anything trains."""

import json
import os

import ml_collections
import optuna
import pytest

from resnet_jax import validation
from resnet_jax.studies import objective, search_space
from tests import fake_data
from tests.conftest import make_tiny_config

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope='module')
def learnable(tmp_path_factory) -> fake_data.FakeCifar:
    """A fake CIFAR-10 (python version) whose classes a model learns: 200 train + 50 test."""
    root = tmp_path_factory.mktemp('learnable')
    return fake_data.write_cifar_py(root, n_train_per_batch=40, n_test=50, learnable=True)


def base_config(data_path: str, epochs: int = 2) -> ml_collections.ConfigDict:
    """A tiny run: 40 images held out, batches of 20, a whole epoch per compiled call."""
    config = make_tiny_config(data_path)
    config.num_epochs = epochs
    config.batch_size = 20
    config.eval_batch_size = 50
    config.steps_per_call = 0
    config.decay_every_epochs = 10
    config.data.validation_size = 40
    return config


SPACE = {'learning_rate': search_space.categorical((0.003, 0.01))}


def summary_of(run_dir) -> dict:
    with open(os.path.join(run_dir, 'summary.json')) as f:
        return json.load(f)


def records(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f if line.strip()]


def study_of(points, **options) -> optuna.Study:
    """A study in memory whose trials draw ``points`` (overrides) in order."""
    study = optuna.create_study(**options)
    for point in points:
        study.enqueue_trial(point)
    return study


# ------------------------------------------------------------- errors ----


@pytest.mark.parametrize(
    'space, metric, validation_size, fragment',
    [
        ({'learnin_rate': search_space.float_param(1e-3, 0.1)}, 'val_accuracy', 40, 'no field'),
        ({'learning_rate': search_space.float_param(0.1, 1e-3)}, 'val_accuracy', 40, 'greater'),
        ({'learning_rate': 0.1}, 'val_accuracy', 40, 'must be a search_space'),
        ({}, 'val_accuracy', 40, 'is empty'),
        (SPACE, 'val_acc', 40, 'is unknown'),
        (SPACE, 'val_accuracy', 0, 'needs a validation split'),
        ({'batch_size': search_space.categorical((20, 1000))}, 'val_accuracy', 40, 'batch'),
    ],
)
def test_a_bad_space_or_metric_is_one_error_before_anything(
    tmp_path, learnable, space, metric, validation_size, fragment
):
    config = base_config(learnable.path)
    config.data.validation_size = validation_size
    with pytest.raises(validation.ConfigError) as e:
        objective.make_objective(config, space, str(tmp_path / 'study'), metric=metric)
    assert fragment in str(e.value)
    assert not (tmp_path / 'study').exists()


def test_a_dotted_space_is_nested_fields(learnable, tmp_path):
    space = {'data.pad': search_space.int_param(0, 4), **SPACE}
    fn = objective.make_objective(base_config(learnable.path), space, str(tmp_path))
    assert sorted(p.name for p in fn.spec.params) == ['data.pad', 'learning_rate']
    assert fn.direction == 'maximize' and fn.metric == 'val_accuracy'


def test_a_study_in_the_wrong_direction_fails_before_anything(learnable, tmp_path):
    workdir = tmp_path / 'study'
    fn = objective.make_objective(base_config(learnable.path), SPACE, str(workdir))
    study = optuna.create_study()  # Minimises: val_accuracy is maximised.
    with pytest.raises(search_space.SearchError, match="direction='maximize'"):
        study.optimize(fn, n_trials=1)
    assert study.trials[0].state == optuna.trial.TrialState.FAIL
    assert not workdir.exists()


# ------------------------------------------- diverged and failed runs ----


def fake_training(monkeypatch, outcome):
    """``train_and_evaluate`` returns ``outcome`` (a summary) or raises it (an exception)."""
    from resnet_jax.training import loop

    def train(config, workdir, **kwargs):
        os.makedirs(workdir, exist_ok=True)
        if isinstance(outcome, Exception):
            raise outcome
        return None, outcome

    monkeypatch.setattr(loop, 'train_and_evaluate', train)


def test_a_diverged_run_is_nan_and_the_study_goes_on(monkeypatch, learnable, tmp_path):
    fake_training(monkeypatch, {'status': 'diverged', 'error': 'the loss is nan at epoch 1'})
    fn = objective.make_objective(base_config(learnable.path), SPACE, str(tmp_path))
    study = study_of([{'learning_rate': 0.01}], direction='maximize')
    study.optimize(fn, n_trials=1)
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.FAIL
    assert trial.user_attrs['run'] == 'learning_rate=0.01'
    assert trial.user_attrs['run_status'] == 'diverged'
    assert 'nan at epoch 1' in trial.user_attrs['error']


def test_a_failed_run_raises_and_is_recorded_in_its_folder(monkeypatch, learnable, tmp_path):
    fake_training(monkeypatch, RuntimeError('the device is gone'))
    fn = objective.make_objective(base_config(learnable.path), SPACE, str(tmp_path))
    study = study_of([{'learning_rate': 0.01}] * 2, direction='maximize')
    with pytest.raises(RuntimeError, match='the device is gone'):
        study.optimize(fn, n_trials=1)
    study.optimize(fn, n_trials=1, catch=(RuntimeError,))  # Recorded, and the loop goes on.
    assert [t.state.name for t in study.trials] == ['FAIL', 'FAIL']
    summary = summary_of(tmp_path / 'learning_rate=0.01')
    assert summary['status'] == 'failed'
    assert summary['error'] == 'RuntimeError: the device is gone'
    assert study.trials[1].user_attrs['run_status'] == 'failed'


# ------------------------------------------------------------ training ----


@pytest.mark.usefixtures('training')
def test_trials_train_run_folders_and_return_their_metric(learnable, tmp_path):
    workdir = tmp_path / 'study'
    fn = objective.make_objective(base_config(learnable.path), SPACE, str(workdir))
    points = [{'learning_rate': 0.003}, {'learning_rate': 0.01}, {'learning_rate': 0.003}]
    study = study_of(points, direction=fn.direction)
    study.optimize(fn, n_trials=3)
    assert sorted(os.listdir(workdir)) == ['learning_rate=0.003', 'learning_rate=0.01']
    trained = (workdir / 'learning_rate=0.003' / 'metrics.jsonl').stat().st_mtime_ns
    for trial in study.trials:
        run_dir = workdir / trial.user_attrs['run']
        summary = summary_of(run_dir)
        assert trial.state == optuna.trial.TrialState.COMPLETE
        assert summary['status'] == 'completed' == trial.user_attrs['run_status']
        assert trial.value == summary['val_accuracy']
        assert trial.intermediate_values == {
            r['epoch']: r['val_accuracy'] for r in records(run_dir)
        }
    # The third trial drew a finished point: its folder was not trained again.
    assert study.trials[2].value == study.trials[0].value
    assert (workdir / 'learning_rate=0.003' / 'metrics.jsonl').stat().st_mtime_ns == trained
    assert len(records(workdir / 'learning_rate=0.003')) == 2


@pytest.mark.usefixtures('training')
def test_a_pruned_run_is_a_pruned_trial(learnable, tmp_path):
    workdir = tmp_path / 'study'
    fn = objective.make_objective(base_config(learnable.path, epochs=3), SPACE, str(workdir))
    pruner = optuna.pruners.ThresholdPruner(lower=1.5)  # No accuracy reaches it.
    study = study_of([{'learning_rate': 0.01}] * 2, direction='maximize', pruner=pruner)
    study.optimize(fn, n_trials=1)
    trial = study.trials[0]  # The second waits.
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert trial.user_attrs['run'] == 'learning_rate=0.01'
    assert trial.user_attrs['run_status'] == 'pruned'
    summary = summary_of(workdir / 'learning_rate=0.01')
    assert summary['status'] == 'pruned' and summary['pruned_at_epoch'] == 1
    assert list(trial.intermediate_values) == [1]
    # The same point again: the pruned folder is the trial's outcome, not trained again.
    study.optimize(fn, n_trials=1)
    assert [t.state.name for t in study.trials] == ['PRUNED', 'PRUNED']
    assert len(records(workdir / 'learning_rate=0.01')) == 1
