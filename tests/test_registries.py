"""Registries: a model and an optimiser registered from outside the package train;
validation and the usage text take their choices (and an optimiser's fields) from them."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnet_jax import datasets, models, validation
from resnet_jax.cli import flags
from resnet_jax.registry import Registry
from resnet_jax.training import checks, optim, train
from tests.conftest import make_tiny_config


class TinyNet(nn.Module):
    """A network with no BatchNorm (so no ``batch_stats``)."""

    num_classes: int = 10
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        x = nn.relu(nn.Conv(4, (3, 3), dtype=self.dtype)(x))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x.mean(axis=(1, 2)))


def rmsprop(config, learning_rate):
    return optax.rmsprop(learning_rate, decay=config.rmsprop_decay)


@pytest.fixture
def registered():
    """'tiny_net' and 'rmsprop_test' registered for one test."""
    models.MODELS.register('tiny_net', TinyNet)
    optim.OPTIMIZERS.register('rmsprop_test', rmsprop, fields={'rmsprop_decay': validation.UNIT})
    yield
    models.MODELS.unregister('tiny_net')
    optim.OPTIMIZERS.unregister('rmsprop_test')


def _batch(n=8):
    images = jax.random.uniform(jax.random.PRNGKey(1), (n, 32, 32, 3))
    return {'image': images, 'label': jnp.arange(n, dtype=jnp.int32) % 10}


def _one_step(config):
    checks.validate_config(config)
    state = train.create_train_state(config, jax.random.PRNGKey(0), steps_per_epoch=4)
    new, metrics = train.train_step(jax.tree_util.tree_map(jnp.copy, state), _batch())
    assert int(new.step) == 1 and np.isfinite(float(metrics.compute()['loss']))
    moved = [
        not np.array_equal(a, b)
        for a, b in zip(*map(jax.tree_util.tree_leaves, (state.params, new.params)), strict=True)
    ]
    assert all(moved)
    return state, new


def test_a_registered_model_trains_a_step(registered):
    config = make_tiny_config('')
    config.model = 'tiny_net'
    state, new = _one_step(config)
    assert state.batch_stats == {} and new.batch_stats == {}
    assert set(state.params) == {'Conv_0', 'Dense_0'}


def test_a_registered_optimiser_declares_its_fields_and_trains_a_step(registered):
    config = make_tiny_config('')
    config.model, config.optimizer = 'tiny_net', 'rmsprop_test'
    with pytest.raises(validation.ConfigError, match=r'^config\.rmsprop_decay is missing'):
        checks.validate_config(config)
    config.rmsprop_decay = 1.5
    with pytest.raises(validation.ConfigError, match=r'rmsprop_decay must be in \[0, 1\)'):
        checks.validate_config(config)
    config.rmsprop_decay = 0.9
    state, new = _one_step(config)
    # The update is optax's rmsprop at the scheduled rate the state records.
    batch = _batch()

    def loss(params):
        logits = state.apply_fn({'params': params}, batch['image'])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()

    grads = jax.grad(loss)(state.params)
    tx = optax.rmsprop(config.learning_rate, decay=0.9)
    updates, _ = tx.update(grads, tx.init(state.params), state.params)
    expected = optax.apply_updates(state.params, updates)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), new.params, expected
    )
    assert float(train.applied_learning_rate(new)) == pytest.approx(config.learning_rate)
    # Runs differing only in the learning rate share the optimiser.
    other = config.copy_and_resolve_references()
    other.learning_rate = 0.5
    assert optim.cached_optimizer(other, 4) is optim.cached_optimizer(config, 4)


def test_choices_come_from_the_registries(registered):
    config = make_tiny_config('')
    config.optimizer = 'no_such'
    with pytest.raises(validation.ConfigError, match='rmsprop_test') as e:
        checks.validate_config(config)
    assert 'adam, sgd, adagrad, adamw' in str(e.value)
    text = flags.usage()
    assert 'tiny_net' in text and 'rmsprop_test' in text
    assert f'config.data.source: auto, {datasets.SOURCES.choices()}' in text
    with pytest.raises(ValueError, match="unknown model 'resnet9'; choose one of paper"):
        models.create_model('resnet9')


def test_registry_entries_and_their_fields():
    registry = Registry('thing')
    registry.register('a', 1)

    @registry.register('b', fields={'x': validation.COUNT})
    def b():
        return 2

    assert registry.names() == ('a', 'b') and list(registry) == ['a', 'b'] and 'a' in registry
    assert registry.get('b') is b and dict(registry.fields('b')) == {'x': validation.COUNT}
    registry.unregister('a')
    with pytest.raises(ValueError, match="unknown thing 'a'; choose one of b"):
        registry.get('a')


def test_the_logged_learning_rate_is_the_optimisers():
    """After an update the state holds the rate the schedule gave it (piecewise here:
    halved after each epoch of 2 steps)."""
    config = make_tiny_config('')
    config.optimizer = 'sgd'  # With batches of 32: the step test_train.py compiles.
    state = train.create_train_state(config, jax.random.PRNGKey(0), steps_per_epoch=2)
    rates = []
    for _ in range(5):
        state, _ = train.train_step(state, _batch(32))
        rates.append(float(train.applied_learning_rate(state)))
    assert rates == pytest.approx([0.01, 0.01, 0.005, 0.005, 0.0025])
    assert float(train.learning_rate(state)) == pytest.approx(0.01)  # The base rate.
