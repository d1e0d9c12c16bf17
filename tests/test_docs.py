"""The documentation speaks of the project only and names what exists (config
fields, modules, paths, links), the README stays short, and committed results
hold no machine's absolute paths."""

import ast
import functools
import glob
import os
import re

import ml_collections
import pytest

from resnet_jax import config as config_lib
from resnet_jax.studies import search_space, sweep
from tests.conftest import REPO

# The README and the pages it links to: what they name must exist.
PAGES = ['README.md', *sorted(glob.glob('docs/*.md', root_dir=REPO))]
DOCS = [
    *PAGES,
    'CHANGELOG.md',
    'BENCHMARKS.md',
    'results/README.md',
    *glob.glob('benchmarks/*.sh', root_dir=REPO),
]
README_MAX_LINES = 250
TEXT = ('.json', '.jsonl', '.md', '.csv', '.log', '.txt')
# How the project was made is no part of it.
MAKING = [r'\blent\b', r'\bsessions?\b', r'\brun\(', r'\bcarry=', r'\bissue \d', r'\.\./shared/']


@pytest.mark.parametrize('doc', DOCS)
def test_the_docs_speak_of_the_project_only(doc):
    with open(os.path.join(REPO, doc)) as f:
        text = f.read()
    assert [p for p in MAKING if re.search(p, text)] == []


def test_committed_results_hold_no_absolute_paths():
    found = []
    for path in glob.glob(os.path.join(REPO, 'results', '**', '*'), recursive=True):
        if not os.path.isfile(path) or not path.endswith(TEXT):
            continue
        with open(path, errors='replace') as f:
            text = f.read()
        if re.search(r'(?<![\w.~])/(work|root|home|tmp|Users)/', text):
            found.append(os.path.relpath(path, REPO))
    assert found == []


def test_the_readme_counts_the_invocations_of_the_50_epoch_run():
    events = glob.glob(os.path.join(REPO, 'results', 'paper_best', 'events.out.tfevents.*'))
    with open(os.path.join(REPO, 'results', 'paper_best', 'train.log')) as f:
        resumed = sum('resuming after epoch' in line for line in f)
    assert len(events) == resumed + 1 == 3
    with open(os.path.join(REPO, 'README.md')) as f:
        assert 'three invocations' in f.read()


def _text(doc: str) -> str:
    with open(os.path.join(REPO, doc)) as f:
        return f.read()


def test_the_readme_reads_in_five_minutes():
    assert len(_text('README.md').splitlines()) <= README_MAX_LINES


def test_the_docs_folder_holds_the_pages_the_readme_links():
    assert len(PAGES) > 1


# ----------------------------------------------------------- config fields ----

# `config.FIELD` or `--config.FIELD`, not `resnet_jax.config.x` nor `.../config.py`.
_FIELD = re.compile(r'(?<![\w./-])(?:--)?config\.([a-z_]\w*(?:\.[a-z_]\w*)*)')
_FILES = ('json', 'py')  # config.json, config.py: files, not fields.


def _has_field(config: ml_collections.ConfigDict, dotted: str) -> bool:
    node = config
    for part in dotted.split('.'):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return False
        node = node[part]
    return True


def _field_exists(dotted: str, declared: set[str]) -> bool:
    """Whether ``config.<dotted>`` is a field of the default config, of a
    ``search`` or ``sweep`` section, or one the docs' own examples register."""
    config = config_lib.get_config()
    head, _, rest = dotted.partition('.')
    if head == 'search':
        name, _, sub = rest.partition('.')
        if not rest:
            return True
        if name == 'space':
            return not sub or _has_field(config, sub) or sub in declared
        return (name in search_space.default_section() or name in declared) and not sub
    if head == 'sweep':
        name = rest.split('.')[0]
        return not rest or name in sweep.OPTIONS or _has_field(config, rest)
    return _has_field(config, dotted) or dotted in declared


