"""Per-epoch metric logging: TensorBoard event files, ``metrics.jsonl``, console.

    logger = MetricLogger(workdir)
    logger.write(record)      # one dict per epoch, see train.METRIC_KEYS
    logger.close()

TensorBoard event files are written by ``tensorboardX`` (no TensorFlow needed,
whether or not it is installed): standard files that ``tensorboard --logdir``
reads, with the run's hyperparameters under ``hparams/`` for the HParams tab.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from resnet_jax.workdir import METRICS_FILE, dumps, write_atomic

logger = logging.getLogger('resnet_jax')


class TensorboardWriter:
    """TensorBoard event files through tensorboardX (no TensorFlow needed).

    One writer whatever is installed: scalars per epoch in ``logdir``, the
    run's hyperparameters and final metrics in ``logdir/hparams`` (the layout
    of TensorBoard's HParams tab).
    """

    def __init__(self, logdir: str):
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

        self._writer = SummaryWriter(logdir)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        for key, value in scalars.items():
            self._writer.add_scalar(key, value, global_step=step)

    def write_hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        self._writer.add_hparams(dict(hparams), dict(metrics), name='hparams')

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The records of ``workdir/metrics.jsonl``, one per epoch in epoch order.

    Tolerates a file being appended to or cut by a kill: an unparsable
    (half-written) line is skipped, and of two records of the same epoch the
    later one is kept. Empty if there is no file.
    """
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.isfile(path):
        return []
    by_epoch: dict[int, dict[str, Any]] = {}
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and 'epoch' in record:
                by_epoch[int(record['epoch'])] = record
    return [by_epoch[e] for e in sorted(by_epoch)]


def truncate_metrics(workdir: str, last_epoch: int, write: bool = True) -> list[dict[str, Any]]:
    """Drops records after ``last_epoch`` (written after the last checkpoint).

    Returns the records kept; ``write=False`` only reads (processes other than 0).
    """
    records = [r for r in read_metrics(workdir) if r['epoch'] <= last_epoch]
    path = os.path.join(workdir, METRICS_FILE)
    if write and os.path.exists(path):
        write_atomic(path, ''.join(dumps(r) + '\n' for r in records))
    return records


def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The numbers of a run's ``summary.json`` that its epoch records determine.

    The one place they are computed: the training loop writes them, and the
    sweep report reads them back (or calls this on the records of a run still
    in flight). Accuracies are fractions; the best epoch is the one with the
    highest finite test accuracy.
    """
    last = records[-1] if records else {}
    scored = [r for r in records if _finite(r.get('test_accuracy'))]
    best = max(scored, key=lambda r: r['test_accuracy']) if scored else {}
    numbers = {
        'epochs_completed': int(last.get('epoch', 0)),
        'train_loss': last.get('train_loss'),
        'train_accuracy': last.get('train_accuracy'),
        'test_loss': last.get('test_loss'),
        'test_accuracy': last.get('test_accuracy'),
        'best_test_accuracy': best.get('test_accuracy'),
        'best_epoch': best.get('epoch'),
        'wall_seconds': sum(float(r.get('epoch_seconds') or 0.0) for r in records),
    }
    validated = [r for r in records if _finite(r.get('val_accuracy'))]
    if validated:  # With a validation split (config.data.validation_size > 0).
        best_val = max(validated, key=lambda r: r['val_accuracy'])
        numbers.update(
            val_loss=last.get('val_loss'),
            val_accuracy=last.get('val_accuracy'),
            best_val_accuracy=best_val['val_accuracy'],
            best_val_epoch=best_val['epoch'],
        )
    return numbers


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def format_record(record: Mapping[str, Any]) -> str:
    """One console line for an epoch record."""
    return (
        f'epoch {record["epoch"]:3d} | '
        f'train loss {record["train_loss"]:.4f} acc {100 * record["train_accuracy"]:6.2f}% | '
        f'test loss {record["test_loss"]:.4f} acc {100 * record["test_accuracy"]:6.2f}% | '
        + (
            f'val loss {record["val_loss"]:.4f} acc {100 * record["val_accuracy"]:6.2f}% | '
            if 'val_accuracy' in record
            else ''
        )
        + f'lr {record["learning_rate"]:.3g} | {record["epoch_seconds"]:.1f}s '
        f'{record["images_per_second"]:.0f} img/s'
    )


class MetricLogger:
    """Writes each epoch's record to TensorBoard, ``metrics.jsonl`` and the log.

    ``enabled=False`` (processes other than 0 of a multi-process run) only logs.
    """

    def __init__(self, workdir: str, enabled: bool = True):
        self._enabled = enabled
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, METRICS_FILE), 'a')  # noqa: SIM115
            self._tb = TensorboardWriter(workdir)

    def write(self, record: Mapping[str, Any]) -> None:
        if self._enabled:
            self._jsonl.write(dumps(dict(record)) + '\n')
            self._jsonl.flush()
            scalars = {k: v for k, v in record.items() if k != 'epoch'}
            self._tb.write_scalars(int(record['epoch']), scalars)
            self._tb.flush()
        logger.info(format_record(record))

    def write_hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        """A run's hyperparameters and final metrics for TensorBoard's HParams tab."""
        if self._enabled:
            self._tb.write_hparams(hparams, metrics)

    def close(self) -> None:
        if self._enabled:
            self._jsonl.close()
            self._tb.close()
