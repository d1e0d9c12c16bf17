"""JAX's persistent compilation cache (resnet_jax.training.compile_cache): on by
default, shared by processes, off on request, and never a reason for a run to stop."""

import logging
import os

import jax
import jax.numpy as jnp
import pytest

from resnet_jax.training import compile_cache
from tests.conftest import tiny_args


@pytest.fixture
def restored_cache_dir():
    """Puts JAX's cache folder back as it was after the test."""
    before = jax.config.jax_compilation_cache_dir
    yield
    jax.config.update('jax_compilation_cache_dir', before)


def test_the_default_folder_is_jax_s_variable_else_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', str(tmp_path / 'jax'))
    assert compile_cache.default_dir() == str(tmp_path / 'jax')
    monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR')
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
    assert compile_cache.default_dir() == str(tmp_path / 'xdg' / 'resnet_jax' / 'jax')


@pytest.mark.usefixtures('restored_cache_dir')
def test_none_turns_the_cache_off():
    assert compile_cache.enable('none') is None
    assert compile_cache.jax_cache_dir() is None


@pytest.mark.usefixtures('restored_cache_dir')
def test_a_folder_that_cannot_be_made_is_a_warning_and_no_cache(tmp_path, caplog):
    blocker = tmp_path / 'a_file'
    blocker.write_text('not a folder')
    with caplog.at_level(logging.WARNING, logger='resnet_jax'):
        assert compile_cache.enable(str(blocker / 'cache')) is None
    assert compile_cache.jax_cache_dir() is None
    (line,) = [r.getMessage() for r in caplog.records]
    assert 'cannot be used' in line and 'compiling without it' in line


@pytest.mark.usefixtures('restored_cache_dir')
def test_an_entry_that_cannot_be_written_is_one_warning_line(tmp_path, caplog, monkeypatch):
    """A full disk: JAX's own warning per entry becomes one line of the tool's log."""
    from jax._src import compilation_cache as jax_cache  # pylint: disable=g-import-not-at-top

    def full(*args, **kwargs):
        raise OSError(28, 'No space left on device')

    assert compile_cache.enable(str(tmp_path / 'cache')) == str(tmp_path / 'cache')
    monkeypatch.setattr(jax_cache, 'put_executable_and_time', full)
    monkeypatch.setattr(jax_cache, 'is_cache_used', lambda backend: True)
    monkeypatch.setitem(compile_cache._state, 'warned', False)
    with caplog.at_level(logging.WARNING, logger='resnet_jax'):
        for n in (17, 19):  # Two new programs, two failed writes.
            value = jax.jit(lambda x, n=n: jnp.cos(x) * n)(jnp.ones((n, 3)))
            assert float(value.sum()) == pytest.approx(n * 3 * n * float(jnp.cos(1.0)), rel=1e-5)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and 'No space left on device' in lines[0], lines


def test_runs_share_the_cache_and_a_broken_one_does_not_stop_a_run(cli, tmp_path, cifar_py):
    """Two runs in two processes: the second finds the first's programs in the
    cache folder. A cache folder that cannot be made is a warning; the run trains."""
    cache = tmp_path / 'cache'
    env = {'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0'}
    first = cli.run(
        tiny_args(cifar_py.path, tmp_path / 'a', f'--compilation_cache={cache}'), env=env
    )
    assert first.returncode == 0, first.stderr[-2000:]
    entries = set(os.listdir(cache))
    assert any(e.startswith('jit_') for e in entries), entries
    second = cli.run(
        tiny_args(cifar_py.path, tmp_path / 'b', f'--compilation_cache={cache}'), env=env
    )
    assert second.returncode == 0, second.stderr[-2000:]
    assert set(os.listdir(cache)) == entries  # Nothing new to compile: every program was read.
    (tmp_path / 'file').write_text('')
    broken = cli.run(
        tiny_args(cifar_py.path, tmp_path / 'c', f'--compilation_cache={tmp_path}/file/cache'),
        env=env,
    )
    assert broken.returncode == 0, broken.stderr[-2000:]
    assert 'cannot be used' in broken.stdout
    assert os.path.exists(tmp_path / 'c' / 'summary.json')
