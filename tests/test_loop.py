"""End to end: outputs of a run, resume equivalence, restore and evaluation."""

import glob
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from resnet_jax.datasets import augment
from resnet_jax.rundir import workdir as workdir_lib
from resnet_jax.rundir import writers
from resnet_jax.training import checkpoints, loop, steps, train
from tests.conftest import (
    assert_within_float_noise,
    make_tiny_config,
    read_hparams,
    train_nudged,
)

COMPARED = ('train_loss', 'train_accuracy', 'test_loss', 'test_accuracy', 'learning_rate')


# A record's fields without a validation split: the val_ ones are left out.
NO_SPLIT_KEYS = tuple(k for k in train.METRIC_KEYS if not k.startswith('val_'))


@pytest.fixture(scope='module')
def finished_run(training, tmp_path_factory, cifar_py):
    """One uninterrupted 3-epoch run, shared by the tests of this module."""
    c = make_tiny_config(cifar_py.path)
    workdir = str(tmp_path_factory.mktemp('run'))
    state, summary = training.train_and_evaluate(c, workdir)
    return c, workdir, state, summary


def test_run_writes_every_output(finished_run):
    config, workdir, state, summary = finished_run
    records = workdir_lib.read_metrics(workdir)
    assert [r['epoch'] for r in records] == [1, 2, 3]
    for r in records:
        assert tuple(k for k in r if k != 'compile_seconds') == NO_SPLIT_KEYS
        assert 0 <= r['train_accuracy'] <= 1 and 0 <= r['test_accuracy'] <= 1
        assert np.isfinite(r['train_loss']) and r['images_per_second'] > 0
    # /2 every epoch, reported for each epoch.
    assert [r['learning_rate'] for r in records] == pytest.approx([0.01, 0.005, 0.0025])
    with open(os.path.join(workdir, 'summary.json')) as f:
        on_disk = json.load(f)
    assert on_disk['status'] == 'completed'
    assert on_disk['num_params'] == 195_738
    assert on_disk['test_accuracy'] == records[-1]['test_accuracy']
    assert on_disk['best_test_accuracy'] == max(r['test_accuracy'] for r in records)
    assert on_disk['config']['batch_size'] == 32 and on_disk['wall_seconds'] > 0
    assert int(state.step) == 3 * 4  # 120 images / 32: 3 full batches + 1 of 24.
    assert glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))
    # Named by global step: 4 steps per epoch.
    assert sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints'))) == [4, 8, 12]


def test_tensorboard_file_holds_the_scalars(finished_run):
    from tensorboard.backend.event_processing import event_accumulator

    _, workdir, _, _ = finished_run
    acc = event_accumulator.EventAccumulator(workdir)
    acc.Reload()
    assert set(NO_SPLIT_KEYS[1:]) <= set(acc.Tags()['scalars'])
    steps = [e.step for e in acc.Scalars('test_accuracy')]
    assert steps == [1, 2, 3]
    # The HParams tab: the config's scalars and the final accuracies.
    hp = event_accumulator.EventAccumulator(os.path.join(workdir, 'hparams'))
    hp.Reload()
    final = hp.Scalars('hparam/test_accuracy')[-1].value
    assert final == pytest.approx(workdir_lib.read_metrics(workdir)[-1]['test_accuracy'])
    found = read_hparams(workdir)
    assert found['hparams']['learning_rate'] == 0.01 and found['hparams']['num_epochs'] == 3
    assert found['hparams']['status'] == 'completed' and found['status'] == 'STATUS_SUCCESS'
    # Fields that do not change the result are no hyperparameters.
    assert not [k for k in found['hparams'] if k.startswith('distributed.')]
    assert not {'progress_every_seconds', 'eval_batch_size', 'data.path'} & set(found['hparams'])
    # Without a validation split: no val_ metric (none written as NaN either).
    assert set(found['metrics']) == {
        f'hparam/{k}'
        for k in ('train_loss', 'train_accuracy', 'test_loss', 'test_accuracy')
        + ('best_test_accuracy', 'epochs_completed')
    }
    assert found['metrics']['hparam/epochs_completed'] == 3


