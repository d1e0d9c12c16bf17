"""Samplers and pruners (resnet_jax.studies.samplers): the shipped ones as before, the
quasi-random one's draws, the checks of the options each declares, and a sampler and a
pruner registered from a user's config file running a study through the command line."""

import json

import numpy as np
import optuna
import pytest

from resnet_jax import validation
from resnet_jax.studies import optuna_study, samplers, search_space
from tests import fake_data
from tests.conftest import one_error_line
from tests.test_search import draw_learning_rates, search_config, trials_of

# A user's config file: a Halton sampler and a threshold pruner, registered when the
# file is imported, each with an option of its own in config.search.
USER_CONFIG = """
from resnet_jax import validation
from resnet_jax.studies import samplers, search_space
from tests.test_search import search_config


@samplers.SAMPLERS.register('halton', fields={'halton_scramble': validation.BOOL})
def halton(spec, seed):
    import optuna

    return optuna.samplers.QMCSampler(
        qmc_type='halton',
        scramble=spec.options['halton_scramble'],
        seed=spec.seed,
        independent_sampler=optuna.samplers.RandomSampler(seed=seed),
    )


@samplers.PRUNERS.register('threshold', fields={'prune_below': validation.POSITIVE})
def threshold(spec):
    import optuna

    return optuna.pruners.ThresholdPruner(lower=spec.options['prune_below'])


def get_config():
    config = search_config(DATA, sampler='halton', pruner='threshold', num_trials=3)
    config.num_epochs = 2
    config.search.space.learning_rate = search_space.float_param(1e-4, 0.1, log=True)
    config.search.halton_scramble = True
    config.search.prune_below = 1000.0  # Above any accuracy: every trial stops at epoch 1.
    return config
"""


@pytest.fixture(scope='module')
def learnable(tmp_path_factory) -> fake_data.FakeCifar:
    """A fake CIFAR-10 (python version) whose classes a model learns: 200 train + 50 test."""
    root = tmp_path_factory.mktemp('learnable')
    return fake_data.write_cifar_py(root, n_train_per_batch=40, n_test=50, learnable=True)


@pytest.fixture
def registered():
    """The user's 'halton' sampler and 'threshold' pruner, registered for one test."""
    namespace: dict = {}
    exec(USER_CONFIG.replace('DATA', "''"), namespace)  # pylint: disable=exec-used
    yield namespace
    samplers.SAMPLERS.unregister('halton')
    samplers.PRUNERS.unregister('threshold')


def user_config_file(tmp_path) -> str:
    path = tmp_path / 'user_search.py'
    path.write_text(USER_CONFIG.replace('DATA', repr(str(tmp_path / 'unused'))))
    return str(path)


def float_space(config, **options):
    config.search.space.learning_rate = search_space.float_param(1e-4, 0.1, log=True)
    for key, value in options.items():
        config.search[key] = value
    return search_space.spec_from_config(config)


def quasi_random(kind: str, seed: int, n: int) -> np.ndarray:
    """The first ``n`` learning rates of a scrambled 1-d sequence on [1e-4, 0.1], log scale."""
    from scipy.stats import qmc

    engine = (
        qmc.Sobol(1, scramble=True, seed=seed)
        if kind == 'sobol'
        else qmc.Halton(1, scramble=True, seed=seed)
    )
    return np.exp(np.log(1e-4) + engine.random(n)[:, 0] * np.log(1000))


# -------------------------------------------------------- the shipped ones ----


