"""TensorBoard files come from one writer (tensorboardX), whatever else is installed."""

import glob
import os
import sys
import types

from tensorboard.backend.event_processing import event_accumulator

from resnet_jax import train, writers


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
