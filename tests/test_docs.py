"""The documentation speaks of the project only, and committed results hold no
machine's absolute paths."""

import glob
import os
import re

import pytest

from tests.conftest import REPO

DOCS = [
    'README.md',
    'BENCHMARKS.md',
    'results/README.md',
    *glob.glob('benchmarks/*.sh', root_dir=REPO),
]
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
