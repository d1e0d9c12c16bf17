"""Config checks before anything runs: one sentence naming the field; dotted field access.

Unit tests of resnet_jax/validation.py (no data, no training).
"""

import os
import subprocess
import sys

import ml_collections
import pytest

from resnet_jax import validation
from resnet_jax.configs import default
from resnet_jax.reports import load
from resnet_jax.training import checks
from tests.conftest import make_tiny_config


def test_one_dotted_config_path_getter_and_setter_for_dicts_and_configdicts():
    plain = {'data': {'path': '/d'}, 'seed': 0}
    config = ml_collections.ConfigDict({'data': {'path': '/d'}, 'seed': 0})
    for c in (plain, config):
        assert validation.get_field(c, 'data.path') == '/d'
        assert validation.get_field(c, 'data.absent', None) is None
        assert validation.get_field(c, 'seed.deeper', 'x') == 'x'  # seed is not a section.
        with pytest.raises(validation.ConfigError, match=r'^config\.data\.absent is missing$'):
            validation.get_field(c, 'data.absent')
        validation.set_field(c, 'data.path', '/e')
        assert validation.get_field(c, 'data.path') == '/e'
        for absent in ('data.absent', 'absent.path', 'seed.deeper'):
            with pytest.raises(validation.ConfigError, match=rf'^config\.{absent} is missing$'):
                validation.set_field(c, absent, 1)
    with pytest.raises(TypeError):
        validation.set_field(config, 'seed', 'one')  # A ConfigDict's type check passes through.
    validation.set_field(plain, 'a.b.c', 1, create=True)
    assert plain == {'data': {'path': '/e'}, 'seed': 0, 'a': {'b': {'c': 1}}}
    base = {'data': {'path': '/d'}, 'seed': 0}
    overridden = load.config_with_overrides(base, {'data.path': '/f', 'x.y': 2})
    assert overridden == {'data': {'path': '/f'}, 'seed': 0, 'x': {'y': 2}}
    assert base == {'data': {'path': '/d'}, 'seed': 0}  # A deep copy.


def test_validation_imports_without_jax():
    # The one config-path getter and setter live there, for readers of configs on disk too.
    code = (
        'import sys, resnet_jax.validation; print([m for m in ("jax", "flax") if m in sys.modules])'
    )
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=repo)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == '[]'


@pytest.mark.parametrize('value', ['inf', 'nan'])
def test_non_finite_learning_rate_is_refused(value):
    config = make_tiny_config('')
    config.learning_rate = float(value)
    with pytest.raises(validation.ConfigError, match='learning_rate must be a finite number'):
        checks.validate_config(config)


def test_the_shipped_configs_are_valid():
    from resnet_jax.configs import paper_sweep, smoke  # pylint: disable=g-import-not-at-top

    for module in (default, smoke):
        checks.validate_config(module.get_config())
    sweep_config = paper_sweep.get_config()
    del sweep_config['sweep']
    checks.validate_config(sweep_config)


def _invalid(field, value):
    """The default config with ``field`` set to ``value``, whatever its type."""
    plain = default.get_config().to_dict()
    if field == 'momentum':  # Checked for the optimiser that reads it.
        plain['optimizer'] = 'sgd'
    validation.set_field(plain, field, value)
    return ml_collections.ConfigDict(plain)


@pytest.mark.parametrize(
    'field,value,message',
    [
        ('model', 'resnet9', r"config\.model='resnet9' is not one of paper, resnet18, resnet34"),
        ('dtype', 'float16', r"config\.dtype='float16' is not one of bfloat16, float32"),
        ('optimizer', 'rmsprop', r"config\.optimizer='rmsprop' is not one of adam, sgd"),
        ('schedule', 'linear', r"config\.schedule='linear' is not one of"),
        ('data.source', 'hdf5', r"config\.data\.source='hdf5' is not one of"),
        ('batch_size', 0, r'config\.batch_size must be >= 1, got 0'),
        ('num_epochs', 0, r'config\.num_epochs must be >= 1, got 0'),
        ('num_epochs', 1.5, r'config\.num_epochs must be an integer, got 1\.5'),
        ('num_epochs', True, r'config\.num_epochs must be an integer, got True'),
        ('seed', -1, r'config\.seed must be >= 0, got -1'),
        ('steps_per_call', 0, None),  # 0 is allowed: a whole epoch per call.
        ('learning_rate', 0.0, r'config\.learning_rate must be a finite number > 0, got 0\.0'),
        ('learning_rate', -0.1, r'config\.learning_rate must be a finite number > 0, got -0\.1'),
        ('learning_rate', 'fast', r"config\.learning_rate must be a number, got 'fast'"),
        ('weight_decay', 0.0, None),
        ('weight_decay', -0.1, r'config\.weight_decay must be a finite number >= 0'),
        ('momentum', 1.0, r'config\.momentum must be in \[0, 1\), got 1\.0'),
        ('adam_b2', -0.5, r'config\.adam_b2 must be in \[0, 1\)'),
        ('data.path', '/no/such/dir', 'data path does not exist: /no/such/dir'),
    ],
)
def test_each_invalid_field_is_named(field, value, message):
    config = _invalid(field, value)
    if message is None:
        checks.validate_config(config)
    else:
        with pytest.raises(validation.ConfigError, match=f'^{message}'):
            checks.validate_config(config)


def test_normalisation_needs_three_positive_stds():
    config = default.get_config()
    config.data.std = (0.0, 0.0, 0.0)  # Unused while normalize is off.
    checks.validate_config(config)
    config.data.normalize = True
    with pytest.raises(validation.ConfigError, match=r'config\.data\.std must be > 0'):
        checks.validate_config(config)
    config.data.mean = (0.5, 0.5)
    with pytest.raises(validation.ConfigError, match=r'config\.data\.mean must be 3 numbers'):
        checks.validate_config(config)


@pytest.mark.parametrize('source', ['cifar', 'folder'])
def test_a_local_source_needs_a_path(source):
    config = default.get_config()
    config.data.source = source
    with pytest.raises(validation.ConfigError, match=f"source='{source}' needs config.data.path"):
        checks.validate_config(config)


def test_the_distributed_section_is_checked_first():
    with pytest.raises(validation.ConfigError, match='must return an ml_collections.ConfigDict'):
        validation.validate_distributed(dict(default.get_config()))
    config = default.get_config()
    del config.distributed
    with pytest.raises(validation.ConfigError, match=r'^config\.distributed\.enabled is missing$'):
        validation.validate_distributed(config)
    for field, value, message in (
        ('enabled', 'yes', "enabled must be True or False, got 'yes'"),
        ('coordinator_address', 1234, 'coordinator_address must be a string, got 1234'),
        ('num_processes', 0, 'num_processes must be >= 1, got 0'),
        ('process_id', -1, 'process_id must be >= 0, got -1'),
    ):
        with pytest.raises(validation.ConfigError, match=f'distributed.{message}'):
            validation.validate_distributed(_invalid(f'distributed.{field}', value))
