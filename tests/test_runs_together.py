"""Runs trained together (one program over a run axis) match runs trained one by one,
resume, and diverge alone; a single run is the plain program."""

import json
import os
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from resnet_jax.configs import paper_sweep
from resnet_jax.datasets import augment
from resnet_jax.reports import sweep_report
from resnet_jax.rundir import workdir as workdir_lib
from resnet_jax.studies import search, sweep
from resnet_jax.training import checkpoints, loop, signals, steps, train
from tests.conftest import (
    assert_within_float_noise,
    make_tiny_config,
    read_hparams,
    train_nudged,
)

# (learning_rate, shuffle, seed) of three lanes: every vectorisable field varies.
LANES = ((0.05, True, 0), (0.01, False, 0), (0.02, True, 1))
KEYS = ('train_loss', 'train_accuracy', 'test_loss', 'test_accuracy', 'learning_rate')


def _configs(data_path, num_epochs=2):
    configs = []
    for lr, shuffle, seed in LANES:
        config = make_tiny_config(data_path)
        config.num_epochs = num_epochs
        # SGD: Adam turns last-bit float differences into visible ones within
        # steps (see test_sharding.py), and vmapped convolutions round differently.
        config.optimizer = 'sgd'
        config.learning_rate, config.shuffle, config.seed = lr, shuffle, seed
        # A seeded subset: seeds 0 and 1 train on different images (two datasets).
        config.data.train_subset = 104
        configs.append(config)
    return configs


def _records(workdir):
    return [{k: r[k] for k in KEYS} for r in workdir_lib.read_metrics(workdir)]


@pytest.fixture(scope='module')
def together(training, tmp_path_factory, cifar_py):
    """The three lanes trained as one group, uninterrupted; the compiles it took."""
    root = tmp_path_factory.mktemp('together')
    workdirs = [str(root / f'lane{i}') for i in range(len(LANES))]
    before = steps.update_runs.mapped._cache_size()
    _, summaries = training.train_runs(_configs(cifar_py.path), workdirs)
    return workdirs, summaries, steps.update_runs.mapped._cache_size() - before


def test_groups_of_the_paper_sweep():
    runs = sweep.expand(paper_sweep.get_config())
    groups = sweep.group_runs([r.config for r in runs])
    assert sorted(len(g) for g in groups) == [6, 6, 6]  # One per batch size.
    for group in groups:
        assert len({runs[i].config.batch_size for i in group}) == 1


def test_lanes_match_runs_trained_one_by_one(training, together, cifar_py, tmp_path):
    workdirs, summaries, compiles = together
    # 104 images in batches of 32: one program for the full and one for the last
    # batch, compiled in epoch 1 and reused in epoch 2.
    assert compiles <= 2
    # Seeds 0, 0, 1 draw two different subsets: lanes index two stacked training sets.
    assert loop._training_sets(_configs(cifar_py.path))[1] == [0, 0, 1]
    for config, workdir, summary in zip(_configs(cifar_py.path), workdirs, summaries, strict=True):
        assert summary['status'] == 'completed' and summary['vectorized_lanes'] == 3
        alone_dir = str(tmp_path / os.path.basename(workdir))
        _, alone = training.train_and_evaluate(config, alone_dir)
        got, want = _records(workdir), _records(alone_dir)
        assert len(got) == len(want) == 2
        nudged = train_nudged(training, config, alone_dir + '_nudged')
        # Vectorised convolutions round differently: float noise of 2 epochs of 4
        # steps; 2 of the 50 test images (and of the 104 training images) may flip.
        assert_within_float_noise(got, want, nudged, 8, KEYS, flip=2 / 50)
        # A lane's workdir is a run's workdir: its config, restore and evaluation.
        saved = json.loads(open(os.path.join(workdir, 'config.json')).read())
        assert saved['learning_rate'] == config.learning_rate
        result = loop.evaluate_workdir(workdir)
        assert result['accuracy'] == pytest.approx(summary['test_accuracy'])
    # Different learning rates, orders and seeds give different runs.
    assert len({s['train_loss'] for s in summaries}) == 3


@pytest.mark.slow  # Compiles the three-lane training program (tens of seconds).
def test_one_step_of_three_lanes_is_three_single_steps():
    """Per step, lanes equal the plain step up to rounding (runs then drift apart
    chaotically, hence the looser tolerances over whole runs above)."""
    config = make_tiny_config('')
    config.optimizer = 'sgd'
    prep = augment.Preprocess.from_config(config)
    images = jax.random.randint(jax.random.PRNGKey(1), (64, 32, 32, 3), 0, 256, jnp.int32)
    images = images.astype(jnp.uint8)
    labels = jax.random.randint(jax.random.PRNGKey(2), (64,), 0, 10, jnp.int32)
    orders = jnp.stack([jax.random.permutation(jax.random.PRNGKey(i), 64) for i in range(3)])
    orders = orders.astype(jnp.int32)
    rates = (0.05, 0.01, 0.2)
    init_rng = jax.random.split(jax.random.PRNGKey(0))[0]
    states = []
    for lr in rates:  # One optimiser, the learning rate in each run's state.
        config.learning_rate = lr
        states.append(train.create_train_state(config, init_rng, 2))
    assert len({id(s.tx) for s in states}) == 1
    initial = states[0]
    stacked = train.stack(states)
    batches = steps.augmented_batches(
        stacked, orders, images, labels, jnp.int32(0), size=32, prep=prep
    )
    stacked, metrics = steps.update_runs(stacked, batches)
    np.testing.assert_allclose(train.learning_rate(stacked), rates)
    for r, lr in enumerate(rates):
        config.learning_rate = lr
        alone = train.create_train_state(config, init_rng, 2)
        batch = augment.train_batch(
            images, labels, orders[r], jnp.int32(0), alone.rng, alone.step, size=32, prep=prep
        )
        alone, m = train.train_step(alone, batch)
        lane = train.unstack(stacked, r)
        leaves = (jax.tree_util.tree_leaves(s.params) for s in (lane, alone, initial))
        for a, b, init in zip(*leaves, strict=True):  # The updates agree to rounding.
            assert np.linalg.norm(a - b) <= 1e-2 * np.linalg.norm(b - init)
        assert float(train.unstack(metrics, r).compute()['loss']) == pytest.approx(
            float(m.compute()['loss']), rel=1e-5
        )


