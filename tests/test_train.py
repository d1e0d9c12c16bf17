"""The train step and its state: one update by hand, masked evaluation, the run axis.

Unit tests of resnet_jax/train.py on a tiny batch (no data, no loop); whole runs
are in test_loop.py, optimisers and schedules in test_optim.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnet_jax.training import train
from tests.conftest import make_tiny_config

BATCH = 32  # As in test_runs_together.py's one-step test: the same compiled SGD step.
LEARNING_RATE = 0.1


def _state(**changes):
    """The tiny config's initial state with SGD (momentum 0.9: its first step is plain SGD)."""
    config = make_tiny_config('')
    config.optimizer, config.learning_rate = 'sgd', LEARNING_RATE
    config.update(changes)
    return train.create_train_state(config, jax.random.PRNGKey(0), 2)


def _batch(seed=1, n=BATCH):
    images = jax.random.uniform(jax.random.PRNGKey(seed), (n, 32, 32, 3))
    return {'image': images, 'label': jnp.arange(n, dtype=jnp.int32) % 10}


def _copy(tree):
    return jax.tree_util.tree_map(jnp.copy, tree)  # train_step donates its state.


def _add(params, step, scale):
    return jax.tree_util.tree_map(lambda p, d: p + scale * d, params, step)


def test_update_is_one_sgd_step_on_the_mean_cross_entropy():
    state, batch = _state(), _batch()

    @jax.jit
    def forward(params):
        """Mean cross-entropy, logits and new BatchNorm statistics, in training mode."""
        variables = {'params': params, 'batch_stats': state.batch_stats}
        logits, updates = state.apply_fn(
            variables, batch['image'], train=True, mutable=['batch_stats']
        )
        log_p = jax.nn.log_softmax(logits)
        losses = -jnp.take_along_axis(log_p, batch['label'][:, None], axis=1)
        return losses.mean(), logits, updates['batch_stats']

    loss, logits, batch_stats = forward(state.params)
    new, metrics = train.train_step(_copy(state), batch)
    assert int(new.step) == 1
    got = metrics.compute()  # The batch's metrics before the update.
    assert got['loss'] == pytest.approx(float(loss), rel=1e-5)
    correct = np.asarray(logits).argmax(-1) == np.asarray(batch['label'])
    assert got['accuracy'] == pytest.approx(correct.mean())
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        new.batch_stats,
        batch_stats,
    )
    np.testing.assert_array_equal(new.rng, state.rng)  # Folded with the step, never split.
    # The step is -lr * gradient: its length is lr times the reported gradient
    # norm, and the loss falls along it at the rate |step|^2 / lr (central
    # differences), which only a step along the gradient achieves.
    step = jax.tree_util.tree_map(lambda a, b: a - b, new.params, state.params)
    length = float(optax.tree_utils.tree_norm(step))
    assert length == pytest.approx(LEARNING_RATE * float(got['grad_norm']), rel=1e-4)
    t = 0.01
    slope = forward(_add(state.params, step, t))[0] - forward(_add(state.params, step, -t))[0]
    assert float(slope) / (2 * t) == pytest.approx(-(length**2) / LEARNING_RATE, rel=1e-2)


def test_repeated_updates_fit_one_batch():
    state, batch = _state(), _batch()
    losses = []
    for _ in range(8):
        state, metrics = train.train_step(state, batch)
        losses.append(metrics.compute()['loss'])
    assert int(state.step) == 8
    assert losses[-1] < 0.5 * losses[0], losses


def test_eval_counts_only_unmasked_examples():
    state = _state()
    batch = _batch(n=2 * BATCH)
    mask = jnp.arange(2 * BATCH) < BATCH  # The second half is padding.
    masked = train.eval_step(state, dict(batch, mask=mask))
    assert float(masked.loss.count) == float(masked.accuracy.count) == BATCH
    logits = jax.jit(state.apply_fn, static_argnames='train')(
        state.variables(), batch['image'][:BATCH], train=False
    )
    labels = np.asarray(batch['label'])[:BATCH]
    log_p = np.asarray(jax.nn.log_softmax(logits))
    got = masked.compute()
    assert got['loss'] == pytest.approx(-log_p[np.arange(BATCH), labels].mean(), rel=1e-5)
    assert got['accuracy'] == pytest.approx((log_p.argmax(-1) == labels).mean())


def test_states_stack_along_a_run_axis_with_their_own_learning_rates():
    states = [_state(learning_rate=lr) for lr in (0.1, 0.01)]
    assert states[0].tx is states[1].tx  # One optimiser: the rate is state.
    stacked = train.stack(states)
    assert train.num_runs(stacked) == 2
    np.testing.assert_allclose(train.learning_rate(stacked), [0.1, 0.01])
    second = train.unstack(stacked, 1)
    jax.tree_util.tree_map(np.testing.assert_array_equal, second.params, states[1].params)
    assert float(train.learning_rate(second)) == pytest.approx(0.01)


def test_runs_finite_flags_each_run():
    tree = {'a': jnp.ones((3, 2)), 'b': jnp.ones((3, 4, 5))}
    tree['b'] = tree['b'].at[1, 2, 3].set(jnp.nan).at[2, 0, 0].set(jnp.inf)
    np.testing.assert_array_equal(train.runs_finite(tree), [True, False, False])
