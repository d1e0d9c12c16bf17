"""Config files: the ones that ship with the package, and what a file defines.

``--config`` takes a config file's path or the name of a config that ships with
the package as :mod:`resnet_jax.configs` (the repository's ``configs/`` folder):
``--config paper_sweep`` is that package's ``paper_sweep.py``. A file of the same
name in the working directory wins over a shipped config.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import pkgutil
import sys
from typing import Any

SHIPPED = 'resnet_jax.configs'


def shipped() -> dict[str, str]:
    """The configs that ship with the package, ``{name: file}`` in name order."""
    spec = importlib.util.find_spec(SHIPPED)
    found: dict[str, str] = {}
    for folder in spec.submodule_search_locations if spec else ():
        for module in pkgutil.iter_modules([folder]):
            if not module.ispkg and not module.name.startswith('_'):
                found.setdefault(module.name, os.path.join(folder, f'{module.name}.py'))
    return dict(sorted(found.items()))


def summary(path: str) -> str:
    """The first line of a config file's docstring ('' if it has none)."""
    try:
        with open(path) as f:
            doc = ast.get_docstring(ast.parse(f.read())) or ''
    except (OSError, SyntaxError, ValueError):
        return ''
    return doc.strip().split('\n', 1)[0]


def resolve(value: str) -> str:
    """A ``--config`` value with a shipped config's name replaced by its file
    (``paper_sweep:arg`` -> ``.../paper_sweep.py:arg``); paths are left as they are."""
    name, colon, arg = value.partition(':')
    if os.path.isfile(name):
        return value
    path = shipped().get(name)
    return value if path is None else f'{path}{colon}{arg}'


def resolve_argv(argv: list[str]) -> list[str]:
    """``argv`` with the value of ``--config`` (either form) passed through :func:`resolve`."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg.startswith('--config='):
            out[i] = '--config=' + resolve(arg[len('--config=') :])
        elif arg == '--config' and i + 1 < len(out):
            out[i + 1] = resolve(out[i + 1])
    return out


def not_found(path: str) -> str:
    """The error line of a ``--config`` that names no file (and no shipped config)."""
    message = f'config file not found: {path}'
    if os.sep in path or path.endswith('.py'):
        return message
    return f'{message} (shipped configs: {", ".join(shipped()) or "none"})'


def allow_sibling_imports(path: str) -> None:
    """Lets a config file outside the package import its neighbours: a file in
    ``X/configs/`` may ``from configs import default`` (``X/configs/default.py``).
    Never for a file inside a package (a shipped config of an installed package):
    that package's modules would shadow top-level ones."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if root not in sys.path and not os.path.isfile(os.path.join(root, '__init__.py')):
        sys.path.insert(0, root)


def load(path: str) -> Any:
    """``get_config()`` of the config file at ``path``."""
    allow_sibling_imports(path)
    spec = importlib.util.spec_from_file_location('_config', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def fields(path: str) -> list[str]:
    """Dotted names of every field of the config file at ``path`` ([] if it does not load)."""
    try:
        return _flatten(load(path))
    except Exception:  # pylint: disable=broad-except  # Only for a hint.
        return []


def _flatten(node: Any, prefix: str = '') -> list[str]:
    flat = []
    for key, value in node.items():
        if hasattr(value, 'items'):
            flat += _flatten(value, f'{prefix}{key}.')
        else:
            flat.append(f'{prefix}{key}')
    return flat
