"""A finished run is read-only, and a torn last record is rebuilt.

Rerunning a finished run changes no file (no summary, config or records
rewritten, no new TensorBoard file) and says it is complete; asking for fewer
epochs than it has is refused, changing nothing. A ``metrics.jsonl`` whose
last line was torn by a crash gets that epoch's record back from its
checkpoint, and the run stays completed.
"""

import json
import os
import shutil

import pytest

from resnet_jax.reports import load
from resnet_jax.rundir import workdir as workdir_lib
from tests.conftest import one_error_line, tiny_args
from tests.test_ownership import snapshot


@pytest.fixture(scope='module')
def finished(cli, tmp_path_factory, cifar_py):
    """A finished 2-epoch run (copy it before changing it)."""
    folder = tmp_path_factory.mktemp('finished')
    proc = cli.run(tiny_args(cifar_py.path, folder, epochs=2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder


def _copy(finished, tmp_path):
    target = tmp_path / 'run'
    shutil.copytree(finished, target)
    return target


def _stat(folder):
    return {p: os.stat(os.path.join(folder, p)).st_mtime_ns for p in snapshot(folder)}


def test_a_rerun_of_a_finished_run_changes_no_file(cli, finished, cifar_py, tmp_path):
    run = _copy(finished, tmp_path)
    before, times = snapshot(run), _stat(run)
    proc = cli.run(tiny_args(cifar_py.path, run, epochs=2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'complete' in proc.stdout
    assert snapshot(run) == before  # No new file (TensorBoard's included), none changed.
    assert _stat(run) == times  # Not even rewritten with the same bytes.


def test_fewer_epochs_than_done_is_refused_and_changes_nothing(cli, finished, cifar_py, tmp_path):
    run = _copy(finished, tmp_path)
    before = snapshot(run)
    one_error_line(cli.run(tiny_args(cifar_py.path, run)), '2 epochs')
    assert snapshot(run) == before
    with open(run / 'summary.json') as f:
        assert json.load(f)['status'] == 'completed'


def test_a_torn_last_record_is_rebuilt_from_its_checkpoint(cli, finished, cifar_py, tmp_path):
    run = _copy(finished, tmp_path)
    records = workdir_lib.read_metrics(str(run))
    text = (run / 'metrics.jsonl').read_text()
    torn = text[: len(text) - len(json.dumps(records[-1])) // 2]  # Half the last line.
    (run / 'metrics.jsonl').write_text(torn)
    assert [r['epoch'] for r in workdir_lib.read_metrics(str(run))] == [1]
    proc = cli.run(tiny_args(cifar_py.path, run, epochs=2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert workdir_lib.read_metrics(str(run)) == records  # Exactly the lost record.
    with open(run / 'summary.json') as f:
        summary = json.load(f)
    assert summary['status'] == 'completed' and summary['epochs_completed'] == 2
    assert load.load_run(str(run), 'run', {}).status == 'completed'


def test_the_summary_records_the_library_versions(finished):
    with open(finished / 'summary.json') as f:
        versions = json.load(f)['versions']
    assert sorted(versions) == ['flax', 'jax', 'jaxlib', 'optax', 'orbax-checkpoint']
    assert all(isinstance(v, str) and v[0].isdigit() for v in versions.values())
