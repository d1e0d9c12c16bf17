"""Every file read back is checked: one ``error:`` line names a malformed one.

Records (``metrics.jsonl``), summaries, configs and sweep manifests this tool
wrote, and the datasets it reads (CIFAR batches, TFDS data dirs): a wrong type
or shape stops training with one line naming the file, exit 2, nothing
changed; in a sweep report the affected run is marked 'unreadable' and the
report goes on.
"""

import json
import os
import pickle

import numpy as np
import pytest

from resnet_jax import datasets
from resnet_jax.reports import load
from resnet_jax.rundir import workdir, writers
from resnet_jax.rundir import workdir as workdir_lib
from tests import fake_data
from tests.conftest import one_error_line, tiny_args
from tests.test_ownership import snapshot


def make_sweep(root, axes):
    """A sweep's manifest over ``axes`` (one axis); returns its runs."""
    ((axis, values),) = axes.items()
    runs = [{'name': f'{axis}={v}', 'overrides': {axis: v}} for v in values]
    base = {'model': 'paper', 'optimizer': 'adam', 'learning_rate': 0.01, 'batch_size': 100,
            'num_epochs': 2, 'seed': 0, 'data': {'source': 'folder', 'path': 'data/x'}}  # fmt: skip
    os.makedirs(root, exist_ok=True)
    manifest = {'axes': axes, 'runs': runs, 'base_config': base}
    workdir.write_json(os.path.join(root, 'sweep.json'), manifest)
    return runs


def write_run(root, run):
    """A completed 2-epoch run folder of ``run``, as training writes it."""
    with open(os.path.join(root, 'sweep.json')) as f:
        config = load.config_with_overrides(json.load(f)['base_config'], run['overrides'])
    folder = os.path.join(root, run['name'])
    os.makedirs(folder)
    records = [
        {'epoch': e, 'train_loss': 1.0 / e, 'train_accuracy': 0.4 * e, 'test_loss': 1.1 / e,
         'test_accuracy': 0.3 * e, 'learning_rate': 0.01, 'epoch_seconds': 5.0,
         'images_per_second': 100.0}
        for e in (1, 2)
    ]  # fmt: skip
    with open(os.path.join(folder, 'metrics.jsonl'), 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in records)
    workdir.write_json(os.path.join(folder, 'config.json'), config)
    summary = {**writers.summarize(records), 'config': config, 'status': 'completed'}
    workdir.write_json(os.path.join(folder, 'summary.json'), summary)


def test_a_record_of_the_wrong_type_is_named(tmp_path):
    path = tmp_path / 'metrics.jsonl'
    path.write_text('{"epoch": 1, "test_accuracy": 0.5}\n{"epoch": "x"}\n')
    with pytest.raises(workdir.RecordError, match=r'metrics.jsonl line 2.*epoch'):
        workdir_lib.read_metrics(str(tmp_path))
    path.write_text('{"epoch": 1, "test_accuracy": "high"}\n')
    with pytest.raises(workdir.RecordError, match='test_accuracy'):
        workdir_lib.read_metrics(str(tmp_path))
    path.write_text('not json\n{"epoch": 1}\n')  # Only a last line may be torn.
    with pytest.raises(workdir.RecordError, match='line 1'):
        workdir_lib.read_metrics(str(tmp_path))
    path.write_text('{"epoch": 1}\n{"epo')  # A torn last line: skipped.
    assert workdir_lib.read_metrics(str(tmp_path)) == [{'epoch': 1}]