def test_a_pruned_run_gets_its_hparams_once(training, cifar_py, tmp_path):
    config = make_tiny_config(cifar_py.path)
    config.num_epochs = 2
    _, summary = training.train_and_evaluate(config, str(tmp_path), on_epoch=lambda r: True)
    assert summary['status'] == 'pruned' and summary['pruned_at_epoch'] == 1
    found = read_hparams(tmp_path)
    assert found['hparams']['status'] == 'pruned'
    assert found['metrics']['hparam/epochs_completed'] == 1
    files = os.listdir(tmp_path / 'hparams')
    # A rerun prunes it again at its restored record: the same end, not written again.
    _, again = training.train_and_evaluate(config, str(tmp_path), on_epoch=lambda r: True)
    assert again['status'] == 'pruned' and os.listdir(tmp_path / 'hparams') == files


def test_a_run_can_evaluate_the_test_set_only_at_its_end(training, finished_run, tmp_path):
    """config.eval_test='end': the same training, the test set once, after the last
    epoch; the records before it, TensorBoard and the console say nothing of it."""
    config, reference, _, reference_summary = finished_run
    config = ml_collections.ConfigDict(config.to_dict())
    config.eval_test = 'end'
    workdir = str(tmp_path / 'end')
    _, summary = training.train_and_evaluate(config, workdir)
    records, every = workdir_lib.read_metrics(workdir), workdir_lib.read_metrics(reference)
    assert ['test_accuracy' in r for r in records] == [False, False, True]
    assert records[-1]['test_accuracy'] == every[-1]['test_accuracy']
    assert summary['test_accuracy'] == reference_summary['test_accuracy']
    assert summary['best_test_accuracy'] == summary['test_accuracy']
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(workdir)
    acc.Reload()
    assert [e.step for e in acc.Scalars('test_accuracy')] == [3]
    assert [e.step for e in acc.Scalars('train_accuracy')] == [1, 2, 3]


def test_eval_counts_every_test_image_once(finished_run, cifar_py):
    """Test accuracy equals a plain numpy count over all 50 test images."""
    config, workdir, _, summary = finished_run
    model, variables, restored_config = checkpoints.restore(workdir)
    assert restored_config.batch_size == 32
    x = augment.to_float(jnp.asarray(cifar_py.test_images))
    logits = model.apply(variables, x, train=False)
    correct = (np.asarray(logits).argmax(-1) == cifar_py.test_labels).sum()
    assert summary['test_accuracy'] == pytest.approx(correct / 50, abs=1e-6)
    result = loop.evaluate_workdir(workdir)
    assert result['accuracy'] == pytest.approx(correct / 50, abs=1e-6)


def test_resume_ends_like_an_uninterrupted_run(
    training, finished_run, cifar_py, tmp_path, monkeypatch
):
    config, _, full_state, _ = finished_run
    workdir = str(tmp_path)
    real_write = writers.MetricLogger.write

    def write_then_die(self, record):
        if record['epoch'] == 3:
            raise KeyboardInterrupt  # Killed after epoch 2's checkpoint.
        real_write(self, record)

    monkeypatch.setattr(writers.MetricLogger, 'write', write_then_die)
    with pytest.raises(KeyboardInterrupt):
        training.train_and_evaluate(make_tiny_config(cifar_py.path), workdir)
    assert [r['epoch'] for r in workdir_lib.read_metrics(workdir)] == [1, 2]
    monkeypatch.setattr(writers.MetricLogger, 'write', real_write)

    state, summary = training.train_and_evaluate(make_tiny_config(cifar_py.path), workdir)
    resumed = workdir_lib.read_metrics(workdir)
    full = workdir_lib.read_metrics(finished_run[1])
    assert [r['epoch'] for r in resumed] == [1, 2, 3]
    for a, b in zip(resumed, full, strict=True):
        assert {k: a[k] for k in COMPARED} == {k: b[k] for k in COMPARED}
    jax.tree_util.tree_map(np.testing.assert_array_equal, state.params, full_state.params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, state.batch_stats, full_state.batch_stats)


