"""Checkpoints: save and restore a train state, older layouts, unreadable checkpoints.

Unit tests of resnet_jax/checkpoints.py on a freshly initialised state (no
training); what a whole run does with a corrupt checkpoint is in test_recovery.py.
"""

import errno
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnet_jax.rundir import workdir
from resnet_jax.training import checkpoints, optim, train
from tests.conftest import corrupt_checkpoint_arrays, make_tiny_config


@pytest.fixture(scope='module')
def state():
    """The tiny config's initial state (2 steps per epoch)."""
    return train.create_train_state(make_tiny_config(''), jax.random.PRNGKey(0), 2)


def _assert_same_tree(a, b):
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_save_and_restore_round_trip_with_meta_and_running_metrics(state, tmp_path):
    moved = state.replace(
        step=jnp.int32(3),
        params=jax.tree_util.tree_map(lambda x: x + 1, state.params),
        rng=jax.random.PRNGKey(9),
    )
    metrics = train.TrainMetrics.single_from_model_output(
        loss=jnp.array([1.0, 3.0]),
        logits=jnp.array([[1.0, 0.0], [0.0, 1.0]]),
        labels=jnp.array([0, 0]),
        grad_norm=jnp.float32(0.5),
    )
    manager = checkpoints.checkpoint_manager(str(tmp_path))
    checkpoints.save(manager, moved, {'epoch': 1, 'position': 1}, metrics)
    restored, meta, running = checkpoints.restore_state(manager, state)
    manager.close()
    assert os.listdir(tmp_path / 'checkpoints') == ['3']  # Named by global step.
    assert meta == {'epoch': 1, 'position': 1}
    assert int(restored.step) == 3
    _assert_same_tree(restored.params, moved.params)
    _assert_same_tree(restored.opt_state, moved.opt_state)
    np.testing.assert_array_equal(restored.rng, moved.rng)
    assert running.compute() == pytest.approx({'loss': 2.0, 'accuracy': 0.5, 'grad_norm': 0.5})
    assert restored.apply_fn is state.apply_fn and restored.tx is state.tx


def test_a_step_saved_again_replaces_the_earlier_save(state, tmp_path):
    manager = checkpoints.checkpoint_manager(str(tmp_path))
    checkpoints.save(manager, state, {'epoch': 0, 'position': 1})
    checkpoints.save(manager, state, {'epoch': 0, 'position': 2})  # Superseded: same step.
    _, meta, running = checkpoints.restore_state(manager, state)
    manager.close()
    assert meta['position'] == 2 and manager.all_steps() == [0]
    assert float(running.loss.count) == float(running.accuracy.count) == 0  # No batch yet.


def _schedule_inside(config, steps_per_epoch, learning_rate=None):
    """The optimiser chain of checkpoints written before the learning rate was
    optimiser state: the schedule inside it (with its own step count)."""
    schedule = optim.create_learning_rate_schedule(config, steps_per_epoch, learning_rate)
    return optim.OPTIMIZERS.get(config.optimizer)(config, schedule)


def test_a_checkpoint_from_before_per_run_learning_rates_resumes(tmp_path):
    """Checkpoints whose optimiser state has no injected learning rate (written
    before it became state) restore into today's state, at the config's rate."""
    config = make_tiny_config('')
    state = train.create_train_state(config, jax.random.PRNGKey(0), 2)
    old_layout = state.replace(
        step=jnp.int32(7), opt_state=_schedule_inside(config, 2).init(state.params)
    )
    manager = checkpoints.checkpoint_manager(str(tmp_path))
    checkpoints.save(manager, old_layout, {'epoch': 1, 'position': 0})
    restored, meta, _ = checkpoints.restore_state(manager, state)
    manager.close()
    assert meta['epoch'] == 1 and int(restored.step) == 7
    assert int(restored.opt_state.count) == 7
    assert float(train.learning_rate(restored)) == pytest.approx(config.learning_rate)
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored.params, state.params)


def test_a_checkpoint_from_before_the_applied_rate_was_state_resumes_exactly(tmp_path):
    """Checkpoints whose optimiser held only the base rate (the schedule inside
    the optimiser) restore into today's layout and update bit for bit alike."""
    config = make_tiny_config('')
    config.weight_decay = 0.01
    state = train.create_train_state(config, jax.random.PRNGKey(0), 2)
    old_tx = optax.inject_hyperparams(
        lambda learning_rate: _schedule_inside(config, 2, learning_rate)
    )(learning_rate=config.learning_rate)
    grads = jax.tree_util.tree_map(jnp.ones_like, state.params)
    old_update = jax.jit(old_tx.update)  # One program, not an op-by-op run per leaf.
    _, old_state = old_update(grads, old_tx.init(state.params), state.params)  # Count 1.
    manager = checkpoints.checkpoint_manager(str(tmp_path))
    checkpoints.save(manager, state.replace(step=jnp.int32(1), opt_state=old_state), {'epoch': 0})
    restored, _, _ = checkpoints.restore_state(manager, state)
    manager.close()
    assert int(restored.opt_state.count) == int(restored.opt_state.inner_state.count) == 1
    old_updates, _ = old_update(grads, old_state, state.params)
    new_updates, new_state = jax.jit(restored.tx.update)(grads, restored.opt_state, state.params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, new_updates, old_updates)
    assert float(optim.applied_learning_rate(new_state)) == pytest.approx(config.learning_rate)