@pytest.mark.parametrize('doc', PAGES)
def test_the_config_fields_named_exist(doc):
    text = _text(doc)
    declared = set(re.findall(r"fields=\{'([\w.]+)'", text))  # An example's own fields.
    named = {m.rstrip('.') for m in _FIELD.findall(text)} - set(_FILES)
    assert sorted(f for f in named if not _field_exists(f, declared)) == []


# ------------------------------------------------------- modules and paths ----

_PACKAGE = os.path.join(REPO, 'resnet_jax')
_LAYERS = ('models', 'datasets', 'rundir', 'training', 'studies', 'reports', 'cli')
_MODULE = re.compile(r'(?<![\w./-])resnet_jax(?:\.\w+)+')
# Dotted names from a layer down (`training.checks.validate_config`) or a base module.
_SHORT = re.compile(rf'`((?:{"|".join(_LAYERS)}|validation|registry)(?:\.\w+)+)`')
_PATH = re.compile(r'(?<![\w./~-])((?:resnet_jax|benchmarks|tests|results|docs)/[\w./-]*)')
# A file of a layer named from the package's root (`training/checks.py`).
_LAYER_PATH = re.compile(rf'(?<![\w./-])((?:{"|".join(_LAYERS)})/\w+\.py)')
# The shipped configs as the package resnet_jax.configs: checked once it exists.
_CONFIGS = 'resnet_jax.configs'


@functools.cache
def _top_level_names(path: str) -> frozenset[str]:
    """Names a module defines or imports at its top level, and its ``__all__``."""
    with open(path) as f:
        tree = ast.parse(f.read())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split('.')[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
            if any(isinstance(t, ast.Name) and t.id == '__all__' for t in targets):
                names.update(ast.literal_eval(node.value))
    return frozenset(names)


def _resolves(dotted: str) -> bool:
    """Whether ``resnet_jax.a.b...`` is a module of the tree, or a name one defines."""
    parts = dotted.split('.')[1:]
    folder = _PACKAGE
    for i, part in enumerate(parts):
        if os.path.isfile(os.path.join(folder, part, '__init__.py')):
            folder = os.path.join(folder, part)
        elif os.path.isfile(os.path.join(folder, f'{part}.py')):
            rest = parts[i + 1 :]
            path = os.path.join(folder, f'{part}.py')
            return not rest or rest[0] in _top_level_names(path)
        else:
            return part in _top_level_names(os.path.join(folder, '__init__.py'))
    return True


def _modules_named(text: str) -> set[str]:
    named = set(_MODULE.findall(text))
    named |= {f'resnet_jax.{m}' for m in _SHORT.findall(text)}
    if not os.path.isdir(os.path.join(_PACKAGE, 'configs')):
        named = {n for n in named if n != _CONFIGS and not n.startswith(f'{_CONFIGS}.')}
    return named


@pytest.mark.parametrize('doc', PAGES)
def test_the_modules_named_exist(doc):
    assert sorted(m for m in _modules_named(_text(doc)) if not _resolves(m)) == []


@pytest.mark.parametrize('doc', PAGES)
def test_the_paths_named_exist(doc):
    text = _text(doc)
    paths = {p.rstrip('.,') for p in _PATH.findall(text)}
    paths |= {f'resnet_jax/{p}' for p in _LAYER_PATH.findall(text)}
    assert sorted(p for p in paths if not os.path.exists(os.path.join(REPO, p))) == []


# ------------------------------------------------------------------ links ----

_LINK = re.compile(r'\[[^\]]*\]\(([^)\s]+)\)')


@pytest.mark.parametrize('doc', [*PAGES, 'CHANGELOG.md'])
def test_the_relative_links_point_to_files(doc):
    here = os.path.dirname(os.path.join(REPO, doc))
    targets = [t.split('#')[0] for t in _LINK.findall(_text(doc))]
    relative = [t for t in targets if t and not re.match(r'[a-z]+:', t)]
    assert sorted(t for t in relative if not os.path.exists(os.path.join(here, t))) == []