def test_rerunning_a_finished_run_trains_nothing(training, finished_run, cifar_py):
    _, workdir, state, summary = finished_run
    again, summary2 = training.train_and_evaluate(make_tiny_config(cifar_py.path), workdir)
    assert int(again.step) == int(state.step)
    assert summary2['test_accuracy'] == summary['test_accuracy']
    assert len(workdir_lib.read_metrics(workdir)) == 3


@pytest.fixture(scope='module')
def sgd_step_by_step(training, tmp_path_factory, cifar_py):
    """The tiny run with plain SGD, step by step: the reference for scanned steps."""
    workdir = str(tmp_path_factory.mktemp('sgd'))
    training.train_and_evaluate(_sgd(make_tiny_config(cifar_py.path)), workdir)
    return workdir_lib.read_metrics(workdir)


def _sgd(config):
    # SGD at a small rate: Adam's first steps (about lr * sign(g)) would amplify the
    # float noise between two compilations of the same step into visible differences.
    config.optimizer, config.learning_rate = 'sgd', 0.01
    return config


@pytest.mark.parametrize('steps_per_call', [0])  # 0: one call per epoch's full batches.
def test_scanned_steps_match_the_step_path(
    training, steps_per_call, sgd_step_by_step, cifar_py, tmp_path, monkeypatch
):
    """Several steps per compiled call (lax.scan): same results, compiled once."""
    config = _sgd(make_tiny_config(cifar_py.path))
    config.steps_per_call = steps_per_call
    cache_sizes = []
    real_write = writers.MetricLogger.write

    def write(self, record):
        cache_sizes.append(steps.scan_updates.single._cache_size())
        real_write(self, record)

    monkeypatch.setattr(writers.MetricLogger, 'write', write)
    training.train_and_evaluate(config, str(tmp_path / 'scanned'))
    assert cache_sizes[0] >= 1 and cache_sizes == cache_sizes[:1] * 3  # No recompiles.
    scanned = workdir_lib.read_metrics(str(tmp_path / 'scanned'))
    # Another compilation of the same steps: float noise of 3 epochs of 4 steps, and
    # one of the 50 test images may flip.
    nudged = train_nudged(training, _sgd(make_tiny_config(cifar_py.path)), tmp_path / 'nudged')
    assert_within_float_noise(scanned, sgd_step_by_step, nudged, 12, COMPARED, flip=1 / 50)


def test_chunks_of_an_epoch():
    assert steps.call_chunks([32, 32, 32, 24], 0, 1) == [
        (0, 32, 1),
        (1, 32, 1),
        (2, 32, 1),
        (3, 24, 1),
    ]
    assert steps.call_chunks([32, 32, 32, 24], 0, 2) == [(0, 32, 2), (2, 32, 1), (3, 24, 1)]
    assert steps.call_chunks([32, 32, 32, 24], 1, 0) == [(1, 32, 2), (3, 24, 1)]
    assert steps.call_chunks([100] * 500, 0, 50) == [(i, 100, 50) for i in range(0, 500, 50)]


def test_bfloat16_computes_in_bf16_and_keeps_float32_state(training, cifar_py, tmp_path):
    config = make_tiny_config(cifar_py.path)
    config.dtype, config.num_epochs = 'bfloat16', 1
    config.data.train_subset = 64  # Two full batches: one program.
    state, summary = training.train_and_evaluate(config, str(tmp_path))
    leaves = jax.tree_util.tree_leaves((state.params, state.batch_stats, state.opt_state))
    assert {x.dtype for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)} == {
        np.dtype('float32')
    }
    assert summary['status'] == 'completed' and np.isfinite(summary['train_loss'])
    hlo = jax.jit(lambda v, x: state.apply_fn(v, x, train=False)).lower(
        state.variables(), jnp.zeros((2, 32, 32, 3))
    )
    assert 'bf16' in hlo.as_text()  # The convolutions run in bfloat16.
