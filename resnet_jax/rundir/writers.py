"""Per-epoch metric logging: TensorBoard event files, ``metrics.jsonl``, console.

    logger = MetricLogger(workdir)
    logger.write(record)      # one dict per epoch, see train.METRIC_KEYS
    logger.close()

TensorBoard event files are written with ``tensorboardX``'s event writer (no
TensorFlow needed, whether or not it is installed): standard files that
``tensorboard --logdir`` reads. Once a run ends (completed, pruned or
diverged), ``hparams/`` holds its entry of the HParams tab: its hyperparameters,
its status and its final metrics. Each epoch's scalars are on disk (written and
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

    Scalars per epoch in ``logdir``, the run's hyperparameters, status and final
    metrics in ``logdir/hparams`` (the layout of TensorBoard's HParams tab).
    Writes are synchronous: when :meth:`write_scalars` returns, the scalars are
    on disk (tensorboardX's ``SummaryWriter`` queues them for a thread, which
    a kill loses). The event file is created on the first write.
    """

    def __init__(self, logdir: str):
        self._logdir = logdir
        self._events: Any = None

    @staticmethod
    def _open(logdir: str, suffix: str = '') -> Any:
        from tensorboardX.event_file_writer import (  # pylint: disable=g-import-not-at-top
            EventsWriter,
        )

        os.makedirs(logdir, exist_ok=True)
        # The process id keeps two writers started within one second apart.
        return EventsWriter(
            os.path.join(logdir, 'events'), filename_suffix=suffix or f'.{os.getpid()}'
        )

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        from tensorboardX.proto.event_pb2 import Event  # pylint: disable=g-import-not-at-top
        from tensorboardX.summary import scalar  # pylint: disable=g-import-not-at-top

        if self._events is None:
            self._events = self._open(self._logdir)
        for key, value in scalars.items():
            summary = scalar(key, float('nan') if value is None else value)
            self._events.write_event(Event(wall_time=time.time(), step=step, summary=summary))
        self._events.flush()  # Flushed and fsynced.

    def write_hparams(
        self,
        hparams: Mapping[str, Any],
        metrics: Mapping[str, float | None],
        status: str = 'completed',
    ) -> None:
        """Replaces the run's HParams entry in ``logdir/hparams``.

        The entry holds ``hparams`` with the run's ``status`` among them (a
        string the tab filters on), ends as :data:`END_STATUS` says, and
        ``metrics`` are scalars beside it; a metric whose value is None is left
        out. No experiment summary is written: TensorBoard then builds the tab's
        columns from every run's entry (each status and metric any run has),
        where one run's summary would stand for all. The new file is written
        before the older ones are removed.
        """
        # pylint: disable=g-import-not-at-top
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        logdir = os.path.join(self._logdir, 'hparams')
        older = _event_files(logdir)
        # Nanoseconds keep the new file's name apart from an older one of this process.
        events = self._open(logdir, f'.{os.getpid()}.{time.time_ns()}')
        try:
            for summary in _entry_summaries({**hparams, 'status': status}, status):
                events.write_event(Event(wall_time=time.time(), summary=summary))
            for key, value in metrics.items():
                if value is not None:
                    events.write_event(Event(wall_time=time.time(), summary=scalar(key, value)))
        finally:
            events.close()
        for path in older:
            os.remove(path)

    def flush(self) -> None:
        if self._events is not None:
            self._events.flush()

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None


# How a run's status ends its entry in the HParams tab (api.proto's Status: unknown,
# success, failure, running). A pruned run stopped as its study decided: a success, told
# apart from a completed one by its ``status`` hparam.
END_STATUS = {
    'completed': 'STATUS_SUCCESS',
    'pruned': 'STATUS_SUCCESS',
    'diverged': 'STATUS_FAILURE',
}


def _entry_summaries(hparams: Mapping[str, Any], status: str) -> list[Any]:
    """The HParams plugin's start of an entry (``hparams``: strings, bools and
    numbers; others are left out) and its end (:data:`END_STATUS` of ``status``)."""
    # pylint: disable=g-import-not-at-top
    from tensorboardX.proto.api_pb2 import Status
    from tensorboardX.proto.plugin_hparams_pb2 import (
        HParamsPluginData,
        SessionEndInfo,
        SessionStartInfo,
    )
    from tensorboardX.proto.summary_pb2 import Summary, SummaryMetadata

    start = SessionStartInfo()
    for key, value in hparams.items():
        if isinstance(value, str):
            start.hparams[key].string_value = value
        elif isinstance(value, bool):
            start.hparams[key].bool_value = value
        elif isinstance(value, (int, float)):
            start.hparams[key].number_value = float(value)
    end = SessionEndInfo(status=Status.Value(END_STATUS.get(status, 'STATUS_UNKNOWN')))
    summaries = []
    for tag, data in (
        ('_hparams_/session_start_info', HParamsPluginData(session_start_info=start)),
        ('_hparams_/session_end_info', HParamsPluginData(session_end_info=end)),
    ):
        plugin = SummaryMetadata.PluginData(plugin_name='hparams', content=data.SerializeToString())
        metadata = SummaryMetadata(plugin_data=plugin)
        summaries.append(Summary(value=[Summary.Value(tag=tag, metadata=metadata)]))
    return summaries


def _event_files(logdir: str) -> list[str]:
    """The event files in ``logdir`` (not its subfolders)."""
    if not os.path.isdir(logdir):
        return []
    return [
        os.path.join(logdir, name)
        for name in sorted(os.listdir(logdir))
        if name.startswith(EVENTS_PREFIX) and os.path.isfile(os.path.join(logdir, name))
    ]


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
    for path in _event_files(logdir):
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

    def write_hparams(
        self,
        hparams: Mapping[str, Any],
        metrics: Mapping[str, float | None],
        status: str = 'completed',
    ) -> None:
        """An ended run's hyperparameters, ``status`` and final metrics for TensorBoard's
        HParams tab, replacing those of an earlier end
        (:meth:`TensorboardWriter.write_hparams`)."""
        if self._enabled:
            try:
                self._tb.write_hparams(hparams, metrics, status)
            except OSError as e:
                raise OSError(e.errno, e.strerror or str(e), e.filename or self._workdir) from None

    def close(self) -> None:
        if self._enabled:
            if self._jsonl is not None:
                self._jsonl.close()
            self._tb.close()