def test_an_unreadable_latest_checkpoint_is_moved_aside_and_the_previous_restored(
    state, tmp_path, caplog
):
    manager = checkpoints.checkpoint_manager(str(tmp_path))
    assert checkpoints.restore_latest_good(str(tmp_path), manager, state) is None  # None yet.
    for step in (2, 4):
        checkpoints.save(manager, state.replace(step=jnp.int32(step)), {'epoch': step // 2})
    corrupt_checkpoint_arrays(tmp_path / 'checkpoints' / '4')
    restored, meta, _ = checkpoints.restore_latest_good(str(tmp_path), manager, state)
    assert int(restored.step) == 2 and meta == {'epoch': 1}
    assert manager.all_steps() == [2]
    manager.close()
    [moved] = os.listdir(tmp_path / 'checkpoints_corrupt')
    assert moved.startswith('4-') and os.listdir(tmp_path / 'checkpoints') == ['2']
    assert 'checkpoint 4 is unreadable' in caplog.text
    assert 'resuming from the older checkpoint of step 2' in caplog.text


def test_no_readable_checkpoint_names_the_steps_and_moves_nothing(state, tmp_path):
    manager = checkpoints.checkpoint_manager(str(tmp_path))
    for step in (2, 4):
        checkpoints.save(manager, state.replace(step=jnp.int32(step)), {'epoch': step // 2})
    corrupt_checkpoint_arrays(tmp_path / 'checkpoints')
    with pytest.raises(
        checkpoints.CheckpointError, match=r'no readable checkpoint in .*\(steps 4, 2: '
    ):
        checkpoints.restore_latest_good(str(tmp_path), manager, state)
    manager.close()
    assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2', '4']
    assert not (tmp_path / 'checkpoints_corrupt').exists()


def test_restore_for_inference_reads_the_model_and_config(state, tmp_path):
    config = make_tiny_config('')
    with pytest.raises(FileNotFoundError, match='holds no run'):
        checkpoints.restore(str(tmp_path))
    (tmp_path / 'config.json').write_text('{"name": "my-app"}')
    with pytest.raises(workdir.RecordError, match='is not the config of a resnet_jax run'):
        checkpoints.restore(str(tmp_path))
    (tmp_path / 'config.json').write_text(config.to_json())
    with pytest.raises(FileNotFoundError, match='no checkpoint in'):
        checkpoints.restore(str(tmp_path))
    manager = checkpoints.checkpoint_manager(str(tmp_path))
    checkpoints.save(manager, state.replace(step=jnp.int32(2)), {'epoch': 1})
    manager.close()
    model, variables, restored_config = checkpoints.restore(str(tmp_path))
    assert restored_config.to_json() == config.to_json()
    _assert_same_tree(variables, state.variables())
    logits = model.apply(variables, jnp.zeros((1, 32, 32, 3)), train=False)
    assert logits.shape == (1, 10)


def test_short_error_is_one_short_line():
    assert checkpoints.short_error(OSError(errno.ENOSPC, 'No space left on device')) == (
        'No space left on device'
    )
    tensorstore = ValueError('RESOURCE_EXHAUSTED: writing "d/abc": ' + 'x' * 5000)
    assert checkpoints.short_error(tensorstore) == 'No space left on device'
    spec = ValueError('NOT_FOUND: Error opening\n  "zarr" driver [tensorstore_spec=\'{...}\']')
    assert checkpoints.short_error(spec) == 'NOT_FOUND: Error opening "zarr" driver'
    long = checkpoints.short_error(ValueError('y' * 500), limit=50)
    assert len(long) == 50 and long.endswith('...')
    assert checkpoints.short_error(KeyError()) == 'KeyError'


def test_remove_partial_checkpoints_keeps_finished_ones(tmp_path):
    for name in ('4', '8.orbax-checkpoint-tmp-1234', 'notes'):
        os.makedirs(tmp_path / name)
    checkpoints.remove_partial_checkpoints(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ['4', 'notes']
    checkpoints.remove_partial_checkpoints(str(tmp_path / 'missing'))  # No error.


def test_load_config_of_a_workdir(tmp_path):
    config = make_tiny_config('/data')
    (tmp_path / 'config.json').write_text(json.dumps(config.to_dict()))
    assert checkpoints.load_config(str(tmp_path)).data.path == '/data'