def test_the_shipped_samplers_and_pruners_are_as_before(learnable):
    assert samplers.SAMPLERS.names() == ('tpe', 'random', 'qmc', 'grid')
    assert samplers.PRUNERS.names() == ('none', 'median', 'successive_halving', 'hyperband')
    spec = float_space(search_config(learnable.path), sampler='tpe', startup_trials=3)
    tpe = optuna_study.make_sampler(spec, position=4)
    assert isinstance(tpe, optuna.samplers.TPESampler) and tpe._n_startup_trials == 3
    assert tpe._constant_liar
    seed = optuna_study.draw_seed(spec.seed, 4)
    assert tpe._rng.rng.random() == np.random.RandomState(seed).random()
    spec = float_space(search_config(learnable.path), sampler='random')
    assert isinstance(optuna_study.make_sampler(spec), optuna.samplers.RandomSampler)
    spec = float_space(search_config(learnable.path), sampler='qmc', seed=7)
    assert isinstance(optuna_study.make_sampler(spec), optuna.samplers.QMCSampler)
    grid = search_space.spec_from_config(search_config(learnable.path))
    assert isinstance(optuna_study.make_sampler(grid), optuna.samplers.RandomSampler)
    expected = {
        'none': (optuna.pruners.NopPruner, {}),
        'median': (optuna.pruners.MedianPruner, {'_n_startup_trials': 2, '_n_warmup_steps': 1}),
        'successive_halving': (
            optuna.pruners.SuccessiveHalvingPruner,
            {'_min_resource': 2, '_reduction_factor': 4},
        ),
        'hyperband': (
            optuna.pruners.HyperbandPruner,
            {'_min_resource': 2, '_max_resource': 4, '_reduction_factor': 4},
        ),
    }
    for name, (kind, attributes) in expected.items():
        config = search_config(learnable.path, pruner=name, startup_trials=2, min_epochs=2)
        config.search.reduction_factor = 4
        pruner = optuna_study.make_pruner(search_space.spec_from_config(config))
        assert type(pruner) is kind
        assert {k: getattr(pruner, k) for k in attributes} == attributes


def test_qmc_draws_follow_the_scrambled_sequence_of_the_study_seed(tmp_path, learnable):
    """The first draw is random (the space is not known yet); then each worker's draw is
    the next point of the Sobol sequence that the study's seed scrambles."""
    drawn = {}
    for seed in (0, 1):
        spec = float_space(search_config(learnable.path), sampler='qmc', num_trials=5, seed=seed)
        rates = draw_learning_rates(spec, str(tmp_path / f'seed{seed}'), 5, lambda rate: 1.0)
        np.testing.assert_allclose(rates[1:], quasi_random('sobol', seed, 4), rtol=1e-9)
        drawn[seed] = rates
    assert not set(drawn[0]) & set(drawn[1])


def test_a_study_key_is_what_the_previous_version_recorded(tmp_path, learnable):
    """With the shipped samplers and pruners, the key and search.json have the same
    fields as before: a study started before resumes."""
    config = search_config(learnable.path, sampler='tpe', pruner='hyperband', num_trials=2)
    spec = float_space(config)
    old = {
        'params', 'sampler', 'seed', 'metric', 'direction', 'pruner', 'min_epochs',
        'reduction_factor', 'startup_trials', 'vectorize', 'grid', 'from_sweep', 'base_config',
    }  # fmt: skip
    assert set(optuna_study._study_key(spec)) == old
    workdir = str(tmp_path / 'study')
    study = optuna_study.open_study(spec, workdir)
    recorded = dict(optuna_study._study_key(spec), num_trials=2)  # As keys once held it.
    study.set_user_attr('spec', recorded)
    optuna_study.open_study(spec, workdir)  # No 'another search config'.


# ------------------------------------------------------------- checks ----


def test_a_users_options_are_checked_recorded_and_part_of_the_key(tmp_path, learnable, registered):
    config = registered['get_config']()
    config.data.path = learnable.path
    spec = search_space.spec_from_config(config)
    assert spec.options == {'halton_scramble': True, 'prune_below': 1000.0}
    assert spec.describe()['options'] == spec.options
    workdir = str(tmp_path / 'study')
    optuna_study.open_study(spec, workdir)
    with open(tmp_path / 'study' / 'search.json') as f:
        assert json.load(f)['options'] == spec.options
    config.search.prune_below = 50.0
    with pytest.raises(search_space.SearchError, match=r'differs in: options'):
        optuna_study.open_study(search_space.spec_from_config(config), workdir)
    # Another sampler and pruner: their options are allowed, neither read nor recorded.
    config.search.sampler, config.search.pruner = 'random', 'none'
    assert search_space.spec_from_config(config).options == {}
    del config.search['prune_below']
    config.search.pruner = 'threshold'
    with pytest.raises(search_space.SearchError, match=r'prune_below is missing \(pruner '):
        search_space.spec_from_config(config)


