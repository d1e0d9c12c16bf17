"""Per-epoch metric logging: TensorBoard event files, ``metrics.jsonl``, console.

    logger = MetricLogger(workdir)
    logger.write(record)      # one dict per epoch, see train.METRIC_KEYS
    logger.close()

TensorBoard event files are written with ``tensorboardX``'s event writer (no
TensorFlow needed, whether or not it is installed): standard files that
``tensorboard --logdir`` reads, with the run's hyperparameters under
``hparams/`` for the HParams tab. Each epoch's scalars are on disk (written and
fsynced, not queued) before its record is appended to ``metrics.jsonl``, and a
resumed run writes again the epochs its event files lack
(:func:`tensorboard_steps`), so TensorBoard holds every epoch the records hold
after any kill. An event file is created only when there is something to write.

``metrics.jsonl`` is read back through :func:`resnet_jax.rundir.workdir.read_metrics`, which checks every
record and raises :class:`resnet_jax.rundir.workdir.RecordError` naming the file and
line of a malformed one.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from collections.abc import Mapping, Sequence
from typing import Any

from resnet_jax.rundir import workdir as workdir_lib
from resnet_jax.rundir.workdir import EVENTS_PREFIX, METRICS_FILE, dumps, write_atomic
from resnet_jax.validation import is_finite_number

logger = logging.getLogger('resnet_jax')


class TensorboardWriter:
    """TensorBoard event files through tensorboardX's event writer (no TensorFlow needed).

    Scalars per epoch in ``logdir``, the run's hyperparameters and final
    metrics in ``logdir/hparams`` (the layout of TensorBoard's HParams tab).
    Writes are synchronous: when :meth:`write_scalars` returns, the scalars are
    on disk (tensorboardX's ``SummaryWriter`` queues them for a thread, which
    a kill loses). The event file is created on the first write.
    """

    def __init__(self, logdir: str):
        self._logdir = logdir
        self._events: Any = None

    @staticmethod
    def _open(logdir: str) -> Any:
        from tensorboardX.event_file_writer import (  # pylint: disable=g-import-not-at-top
            EventsWriter,
        )

        os.makedirs(logdir, exist_ok=True)
        # The process id keeps two writers started within one second apart.
        return EventsWriter(os.path.join(logdir, 'events'), filename_suffix=f'.{os.getpid()}')

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        from tensorboardX.proto.event_pb2 import Event  # pylint: disable=g-import-not-at-top
        from tensorboardX.summary import scalar  # pylint: disable=g-import-not-at-top

        if self._events is None:
            self._events = self._open(self._logdir)
        for key, value in scalars.items():
            summary = scalar(key, float('nan') if value is None else value)
            self._events.write_event(Event(wall_time=time.time(), step=step, summary=summary))
        self._events.flush()  # Flushed and fsynced.

    def write_hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        # pylint: disable=g-import-not-at-top
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import hparams as hparams_summaries
        from tensorboardX.summary import scalar

        events = self._open(os.path.join(self._logdir, 'hparams'))
        try:
            for summary in hparams_summaries(dict(hparams), dict(metrics)):
                events.write_event(Event(wall_time=time.time(), summary=summary))
            for key, value in metrics.items():
                events.write_event(Event(wall_time=time.time(), summary=scalar(key, value)))
        finally:
            events.close()

    def flush(self) -> None:
        if self._events is not None:
            self._events.flush()

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None


def _event_records(path: str) -> list[bytes]:
    """The records of a TFRecord (event) file, up to a torn or corrupt end."""
    with open(path, 'rb') as f:
        data = f.read()
    records, i = [], 0
    while i + 12 <= len(data):
        (length,) = struct.unpack('<Q', data[i : i + 8])
        if i + 12 + length + 4 > len(data):
            break
        records.append(data[i + 12 : i + 12 + length])
        i += 12 + length + 4
    return records


def tensorboard_steps(logdir: str) -> dict[str, set[int]]:
    """``{tag: steps}`` of the scalars in ``logdir``'s event files (not its subfolders).

    A file cut by a kill is read up to its last whole record; an unreadable
    one counts as empty.
    """
    from tensorboardX.proto.event_pb2 import Event  # pylint: disable=g-import-not-at-top

    found: dict[str, set[int]] = {}
    if not os.path.isdir(logdir):
        return found
    for name in sorted(os.listdir(logdir)):
        path = os.path.join(logdir, name)
        if not name.startswith(EVENTS_PREFIX) or not os.path.isfile(path):
            continue
        try:
            records = _event_records(path)
        except OSError:
            continue
        for data in records:
            try:
                event = Event.FromString(data)
            except Exception:  # pylint: disable=broad-except  # A damaged record.
                continue
            for value in event.summary.value:
                found.setdefault(value.tag, set()).add(int(event.step))
    return found


def truncate_metrics(workdir: str, last_epoch: int, write: bool = True) -> list[dict[str, Any]]:
    """Drops records after ``last_epoch`` (written after the last checkpoint).

    The file is rewritten only if that drops something (or a torn line, or
    a repeated epoch). Returns the records kept; ``write=False`` only reads
    (processes other than 0).
    """
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.isfile(path):
        return []
    records, dirty = workdir_lib.parse_metrics(path)
    kept = [r for r in records if r['epoch'] <= last_epoch]
    if write and (dirty or len(kept) < len(records)):
        write_atomic(path, ''.join(dumps(r) + '\n' for r in kept))
    return kept


def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The numbers of a run's ``summary.json`` that its epoch records determine.

    The one place they are computed: the training loop writes them, and the
    sweep report reads them back (or calls this on the records of a run still
    in flight). Accuracies are fractions; the best epoch is the one with the
    highest finite test accuracy.
    """
    last = records[-1] if records else {}
    scored = [r for r in records if is_finite_number(r.get('test_accuracy'))]
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
    validated = [r for r in records if is_finite_number(r.get('val_accuracy'))]
    if validated:  # With a validation split (config.data.validation_size > 0).
        best_val = max(validated, key=lambda r: r['val_accuracy'])
        numbers.update(
            val_loss=last.get('val_loss'),
            val_accuracy=last.get('val_accuracy'),
            best_val_accuracy=best_val['val_accuracy'],
            best_val_epoch=best_val['epoch'],
        )
    return numbers


def format_record(record: Mapping[str, Any]) -> str:
    """One console line for an epoch record."""
    return (
        f'epoch {record["epoch"]:3d} | '
        f'train loss {record["train_loss"]:.4f} acc {100 * record["train_accuracy"]:6.2f}% | '
        + (
            f'test loss {record["test_loss"]:.4f} acc {100 * record["test_accuracy"]:6.2f}% | '
            if record.get('test_accuracy') is not None and record.get('test_loss') is not None
            else ''
        )
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

    TensorBoard first (synchronously), so every epoch ``metrics.jsonl`` holds
    is in TensorBoard too; files are opened on the first write, so a logger
    that writes nothing creates nothing. A failed write (disk full) raises an
    ``OSError`` naming the file. ``enabled=False`` (processes other than 0 of a
    multi-process run) only logs.
    """

    def __init__(self, workdir: str, enabled: bool = True):
        self._enabled = enabled
        self._workdir = workdir
        self._path = os.path.join(workdir, METRICS_FILE)
        self._jsonl: Any = None
        self._tb = TensorboardWriter(workdir) if enabled else None

    def write(self, record: Mapping[str, Any], log: bool = True) -> None:
        if self._enabled:
            self.write_tensorboard(record)
            try:
                if self._jsonl is None:
                    self._jsonl = open(self._path, 'a')  # noqa: SIM115
                self._jsonl.write(dumps(dict(record)) + '\n')
                self._jsonl.flush()
            except OSError as e:
                raise OSError(e.errno, e.strerror or str(e), self._path) from None
        if log:
            logger.info(format_record(record))

    def write_tensorboard(self, record: Mapping[str, Any]) -> None:
        """An epoch record's scalars, to TensorBoard only."""
        if self._enabled:
            scalars = {k: record[k] for k in workdir_lib.RECORD_NUMBERS if k in record}
            try:
                self._tb.write_scalars(int(record['epoch']), scalars)
            except OSError as e:
                raise OSError(e.errno, e.strerror or str(e), e.filename or self._workdir) from None

    def restore_tensorboard(self, records: Sequence[Mapping[str, Any]]) -> list[int]:
        """Writes to TensorBoard the epochs of ``records`` its event files lack
        (a kill lost them); returns those epochs."""
        if not self._enabled or not records:
            return []
        logged = tensorboard_steps(self._workdir)
        missing = [
            r
            for r in records
            if any(
                r['epoch'] not in logged.get(k, ()) for k in workdir_lib.RECORD_NUMBERS if k in r
            )
        ]
        for record in missing:
            self.write_tensorboard(record)
        return [int(r['epoch']) for r in missing]

    def write_hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        """A run's hyperparameters and final metrics for TensorBoard's HParams tab."""
        if self._enabled:
            self._tb.write_hparams(hparams, metrics)

    def close(self) -> None:
        if self._enabled:
            if self._jsonl is not None:
                self._jsonl.close()
            self._tb.close()
