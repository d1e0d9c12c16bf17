"""Reproducible installs: constraints.txt pins every dependency, and CI uses it."""

import importlib.metadata
import os
import re

import tomllib

from resnet_jax.training import runs
from tests.conftest import REPO


def _name(requirement):
    """The normalised package name of a requirement ('jax[cuda12]>=0.4' -> 'jax')."""
    return re.sub(r'[-_.]+', '-', re.split(r'[\[<>=!~; ]', requirement, maxsplit=1)[0]).lower()


def _pins():
    with open(os.path.join(REPO, 'constraints.txt')) as f:
        lines = [line.strip() for line in f if line.strip() and not line.startswith('#')]
    pins = dict(line.split('==') for line in lines)
    return {_name(name): version for name, version in pins.items()}


def test_every_dependency_and_test_dependency_is_pinned():
    with open(os.path.join(REPO, 'pyproject.toml'), 'rb') as f:
        project = tomllib.load(f)['project']
    wanted = [*project['dependencies'], *project['optional-dependencies']['test']]
    pins = _pins()
    assert [r for r in wanted if _name(r) not in pins] == []
    assert 'resnet-jax' not in pins  # The project itself is installed from the checkout.


def test_the_pins_are_what_the_tests_run_with():
    pins = _pins()
    for name in ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy'):
        assert pins[name] == importlib.metadata.version(name)


def test_ci_installs_with_the_constraints():
    with open(os.path.join(REPO, '.ci', 'run')) as f:
        script = f.read()
    assert "pip install -c constraints.txt -e '.[test]'" in script


def test_the_versions_a_summary_records():
    assert runs.versions() == {
        name: importlib.metadata.version(name)
        for name in ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint')
    }