@pytest.mark.parametrize(
    'option, value, message',
    [
        ('startup_trials', -1, 'config.search.startup_trials must be an integer >= 0, got -1'),
        ('reduction_factor', 1, 'config.search.reduction_factor must be an integer >= 2'),
        ('no_such_option', 1, 'config.search has no option no_such_option; options: '),
        ('sampler', 'cmaes', "sampler='cmaes' is unknown; choose one of tpe, random, qmc, grid"),
        ('pruner', 'early', 'choose one of none, median, successive_halving, hyperband'),
    ],
)
def test_each_bad_option_is_named(learnable, option, value, message):
    config = search_config(learnable.path, sampler='tpe', pruner='successive_halving')
    config.search.space.learning_rate = search_space.float_param(1e-4, 0.1, log=True)
    config.search[option] = value
    with pytest.raises(search_space.SearchError) as e:
        search_space.spec_from_config(config)
    assert message in str(e.value)


def test_a_registered_options_check_names_the_field():
    values = dict(search_space.SEARCH_DEFAULTS, pruner='threshold', prune_below=-1.0)
    samplers.PRUNERS.register('threshold', object(), fields={'prune_below': validation.POSITIVE})
    try:
        with pytest.raises(validation.ConfigError, match='config.search.prune_below must be a'):
            samplers.read_options(values)
        assert 'prune_below' in samplers.declared_fields()
    finally:
        samplers.PRUNERS.unregister('threshold')
    assert 'prune_below' not in samplers.declared_fields()


# ------------------------------------------------------- command line ----


def test_a_sampler_and_a_pruner_registered_in_a_config_file_run_a_study(cli, tmp_path, learnable):
    config_file = user_config_file(tmp_path)
    for sampler in ('halton', 'qmc'):
        workdir = tmp_path / sampler
        result = cli.run(
            [f'--config={config_file}', f'--config.data.path={learnable.path}',
             f'--workdir={workdir}', f'--config.search.sampler={sampler}']
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        trials = trials_of(f'sqlite:///{workdir}/study.db')
        # The user's pruner stops every trial at its first epoch.
        assert [t.state.name for t in trials] == ['PRUNED'] * 3
        for trial in trials:
            with open(workdir / trial.user_attrs['run'] / 'summary.json') as f:
                assert json.load(f)['pruned_at_epoch'] == 1
        # After the first (random) draw, the sampler's sequence: the user's Halton, or
        # the shipped quasi-random (Sobol) sampler.
        rates = [t.params['learning_rate'] for t in trials]
        kind = 'halton' if sampler == 'halton' else 'sobol'
        np.testing.assert_allclose(rates[1:], quasi_random(kind, 0, 2), rtol=1e-9)
        with open(workdir / 'search.json') as f:
            assert json.load(f)['options']['prune_below'] == 1000.0


@pytest.mark.parametrize(
    'flag, message',
    [
        ('--config.search.sampler=bayes', 'choose one of tpe, random, qmc, grid, halton'),
        ('--config.search.pruner=early', 'hyperband, threshold'),
        ('--config.search.prune_below=-1.0', 'config.search.prune_below must be a finite number'),
    ],
)
def test_a_bad_sampler_or_pruner_is_one_error_line(cli, tmp_path, learnable, flag, message):
    workdir = tmp_path / 'study'
    result = cli.run(
        [f'--config={user_config_file(tmp_path)}', f'--config.data.path={learnable.path}',
         f'--workdir={workdir}', flag]
    )  # fmt: skip
    one_error_line(result, message)
    assert not list(workdir.glob('*/metrics.jsonl'))  # Nothing trained.