@pytest.mark.parametrize(
    'file,content,fragment',
    [
        ('metrics.jsonl', '{"epoch": "x"}\n', 'metrics.jsonl'),
        ('summary.json', '{"status": "completed", "epochs_completed": "x"}', 'summary.json'),
        ('config.json', None, 'config.json'),
    ],
)
def test_resuming_from_a_malformed_file_is_one_line(
    cli, cifar_py, tmp_path, file, content, fragment
):
    proc = cli.run(tiny_args(cifar_py.path, tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    if content is None:  # A config.json of this tool with a field of the wrong type.
        config = json.loads((tmp_path / 'config.json').read_text())
        content = json.dumps(dict(config, batch_size='32'))
    (tmp_path / file).write_text(content)
    before = snapshot(tmp_path)
    one_error_line(cli.run(tiny_args(cifar_py.path, tmp_path, epochs=2)), fragment)
    assert snapshot(tmp_path) == before


def test_report_marks_a_malformed_run_unreadable_and_goes_on(cli, tmp_path):
    runs = make_sweep(tmp_path, {'learning_rate': [0.1, 0.01, 0.001]})
    for run in runs:
        write_run(tmp_path, run)
    with open(tmp_path / runs[0]['name'] / 'metrics.jsonl', 'a') as f:
        f.write('{"epoch": "x"}\n{"epoch": 5}\n')
    (tmp_path / runs[1]['name'] / 'summary.json').write_text('{"epochs_completed": "x"}')
    results = load.collect(str(tmp_path))
    assert [r.status for r in results] == ['unreadable', 'unreadable', 'completed']
    assert 'metrics.jsonl' in results[0].error and 'summary.json' in results[1].error
    proc = cli.run(['--workdir', str(tmp_path), '--mode=report'])
    assert proc.returncode == 0, proc.stderr[-3000:]
    markdown = (tmp_path / 'results.md').read_text()
    assert 'unreadable' in markdown and 'metrics.jsonl' in markdown


def test_report_of_a_malformed_run_folder_is_one_line(cli, tmp_path):
    runs = make_sweep(tmp_path / 'sweep', {'learning_rate': [0.1]})
    write_run(tmp_path / 'sweep', runs[0])
    folder = tmp_path / 'sweep' / runs[0]['name']
    with open(folder / 'metrics.jsonl', 'a') as f:
        f.write('{"epoch": "x"}\n{"epoch": 5}\n')
    one_error_line(cli.run(['--workdir', str(folder), '--mode=report']), 'metrics.jsonl')


@pytest.mark.parametrize(
    'manifest',
    [
        '{"runs": 3}',
        '{"runs": [{"name": 7}]}',
        '{"runs": [{"name": "a", "overrides": []}]}',
        '[1, 2]',
        '{"runs": [',
    ],
)
def test_a_malformed_manifest_is_one_line(cli, tmp_path, manifest):
    (tmp_path / 'sweep.json').write_text(manifest)
    one_error_line(cli.run(['--workdir', str(tmp_path), '--mode=report']), 'sweep.json')


@pytest.mark.parametrize('labels', [[[1, 2], 3], [1.5] * 24, [[1]] * 24, 'labels'])
def test_a_cifar_batch_with_ragged_or_wrong_labels_is_named(tmp_path, labels):
    fake = fake_data.write_cifar_py(tmp_path, n_train_per_batch=24, n_test=10)
    path = os.path.join(fake.path, 'data_batch_2')
    batch = {'data': fake_data.to_planar(fake.train_images[:24]), 'labels': labels}
    with open(path, 'wb') as f:
        pickle.dump(batch, f, protocol=2)
    with pytest.raises(datasets.DataError, match='data_batch_2'):
        datasets.load_dataset(_data_config(fake.path, 'cifar'), seed=0)


def _data_config(path, source):
    import ml_collections  # pylint: disable=g-import-not-at-top

    return ml_collections.ConfigDict(
        dict(source=source, path=str(path), train_subset=0, download=False)
    )


def test_a_tfds_dir_whose_shards_are_garbage_is_one_error(tmp_path, monkeypatch):
    """Shards whose reader fails (what garbage ArrayRecord files do) are a DataError."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    class GarbageShards:
        def __len__(self):
            return 3

        def __getitem__(self, i):
            raise RuntimeError('INVALID_ARGUMENT: not an ArrayRecord file: bad magic')

    class Builder:
        data_dir = str(tmp_path / 'cifar10' / '3.0.2')

        def as_data_source(self, split):
            return [GarbageShards() for _ in split]

    monkeypatch.setattr(tfds, 'builder', lambda *a, **k: Builder())
    with pytest.raises(datasets.DataError, match=r'cannot read TFDS cifar10 at .*cifar10'):
        datasets.load_dataset(_data_config(tmp_path, 'tfds'), seed=0)


def test_the_checked_readers_accept_what_this_tool_writes(tmp_path):
    summary = {'status': 'completed', 'epochs_completed': 2, 'test_accuracy': None}
    workdir.write_json(str(tmp_path / 'summary.json'), summary)
    assert workdir.read_summary(str(tmp_path / 'summary.json')) == summary
    assert workdir.read_summary(str(tmp_path / 'absent.json')) is None
    np.testing.assert_equal(workdir.read_manifest(str(_manifest(tmp_path)))['axes'], {'seed': [0]})


def _manifest(tmp_path):
    path = tmp_path / 'sweep.json'
    path.write_text(json.dumps({'axes': {'seed': [0]}, 'runs': [{'name': 'seed=0'}]}))
    return path


def test_a_tfds_dir_with_garbage_files_isone_error_line(cli, tmp_path):
    version = tmp_path / 'tfds' / 'cifar10' / '3.0.2'
    version.mkdir(parents=True)
    (version / 'dataset_info.json').write_text('garbage')
    (version / 'cifar10-train.array_record-00000-of-00001').write_bytes(b'garbage' * 100)
    proc = cli.run([
        '--config', 'configs/default.py', '--workdir', str(tmp_path / 'run'),
        f'--config.data.path={tmp_path / "tfds"}', '--config.data.download=False',
    ])  # fmt: skip
    one_error_line(proc, 'cannot read TFDS cifar10', str(tmp_path / 'tfds'))
    assert not (tmp_path / 'run').exists()