def test_a_single_run_is_the_plain_program_bit_for_bit():
    """R = 1 runs the compiled single-run step itself: identical to train_step."""
    config = make_tiny_config('')
    config.optimizer = 'sgd'  # train_step as compiled for the test above (and test_train.py).
    prep = augment.Preprocess.from_config(config)
    images = jax.random.randint(jax.random.PRNGKey(1), (64, 32, 32, 3), 0, 256, jnp.int32)
    images = images.astype(jnp.uint8)
    labels = jax.random.randint(jax.random.PRNGKey(2), (64,), 0, 10, jnp.int32)
    order = jax.random.permutation(jax.random.PRNGKey(3), 64).astype(jnp.int32)
    state = train.create_train_state(config, jax.random.PRNGKey(0), 2)
    batch = augment.train_batch(
        images, labels, order, jnp.int32(0), state.rng, state.step, size=32, prep=prep
    )
    copy = jax.tree_util.tree_map(jnp.copy, state)
    alone, m = train.train_step(copy, batch)
    stacked = train.stack([state])
    batches = steps.augmented_batches(
        stacked, order[None], images, labels, jnp.int32(0), size=32, prep=prep
    )
    stacked, ms = steps.update_runs(stacked, batches)
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, train.unstack(stacked, 0).params, alone.params
    )
    assert float(train.unstack(ms, 0).compute()['loss']) == float(m.compute()['loss'])


def test_sigterm_mid_epoch_then_resume_is_exact(
    training, together, cifar_py, tmp_path, monkeypatch
):
    """SIGTERM at step 2 of epoch 2 checkpoints every lane; rerunning finishes them
    with the very numbers of the uninterrupted group."""
    workdirs = [str(tmp_path / f'lane{i}') for i in range(len(LANES))]
    calls = []
    real = steps.update_runs

    def update_runs(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:  # 4 steps per epoch: step 2 of epoch 2.
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(steps, 'update_runs', update_runs)
    with pytest.raises(signals.Interrupted):
        training.train_runs(_configs(cifar_py.path), workdirs)
    for workdir in workdirs:
        assert len(workdir_lib.read_metrics(workdir)) == 1
        manager = checkpoints.checkpoint_manager(workdir, read_only=True)
        assert manager.latest_step() == 6  # 4 steps of epoch 1, 2 of epoch 2.
        manager.close()
    monkeypatch.setattr(steps, 'update_runs', real)
    _, summaries = training.train_runs(_configs(cifar_py.path), workdirs)
    assert [s['status'] for s in summaries] == ['completed'] * 3
    for workdir, reference in zip(workdirs, together[0], strict=True):
        assert _records(workdir) == _records(reference)


@pytest.mark.usefixtures('training')
def test_vectorized_sweep_isolates_a_diverging_lane(tmp_path, cifar_py):
    config = make_tiny_config(cifar_py.path)
    config.num_epochs = 1
    config.optimizer = 'sgd'
    config.check_finite_every_steps = 1
    config.data.train_subset = 64  # Two full batches: one program per number of lanes.
    config.sweep = ml_collections.ConfigDict()
    config.sweep.learning_rate = (0.01, 3e38)
    config.sweep.shuffle = (True, False)
    config.sweep.vectorize = True
    statuses = search.run_study(config, str(tmp_path))
    assert statuses == {
        'learning_rate=0.01,shuffle=True': 'completed',
        'learning_rate=0.01,shuffle=False': 'completed',
        'learning_rate=3e+38,shuffle=True': 'diverged',
        'learning_rate=3e+38,shuffle=False': 'diverged',
    }
    for name, status in statuses.items():
        summary = json.loads((tmp_path / name / 'summary.json').read_text())
        assert summary['status'] == status and summary['vectorized_lanes'] == 4
        assert len(workdir_lib.read_metrics(str(tmp_path / name))) == (status == 'completed')
        if status == 'diverged':
            assert 'non-finite' in summary['error']
        assert read_hparams(tmp_path / name)['hparams']['status'] == status
    sweep_report.write_sweep_report(str(tmp_path))
    assert (tmp_path / 'results.md').exists()
    entries = {name: os.listdir(tmp_path / name / 'hparams') for name in statuses}
    # Rerunning skips the completed runs and retrains only the diverged ones, which
    # end as before: their HParams are not written again.
    statuses = search.run_study(config, str(tmp_path))
    assert sorted(statuses.values()) == ['completed', 'completed', 'diverged', 'diverged']
    assert {name: os.listdir(tmp_path / name / 'hparams') for name in statuses} == entries


def test_bad_vectorize_option_is_a_config_error():
    config = paper_sweep.get_config()
    config.sweep = ml_collections.ConfigDict({'batch_size': (100,), 'vectorize': 'yes'})
    with pytest.raises(sweep.validation.ConfigError, match='vectorize'):
        sweep.expand(config)
