"""Per-epoch records: metrics.jsonl read back tolerantly, summaries, console lines, and
TensorBoard files from one writer (tensorboardX), whatever else is installed."""

import glob
import json
import logging
import math
import os
import sys
import types

import pytest
from tensorboard.backend.event_processing import event_accumulator

from resnet_jax.rundir import workdir as workdir_lib
from resnet_jax.rundir import writers
from resnet_jax.studies import search_space
from resnet_jax.training import runs, train
from tests.conftest import read_hparams


def test_one_writer_even_where_clu_metric_writers_imports(tmp_path, monkeypatch):
    # A clu.metric_writers that imports (as it does where TensorFlow is
    # installed) must not be used: it would bring TensorFlow into training.
    fake = types.ModuleType('clu.metric_writers')
    fake.SummaryWriter = lambda *a, **k: (_ for _ in ()).throw(AssertionError('clu used'))
    monkeypatch.setitem(sys.modules, 'clu.metric_writers', fake)
    logger = writers.MetricLogger(str(tmp_path))
    record = dict.fromkeys(train.METRIC_KEYS, 0.5) | {'epoch': 1}
    logger.write(record)
    logger.write_hparams({'learning_rate': 0.01}, {'hparam/test_accuracy': 0.5})
    logger.close()
    acc = event_accumulator.EventAccumulator(str(tmp_path))
    acc.Reload()
    assert acc.Scalars('test_accuracy')[0].value == 0.5
    assert glob.glob(os.path.join(tmp_path, 'hparams', 'events.out.tfevents.*'))


def test_hparams_hold_the_status_leave_out_missing_metrics_and_replace_an_earlier_end(tmp_path):
    logger = writers.MetricLogger(str(tmp_path))
    logger.write_hparams({'learning_rate': 0.01}, {'hparam/val_accuracy': 0.25}, 'pruned')
    logger.write_hparams(
        {'learning_rate': 0.01, 'model': 'resnet20', 'nothing': None},
        {'hparam/val_accuracy': 0.5, 'hparam/test_accuracy': None},
        'diverged',
    )
    logger.close()
    found = read_hparams(tmp_path)
    assert found['hparams'] == {'learning_rate': 0.01, 'model': 'resnet20', 'status': 'diverged'}
    assert found['status'] == 'STATUS_FAILURE'
    assert found['metrics'] == {'hparam/val_accuracy': 0.5}  # Never a NaN for a missing one.
    # One entry: the later end replaced the earlier. No experiment summary: TensorBoard
    # builds the tab's columns from every run's entry.
    assert found['files'] == 1 and not found['experiment']


def test_operational_fields_are_the_resumable_changes_but_num_epochs():
    assert not runs.operational('num_epochs')
    for key in ('eval_batch_size', 'progress_every_seconds', 'data.path', 'distributed.port'):
        assert runs.operational(key)
    for key in ('learning_rate', 'data.validation_size', 'data.train_subset', 'distributed'):
        assert not runs.operational(key)


def test_final_metrics_hold_every_study_metric_and_leave_out_missing_ones():
    record = dict.fromkeys((*train.METRIC_KEYS, *train.VALIDATION_KEYS), 0.5) | {'epoch': 1}
    metrics = runs.final_metrics([record, record | {'epoch': 2, 'val_accuracy': 0.75}])
    assert {f'hparam/{m}' for m in search_space.METRICS} <= set(metrics)
    assert metrics['hparam/best_val_accuracy'] == 0.75 and metrics['hparam/epochs_completed'] == 2
    # Without a test evaluation, and with a non-finite loss: left out, not NaN.
    untested = record | {'test_loss': None, 'test_accuracy': None, 'val_loss': math.nan}
    assert set(runs.final_metrics([untested])) == {
        'hparam/train_loss',
        'hparam/train_accuracy',
        'hparam/val_accuracy',
        'hparam/best_val_accuracy',
        'hparam/epochs_completed',
    }


def _write_lines(workdir, *lines):
    (workdir / 'metrics.jsonl').write_text(''.join(line + '\n' for line in lines))


