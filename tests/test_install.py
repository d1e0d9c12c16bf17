"""Installs: constraints.txt pins every dependency and CI uses it; the package (its
configs included) ships whole, and runs the study from a wheel or an editable install."""

import glob
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys

import pytest
import tomllib

from resnet_jax.cli import config_files
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


def _pyproject():
    with open(os.path.join(REPO, 'pyproject.toml'), 'rb') as f:
        return tomllib.load(f)


def test_every_dependency_and_test_dependency_is_pinned():
    project = _pyproject()['project']
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


def test_every_folder_of_the_package_and_the_configs_ship():
    setuptools = _pyproject()['tool']['setuptools']
    folders = {
        os.path.relpath(root, REPO).replace(os.sep, '.')
        for root, _, _ in os.walk(os.path.join(REPO, 'resnet_jax'))
        if '__pycache__' not in root
    }
    assert sorted(setuptools['packages']) == sorted(folders | {'resnet_jax.configs'})
    assert setuptools['package-dir'] == {'resnet_jax.configs': 'configs'}


def test_the_license_is_apache_2_as_an_spdx_expression():
    pyproject = _pyproject()
    assert pyproject['project']['license'] == 'Apache-2.0'
    assert pyproject['project']['license-files'] == ['LICENSE']
    assert pyproject['build-system']['requires'] == ['setuptools>=77']
    with open(os.path.join(REPO, 'LICENSE')) as f:
        text = f.read()
    assert 'Apache License\n                           Version 2.0, January 2004' in text
    assert 'END OF TERMS AND CONDITIONS' in text


def _configs_folder():
    return sorted(f[:-3] for f in os.listdir(os.path.join(REPO, 'configs')) if f[0] != '_')


def test_the_shipped_configs_are_the_configs_folder_and_resolve_by_name():
    shipped = config_files.shipped()
    assert list(shipped) == _configs_folder()
    smoke = shipped['smoke']
    assert smoke.endswith(os.path.join('', 'smoke.py'))
    assert config_files.resolve('smoke') == smoke
    assert config_files.resolve('smoke:arg') == f'{smoke}:arg'
    assert config_files.resolve('no_such') == 'no_such'
    path = os.path.join(REPO, 'configs', 'smoke.py')
    assert config_files.resolve(path) == path
    argv = ['prog', '--config=smoke', '--config', 'paper_sweep', '--config.seed=1']
    assert config_files.resolve_argv(argv) == [
        'prog',
        f'--config={smoke}',
        '--config',
        shipped['paper_sweep'],
        '--config.seed=1',
    ]


USER_CONFIG = """
from resnet_jax.configs import paper_sweep


def get_config():
    config = paper_sweep.get_config()
    config.num_epochs = 7
    return config
"""

# Prints where the package and its configs were imported from, and the user config.
LOAD_USER_CONFIG = """
import resnet_jax, resnet_jax.configs
from resnet_jax.cli import config_files
config = config_files.load('mine.py')
print(resnet_jax.__file__, resnet_jax.configs.__file__, config.num_epochs, config.sweep.shuffle, sep='\\n')
"""


def _install(kind, source, venv, dist):
    """Installs ``source`` into ``venv`` (no network; the dependencies are the ones of
    this interpreter) as a built wheel or editable; the wheel's source is deleted."""
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True)
    (site,) = glob.glob(str(venv / 'lib' / 'python*' / 'site-packages'))
    with open(os.path.join(site, 'dependencies.pth'), 'w') as f:
        f.write('\n'.join(p for p in sys.path if p.endswith('-packages')) + '\n')
    pip = [str(venv / 'bin' / 'python'), '-m', 'pip', '-q']
    pip += ['--disable-pip-version-check', '--no-input']
    local = ['--no-deps', '--no-build-isolation', '--no-index']
    if kind == 'wheel':
        subprocess.run([*pip, 'wheel', *local, '-w', str(dist), str(source)], check=True)
        shutil.rmtree(source)
        (wheel,) = glob.glob(str(dist / '*.whl'))
        subprocess.run([*pip, 'install', *local, '--ignore-installed', wheel], check=True)
    else:
        subprocess.run(
            [*pip, 'install', *local, '--ignore-installed', '-e', str(source)], check=True
        )


@pytest.mark.slow  # Builds and installs the package, starts its command line.
@pytest.mark.parametrize('kind', ['wheel', 'editable'])
def test_the_installed_package_runs_the_study_on_its_own(tmp_path, kind):
    if int(importlib.metadata.version('setuptools').split('.')[0]) < 77:
        pytest.skip('building the package needs setuptools>=77 (the test extra)')
    source = tmp_path / 'source'
    source.mkdir()
    for name in ('pyproject.toml', 'README.md', 'LICENSE'):
        shutil.copy(os.path.join(REPO, name), source)
    for name in ('resnet_jax', 'configs'):
        ignore = shutil.ignore_patterns('__pycache__')
        shutil.copytree(os.path.join(REPO, name), source / name, ignore=ignore)
    venv = tmp_path / 'venv'
    _install(kind, source, venv, tmp_path / 'dist')

    home = tmp_path / 'elsewhere'  # Outside the repository and the source.
    home.mkdir()
    (home / 'mine.py').write_text(USER_CONFIG)
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    env['JAX_PLATFORMS'] = 'cpu'

    def run(*command):
        program = str(venv / 'bin' / command[0])
        proc = subprocess.run(
            [program, *command[1:]], cwd=home, env=env, capture_output=True, text=True
        )
        return proc

    proc = run('python', '-c', LOAD_USER_CONFIG)
    assert proc.returncode == 0, proc.stderr
    package, configs, epochs, shuffle = proc.stdout.splitlines()
    installed = str(venv) if kind == 'wheel' else str(source)
    assert package.startswith(installed) and configs.startswith(installed)
    if kind == 'editable':
        assert configs == str(source / 'configs' / '__init__.py')
    assert (epochs, shuffle) == ('7', '(True, False)')

    proc = run('resnet-jax', '--help')
    assert proc.returncode == 0, proc.stderr
    listed = proc.stdout.split('Shipped configs (--config NAME):\n')[1].split('\n\n')[0]
    assert [line.split(':')[0].strip() for line in listed.splitlines()] == _configs_folder()
    for config in ('mine.py', 'paper_sweep'):  # Loaded: its fields are known.
        proc = run('resnet-jax', '--config', config, '--workdir', 'w', '--config.num_epoch=1')
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines() == [
            'error: unknown config field config.num_epoch in --config.num_epoch=1; '
            'did you mean config.num_epochs?'
        ]
    proc = run('resnet-jax-bench', '--help')
    assert proc.returncode == 0 and 'resnet-jax-bench' in proc.stdout, proc.stderr
    assert not (home / 'w').exists()
