"""Optimisers and learning-rate schedules, converted from epochs to steps."""

import jax.numpy as jnp
import pytest

from resnet_jax.configs import default
from resnet_jax.training import optim


def _config(**kw):
    c = default.get_config()
    c.update(kw)
    return c


def test_piecewise_divides_by_3_every_20_epochs_at_the_boundaries():
    spe = 500  # 50,000 / 100
    s = optim.create_learning_rate_schedule(_config(), spe)
    assert float(s(0)) == pytest.approx(0.01)
    assert float(s(20 * spe - 1)) == pytest.approx(0.01)  # Last step of epoch 20.
    assert float(s(20 * spe)) == pytest.approx(0.01 / 3)  # First step of epoch 21.
    assert float(s(40 * spe - 1)) == pytest.approx(0.01 / 3)
    assert float(s(40 * spe)) == pytest.approx(0.01 / 9)
    assert float(s(50 * spe - 1)) == pytest.approx(0.01 / 9)


def test_piecewise_follows_real_steps_per_epoch():
    s = optim.create_learning_rate_schedule(_config(decay_every_epochs=2, decay_factor=2.0), 7)
    assert [float(s(i)) for i in (13, 14, 27, 28)] == pytest.approx([0.01, 0.005, 0.005, 0.0025])


def test_cosine_and_constant():
    c = optim.create_learning_rate_schedule(_config(schedule='cosine', num_epochs=2), 10)
    assert float(c(0)) == pytest.approx(0.01) and float(c(10)) == pytest.approx(0.005)
    assert float(c(20)) == pytest.approx(0.0, abs=1e-9)
    k = optim.create_learning_rate_schedule(_config(schedule='constant'), 10)
    assert float(k(0)) == float(k(10_000)) == pytest.approx(0.01)


def _one_update(tx, grad=1.0, param=2.0):
    params = {'w': jnp.array([param])}
    updates, _ = tx.update({'w': jnp.array([grad])}, tx.init(params), params)
    return float(updates['w'][0])


def test_adam_first_step_is_lr_times_sign():
    assert _one_update(optim.create_optimizer(_config(), 10)) == pytest.approx(-0.01, rel=1e-5)


def test_sgd_momentum_and_weight_decay_as_l2():
    cfg = _config(optimizer='sgd', learning_rate=0.1, weight_decay=0.5, momentum=0.9)
    # Gradient 1 + 0.5 * 2 = 2; SGD step -0.1 * 2.
    assert _one_update(optim.create_optimizer(cfg, 10)) == pytest.approx(-0.2)


def test_adagrad_uses_pytorch_defaults():
    cfg = _config(optimizer='adagrad', learning_rate=0.1)
    # PyTorch: accumulator 0 + g^2 = 4 -> step -0.1 * 2 / (2 + 1e-10).
    assert _one_update(optim.create_optimizer(cfg, 10), grad=2.0) == pytest.approx(-0.1, rel=1e-6)


def test_adamw_decay_is_decoupled():
    cfg = _config(optimizer='adamw', learning_rate=0.1, weight_decay=0.5)
    # Adam's normalised step -0.1 plus decoupled decay -0.1 * 0.5 * 2.
    assert _one_update(optim.create_optimizer(cfg, 10)) == pytest.approx(-0.2, rel=1e-5)