def test_read_metrics_keeps_the_last_record_of_each_epoch_and_skips_a_torn_last_line(tmp_path):
    assert workdir_lib.read_metrics(str(tmp_path)) == []  # No file yet.
    _write_lines(
        tmp_path,
        '{"epoch": 2, "loss": 1.0}',
        '{"epoch": 1, "loss": 2.0}',
        '{"epoch": 2, "loss": 0.5}',  # Rewritten after a resume: the later record wins.
        '{"epoch": 3, "lo',  # Being appended (or cut by a kill).
    )
    assert workdir_lib.read_metrics(str(tmp_path)) == [
        {'epoch': 1, 'loss': 2.0},
        {'epoch': 2, 'loss': 0.5},
    ]


@pytest.mark.parametrize('line', ['[1, 2]', '{"no_epoch": 1}', '{"epoch": "x"}'])
def test_read_metrics_names_a_line_that_is_not_a_record(tmp_path, line):
    _write_lines(tmp_path, '{"epoch": 1, "loss": 2.0}', line, '{"epoch": 2, "loss": 0.5}')
    with pytest.raises(workdir_lib.RecordError, match='metrics.jsonl line 2'):
        workdir_lib.read_metrics(str(tmp_path))


def test_truncate_metrics_drops_epochs_after_the_last_checkpoint(tmp_path):
    _write_lines(tmp_path, *(json.dumps({'epoch': e, 'x': float('nan')}) for e in (1, 2, 3)))
    kept = writers.truncate_metrics(str(tmp_path), 2, write=False)  # Only reads.
    assert [r['epoch'] for r in kept] == [1, 2]
    assert len((tmp_path / 'metrics.jsonl').read_text().splitlines()) == 3
    writers.truncate_metrics(str(tmp_path), 2)
    lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
    assert [json.loads(line)['epoch'] for line in lines] == [1, 2]
    assert 'NaN' not in lines[0] and json.loads(lines[0])['x'] is None  # Strict JSON.


def test_summarize_takes_the_last_epoch_and_the_best_finite_one():
    records = [
        {'epoch': 1, 'test_accuracy': 0.5, 'train_accuracy': 0.4, 'epoch_seconds': 2.0},
        {'epoch': 2, 'test_accuracy': 0.7, 'train_accuracy': 0.6, 'epoch_seconds': 3.0},
        {'epoch': 3, 'test_accuracy': math.nan, 'train_accuracy': 0.8, 'epoch_seconds': None},
    ]
    summary = writers.summarize(records)
    assert summary['epochs_completed'] == 3
    assert summary['train_accuracy'] == 0.8 and math.isnan(summary['test_accuracy'])
    assert (summary['best_epoch'], summary['best_test_accuracy']) == (2, 0.7)
    assert summary['wall_seconds'] == 5.0
    empty = writers.summarize([])
    assert empty['epochs_completed'] == 0 and empty['best_epoch'] is None
    assert empty['wall_seconds'] == 0.0


def test_format_record_is_one_console_line():
    record = {
        'epoch': 3,
        'train_loss': 1.23456,
        'train_accuracy': 0.5,
        'test_loss': 2.0,
        'test_accuracy': 0.25,
        'learning_rate': 0.0025,
        'epoch_seconds': 12.34,
        'images_per_second': 999.6,
    }
    assert writers.format_record(record) == (
        'epoch   3 | train loss 1.2346 acc  50.00% | test loss 2.0000 acc  25.00% | '
        'lr 0.0025 | 12.3s 1000 img/s'
    )


def test_a_disabled_logger_only_logs(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger='resnet_jax')
    logger = writers.MetricLogger(str(tmp_path / 'w'), enabled=False)
    record = dict.fromkeys(train.METRIC_KEYS, 0.5) | {'epoch': 1}
    logger.write(record)
    logger.write_hparams({'learning_rate': 0.01}, {'hparam/test_accuracy': 0.5})
    logger.close()
    assert not (tmp_path / 'w').exists()
    assert 'epoch   1 |' in caplog.text
