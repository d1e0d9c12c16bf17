"""JAX's persistent compilation cache, shared by the runs, trials and workers of a machine.

    from resnet_jax.training import compile_cache
    compile_cache.enable()                  # the default folder (below)
    compile_cache.enable('/scratch/jax')    # or another one; 'none' turns it off

Every compiled program (a training call, an evaluation) is written to the
cache folder once it took JAX at least
``jax_persistent_cache_min_compile_time_secs`` to compile, and read back by any
later process that compiles the same program: the next trial of a study,
another worker, a rerun. The command line enables it before anything compiles
(``--compilation_cache``). The default folder is ``$JAX_COMPILATION_CACHE_DIR``
when set, else ``$XDG_CACHE_HOME/resnet_jax/jax`` (``~/.cache/resnet_jax/jax``).

A cache never stops a run: a folder that cannot be created or written is one
warning line and the run compiles without it; an entry that cannot be read or
written later (a full disk) is one warning line, once, and the program is
compiled as if there were no cache.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import warnings
from typing import Any

logger = logging.getLogger('resnet_jax')

OFF = ('none', 'off', '')  # Values of --compilation_cache that turn the cache off.
# How JAX words its warnings about an entry it could not read or write.
_JAX_CACHE_WARNING = 'Error (reading|writing) persistent compilation cache entry'
_state: dict[str, Any] = {'warned': False, 'hooked': False}


def default_dir() -> str:
    """``$JAX_COMPILATION_CACHE_DIR``, else ``$XDG_CACHE_HOME/resnet_jax/jax``."""
    if os.environ.get('JAX_COMPILATION_CACHE_DIR'):
        return os.environ['JAX_COMPILATION_CACHE_DIR']
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(base, 'resnet_jax', 'jax')


def enable(path: str | None = None) -> str | None:
    """Points JAX's persistent compilation cache at ``path`` (None: :func:`default_dir`).

    Returns the folder in use, or None when the cache is off (``path`` in
    :data:`OFF`) or the folder cannot be used (a warning line says why).
    """
    import jax  # pylint: disable=g-import-not-at-top

    if path is not None and path.strip().lower() in OFF:
        jax.config.update('jax_compilation_cache_dir', None)
        return None
    folder = os.path.abspath(os.path.expanduser(path or default_dir()))
    problem = _unusable(folder)
    if problem:
        logger.warning(
            'the compilation cache %s cannot be used (%s): compiling without it', folder, problem
        )
        jax.config.update('jax_compilation_cache_dir', None)
        return None
    jax.config.update('jax_compilation_cache_dir', folder)
    _hook_jax_warnings(folder)
    return folder


def _unusable(folder: str) -> str | None:
    """Why ``folder`` cannot hold the cache (None if it can): created if need be,
    and a file written and removed in it."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix='.probe-'):
            pass
    except OSError as e:
        return e.strerror or str(e)
    return None


def _hook_jax_warnings(folder: str) -> None:
    """Turns JAX's warnings about cache entries it could not read or write into
    one warning line of this tool's log (the first only)."""
    if _state['hooked']:
        return
    _state['hooked'] = True
    shown = warnings.showwarning

    def show(message: Any, category: Any, filename: str, lineno: int, *args: Any) -> None:
        text = str(message)
        if not re.match(_JAX_CACHE_WARNING, text):
            shown(message, category, filename, lineno, *args)
            return
        if not _state['warned']:
            _state['warned'] = True
            reason = text.split(': ', 1)[-1]
            logger.warning(
                'the compilation cache %s failed (%s): programs it cannot hold are '
                'compiled without it',
                jax_cache_dir() or folder,
                reason,
            )

    warnings.showwarning = show
    # Shown every time they occur, so that the hook (not Python's once-per-place
    # filter) decides: the first one is one line, the rest are silent.
    warnings.filterwarnings('always', message=_JAX_CACHE_WARNING)


def jax_cache_dir() -> str | None:
    """The folder JAX's persistent compilation cache uses now (None: off)."""
    import jax  # pylint: disable=g-import-not-at-top

    return jax.config.jax_compilation_cache_dir
