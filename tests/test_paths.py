"""Paths are recorded as given: a relative data path stays relative in a run's
config and summary (committed results then hold no machine's paths)."""

import json
import os
import shutil

from tests.conftest import REPO, tiny_args


def test_a_relative_data_path_is_recorded_as_given(cli, cifar_py, tmp_path):
    shutil.copytree(cifar_py.path, tmp_path / 'data' / 'cifar-10-batches-py')
    config = os.path.join(REPO, 'configs', 'default.py')
    proc = cli.run(
        tiny_args('data', 'run', config=config), cwd=str(tmp_path), env={'PYTHONPATH': REPO}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / 'run' / 'summary.json') as f:
        summary = json.load(f)
    assert summary['config']['data']['path'] == 'data'
    assert summary['data']['path'] == os.path.join('data', 'cifar-10-batches-py')
    assert str(tmp_path) not in json.dumps(summary)
