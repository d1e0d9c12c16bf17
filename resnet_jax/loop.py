"""The training loop: one or more runs trained together, each into its own workdir.

    state, summary = loop.train_and_evaluate(config, workdir)       # one run
    states, summaries = loop.train_runs(configs, workdirs)          # runs as one program

Every group of runs carries a leading *run* axis: a single run is a group of
one. Runs of a group share the model, the batch size and every other setting
but their learning rate, shuffle and seed (:func:`group_key`);
one compiled call trains all of them, each on its own data order, augmentation
draws and learning rate (:func:`train_chunk`, :func:`resnet_jax.train.over_runs`).

The uint8 datasets stay on the accelerator; batches are gathered, augmented and
scaled there and sharded over all devices on a ``data`` mesh axis (BatchNorm
statistics are over the global batch). Every run writes exactly what a run
trained alone writes: ``config.json``, ``metrics.jsonl``, TensorBoard events,
orbax checkpoints (:mod:`resnet_jax.checkpoints`) and ``summary.json``; rerun on
the same workdirs, training resumes from the latest checkpoints. A run whose
loss or parameters stop being finite is marked ``diverged`` and no longer
written while the others go on; SIGINT/SIGTERM checkpoint every run mid-epoch
and raise :class:`Interrupted`.
"""

# No `from __future__ import annotations`: clu reads Metrics annotations at run time.
import contextlib
import ctypes
import dataclasses
import importlib.metadata
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_jax import (
    augment,
    checkpoints,
    datasets,
    distributed,
    models,
    train,
    validation,
    writers,
)
from resnet_jax import workdir as workdir_lib

logger = logging.getLogger('resnet_jax')


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped training after a checkpoint was saved."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class StopSignals:
    """Turns the first SIGINT/SIGTERM into a request to checkpoint and stop.

    A second signal stops the process at once, by the signal's default action:
    it does not wait for a compiled call or a save in flight, and an unfinished
    save is never taken as a checkpoint. Python runs signal handlers only
    between bytecodes of the main thread, which waits inside a compiled call
    for as long as it runs; so the signals are also counted by a thread that
    reads them from :func:`signal.set_wakeup_fd`'s pipe the moment they arrive.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._pipe: tuple[int, int] | None = None
        self._previous_wakeup = -1
        self._watcher: threading.Thread | None = None
        self._count = 0
        self._lock = threading.Lock()

    def _handle(self, signum, frame):
        del frame
        if self.signum is None:
            self.signum = signum
        for sig in self._previous:
            signal.signal(sig, signal.SIG_DFL)  # A next signal: the default action.
        logger.warning(
            '%s received: saving a checkpoint, then stopping (again: stop at once)',
            signal.Signals(signum).name,
        )

    def _watch(self, read_fd: int) -> None:
        """Counts the signals as they arrive; the second one ends the process."""
        while True:
            try:
                data = os.read(read_fd, 64)
            except OSError:
                return
            for signum in data:
                if signum == 0:  # Written by __exit__: stop watching.
                    return
                if signum not in self._previous:
                    continue
                with self._lock:
                    self._count += 1
                    if self.signum is None:
                        self.signum = signum
                    second = self._count >= 2
                if second:
                    die_by_signal(signum)

    def agreed(self) -> int | None:
        """The signal to stop on, as every process of the run sees it.

        A signal reaches the processes of a multi-process run at different
        moments. Every process asks here at the same points (call boundaries,
        around evaluation); all stop if any was signalled, so they enter the
        collective checkpoint save at the same step instead of hanging in it.
        One all-gather of a scalar per call; no cost with one process.
        """
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            signums = multihost_utils.process_allgather(np.int32(self.signum or 0))
            if self.signum is None and int(np.max(signums)):
                self.signum = int(np.max(signums))
                logger.warning(
                    'another process received %s: saving a checkpoint, then stopping',
                    signal.Signals(self.signum).name,
                )
        return self.signum

    def __enter__(self) -> 'StopSignals':
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
            read_fd, write_fd = os.pipe()
            os.set_blocking(write_fd, False)
            self._pipe = (read_fd, write_fd)
            self._previous_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
            self._watcher = threading.Thread(
                target=self._watch, args=(read_fd,), name='stop signals', daemon=True
            )
            self._watcher.start()
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._pipe is not None:
            signal.set_wakeup_fd(self._previous_wakeup)
            read_fd, write_fd = self._pipe
            with contextlib.suppress(OSError):
                os.write(write_fd, b'\0')
            self._watcher.join()
            os.close(read_fd)
            os.close(write_fd)
            self._pipe = None


def die_by_signal(signum: int) -> None:
    """Ends the process at once by ``signum``'s default action, from any thread.

    ``signal.signal`` works only in the main thread, which may be waiting in a
    compiled call; the C library's ``signal`` restores the default action here.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.signal.restype = ctypes.c_void_p
        libc.signal.argtypes = (ctypes.c_int, ctypes.c_void_p)
        libc.signal(signum, None)  # SIG_DFL
        os.kill(os.getpid(), signum)
        time.sleep(5)  # Delivery is asynchronous.
    finally:
        os._exit(128 + signum)  # Where the signal could not be re-raised.


class Progress:
    """Logs steps/s and the epoch's ETA at most every ``every_seconds``."""

    def __init__(
        self,
        epoch: int,
        total_steps: int,
        every_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._epoch, self._total, self._every = epoch, total_steps, every_seconds
        self._clock = clock
        self._start = self._last = clock()

    def maybe_report(self, step: int, sync: Any) -> str | None:
        """``step`` steps are dispatched; ``sync`` is blocked on before timing."""
        if self._clock() - self._last < self._every or step >= self._total:
            return None
        jax.block_until_ready(sync)
        now = self._clock()
        self._last = now
        rate = step / max(now - self._start, 1e-9)
        eta = (self._total - step) / max(rate, 1e-9)
        message = (
            f'epoch {self._epoch}: step {step}/{self._total}, {rate:.2f} steps/s, ETA {eta:.0f}s'
        )
        logger.info(message)
        return message


# --------------------------------------------------------------------------
# Compiled calls and the epoch.


def train_chunk(
    states: train.TrainState,
    orders: jax.Array,
    images: jax.Array,
    labels: jax.Array,
    start: jax.Array,
    *,
    size: int,
    count: int,
    prep: augment.Preprocess,
    sharding: NamedSharding | None = None,
) -> tuple[train.TrainState, train.TrainMetrics]:
    """``count`` steps of every run: one compiled call (``lax.scan``), or for a
    single step :func:`augmented_batches` then :func:`update_runs`.

    ``states`` and ``orders`` (indices into ``images``/``labels``, which all
    runs share) have a leading run axis; run r's i-th batch is
    ``orders[r, start + i*size:][:size]``, gathered and augmented on the device.
    ``states`` are donated. Returns the states and each run's metrics over the
    ``count`` steps.
    """
    if count == 1:
        batches = augmented_batches(
            states, orders, images, labels, start, size=size, prep=prep, sharding=sharding
        )
        return update_runs(states, batches)
    return scan_updates(
        states, orders, images, labels, start, size=size, count=count, prep=prep, sharding=sharding
    )


def _augmented_batch(state, order, images, labels, start, *, size, prep, sharding):
    return augment.train_batch(
        images, labels, order, start, state.rng, state.step, size=size, prep=prep, sharding=sharding
    )


def _scan_updates(state, order, images, labels, start, *, size, count, prep, sharding):
    """``count`` > 1 steps of one run: gather, augment and update in a ``lax.scan``."""

    def step(state, i):
        batch = _augmented_batch(
            state, order, images, labels, start + i * size, size=size, prep=prep, sharding=sharding
        )
        return train.update(state, batch)

    state, metrics = jax.lax.scan(step, state, jnp.arange(count, dtype=jnp.int32))
    return state, metrics.reduce()


_STATIC = ('size', 'prep', 'sharding')
# Each run's batch ``orders[r, start:start+size]``, augmented with the run's key.
augmented_batches = train.over_runs(
    _augmented_batch, (0, 0, None, None, None), static_argnames=_STATIC
)
# One update of every run on its batch (:func:`resnet_jax.train.update`); states donated.
update_runs = train.over_runs(train.update, (0, 0), donate_argnums=(0,))
scan_updates = train.over_runs(
    _scan_updates,
    (0, 0, None, None, None),
    static_argnames=(*_STATIC, 'count'),
    donate_argnums=(0,),
)


def call_chunks(sizes: list[int], first: int, steps_per_call: int) -> list[tuple[int, int, int]]:
    """``(first batch, batch size, count)`` of the compiled calls of an epoch.

    Runs of equal-size batches from ``first`` on, at most ``steps_per_call``
    long (0: unbounded); a last partial batch is a call of its own.
    """
    chunks, i = [], first
    while i < len(sizes):
        n = 1
        while (
            i + n < len(sizes)
            and sizes[i + n] == sizes[i]
            and (steps_per_call == 0 or n < steps_per_call)
        ):
            n += 1
        chunks.append((i, sizes[i], n))
        i += n
    return chunks


def train_epoch(
    states: train.TrainState,
    images: jax.Array,
    labels: jax.Array,
    orders: jax.Array,
    sizes: list[int],
    prep: augment.Preprocess,
    sharding: NamedSharding | None = None,
    *,
    first: int = 0,
    total: train.TrainMetrics | None = None,
    steps_per_call: int = 1,
    after_call: Callable[[int, int, train.TrainMetrics], bool] | None = None,
) -> tuple[train.TrainState, train.TrainMetrics | None, int]:
    """Trains every run on batches ``first..`` of its epoch's order.

    Steps run ``steps_per_call`` at a time in one compiled call
    (:func:`train_chunk`). After each call, ``after_call(first batch of the
    call, batches done, running metrics)`` may return True to stop early.
    Returns the states, the running metrics (merged into ``total``) and the
    number of batches done.
    """
    start, done = sum(sizes[:first]), first
    for i, size, count in call_chunks(sizes, first, steps_per_call):
        states, m = train_chunk(
            states,
            orders,
            images,
            labels,
            jnp.int32(start),
            size=size,
            count=count,
            prep=prep,
            sharding=sharding,
        )
        total = m if total is None else train.merge_metrics(total, m)
        start += size * count
        done = i + count
        if after_call is not None and after_call(i, done, total):
            break
    return states, total, done


# --------------------------------------------------------------------------
# Runs.


@dataclasses.dataclass
class _Run:
    """One run of a group and everything the loop keeps for it."""

    config: ml_collections.ConfigDict
    workdir: str
    manager: ocp.CheckpointManager
    state: train.TrainState
    order_rng: jax.Array
    dataset: int  # Which of the group's distinct training sets it trains on.
    epoch: int = 0  # Completed epochs when the group starts.
    position: int = 0  # Batches of the next epoch already trained.
    partial: train.TrainMetrics | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    records: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    writer: writers.MetricLogger | None = None
    status: str = 'incomplete'  # -> 'completed', 'diverged' or 'pruned'
    error: str | None = None
    changed: bool = False  # Whether this invocation trained it or repaired its records.
    # Called with each epoch's record (restored ones too); True stops the run as 'pruned'.
    on_epoch: Callable[[dict[str, Any]], bool] | None = None
    pruned_epoch: int | None = None

    @property
    def active(self) -> bool:
        return self.status == 'incomplete'


@dataclasses.dataclass
class _Shared:
    """What every run of a group shares: data on the device, batching, the stop flag."""

    images: jax.Array  # The distinct training sets, concatenated: (sets x N, H, W, C) uint8.
    labels: jax.Array  # (sets x N,)
    num_train: int  # N: a run on training set d reads images[d * N + order].
    test: tuple[jax.Array, jax.Array, jax.Array]
    validation: tuple[jax.Array, jax.Array, jax.Array] | None  # Held-out training images.
    sizes: list[int]
    eval_bs: int
    prep: augment.Preprocess
    batch_sharding: NamedSharding
    replicated: NamedSharding
    stop: StopSignals
    t_start: float
    group_size: int

    def prefix(self, run: _Run) -> str:
        """How log lines name a run: not at all when it trains alone."""
        return f'{run.workdir}: ' if self.group_size > 1 else ''


# Config fields in which the runs of one group may differ: each run's learning
# rate is optimiser state, its data order and initialisation come from its seed.
VECTORIZABLE = ('learning_rate', 'shuffle', 'seed')


def group_key(config: ml_collections.ConfigDict) -> str:
    """The config without its vectorisable fields: runs with equal keys share a program."""
    fields = workdir_lib.config_json(config)
    for name in (*VECTORIZABLE, 'sweep', 'search'):
        fields.pop(name, None)
    return json.dumps(fields, sort_keys=True)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    mesh: Mesh | None = None,
    *,
    overwrite: bool = False,
    on_epoch: Callable[[dict[str, Any]], bool] | None = None,
) -> tuple[train.TrainState, dict[str, Any]]:
    """Trains ``config`` into ``workdir``, resuming from its latest checkpoint.

    Batches are sharded over ``mesh`` (default: all devices). A workdir holding
    a run of another config is refused unless ``overwrite``, which deletes that
    run's outputs first. SIGINT/SIGTERM save a checkpoint (mid-epoch if need
    be) and raise :class:`Interrupted`; a non-finite loss or parameter stops the
    run with status ``diverged``, keeping the last good checkpoint. ``on_epoch``
    sees every epoch's record (after a resume, the restored ones first); when it
    returns True the run stops there with status ``pruned`` and a checkpoint of
    that epoch. Returns the final state and the summary also written to
    ``workdir/summary.json``.
    """
    states, summaries = train_runs(
        [config], [workdir], mesh, overwrite=overwrite, on_epoch=[on_epoch]
    )
    return states[0], summaries[0]


def train_runs(
    configs: Sequence[ml_collections.ConfigDict],
    workdirs: Sequence[str],
    mesh: Mesh | None = None,
    *,
    overwrite: bool = False,
    on_epoch: Sequence[Callable[[dict[str, Any]], bool] | None] | None = None,
) -> tuple[list[train.TrainState], list[dict[str, Any]]]:
    """Trains ``configs[i]`` into ``workdirs[i]``, all as one program.

    The configs must differ only in :data:`VECTORIZABLE` fields. Each workdir behaves as with :func:`train_and_evaluate`; runs
    resumed at different points train in sub-groups, earliest first. Returns
    the final states and the summaries. ``on_epoch[i]``, if given, is run i's
    epoch callback (:func:`train_and_evaluate`).
    """
    if len(configs) != len(workdirs) or not configs:
        raise ValueError('train_runs needs one workdir per config, and at least one')
    on_epoch = list(on_epoch) if on_epoch is not None else [None] * len(configs)
    if len(on_epoch) != len(configs):
        raise ValueError('train_runs needs one on_epoch callback (or None) per config')
    for config in configs:
        validation.validate_config(config)
    if len({group_key(c) for c in configs}) > 1:
        raise validation.ConfigError(
            f'runs trained together may differ only in {", ".join(VECTORIZABLE)}'
        )
    created = [w for w in workdirs if not os.path.exists(w)]
    try:
        for workdir in workdirs:
            workdir_lib.check_writable(workdir)
        with contextlib.ExitStack() as locks:
            for workdir in workdirs:
                locks.enter_context(distributed.primary_only(workdir_lib.lock(workdir)))
            return _train_runs(list(configs), list(workdirs), mesh, overwrite, on_epoch)
    except BaseException:
        for workdir in created:  # A run that failed before it wrote anything leaves nothing.
            for folder in (os.path.join(workdir, workdir_lib.CHECKPOINT_DIR), workdir):
                with contextlib.suppress(OSError):
                    os.rmdir(folder)  # Only if empty.
        raise


def _training_sets(
    configs: list[ml_collections.ConfigDict],
) -> tuple[list[datasets.Dataset], list[int]]:
    """The distinct datasets of ``configs`` (the seed orders image folders and
    draws subsets) and each config's index into them."""
    by_seed: dict[int, int] = {}
    found: list[datasets.Dataset] = []
    for config in configs:
        if config.seed in by_seed:
            continue
        data = datasets.load_for_config(config)
        same = next(
            (
                k
                for k, d in enumerate(found)
                if np.array_equal(d.train_labels, data.train_labels)
                and np.array_equal(d.train_images, data.train_images)
            ),
            None,
        )
        if same is None:
            found.append(data)
            same = len(found) - 1
        by_seed[config.seed] = same
    return found, [by_seed[c.seed] for c in configs]


def check_data_fits(
    config: ml_collections.ConfigDict, data: datasets.Dataset, num_devices: int
) -> None:
    """:class:`ConfigError` if the batch or the class count does not fit the data."""
    if config.batch_size > len(data.train_labels):
        raise validation.ConfigError(
            f'config.batch_size={config.batch_size} is larger than the training set '
            f'({len(data.train_labels)} images)'
        )
    if config.batch_size % num_devices:
        raise validation.ConfigError(
            f'config.batch_size={config.batch_size} is not divisible by the '
            f'{num_devices} devices it is sharded over'
        )
    if data.num_classes > config.num_classes:
        raise validation.ConfigError(
            f'the dataset has {data.num_classes} classes but config.num_classes='
            f'{config.num_classes}'
        )


def device_eval_batch_size(config: ml_collections.ConfigDict, num_devices: int) -> int:
    """``config.eval_batch_size`` rounded up to a multiple of the device count."""
    return -(-config.eval_batch_size // num_devices) * num_devices


def _device_test_set(
    data: datasets.Dataset, batch_size: int, replicated: NamedSharding
) -> tuple[jax.Array, ...]:
    padded = augment.pad_test_set(data.test_images, data.test_labels, batch_size)
    return tuple(jax.device_put(a, replicated) for a in padded)


def _device_validation_set(
    data: datasets.Dataset, batch_size: int, replicated: NamedSharding
) -> tuple[jax.Array, ...] | None:
    """The held-out validation images on the device, or None without any."""
    if not len(data.validation_labels):
        return None
    padded = augment.pad_test_set(data.validation_images, data.validation_labels, batch_size)
    return tuple(jax.device_put(a, replicated) for a in padded)


def _train_runs(
    configs: list[ml_collections.ConfigDict],
    workdirs: list[str],
    mesh: Mesh | None,
    overwrite: bool,
    on_epoch: list[Callable[[dict[str, Any]], bool] | None],
) -> tuple[list[train.TrainState], list[dict[str, Any]]]:
    t_start = time.time()
    sets, index = _training_sets(configs)
    data, config = sets[0], configs[0]
    mesh = train.make_mesh() if mesh is None else mesh
    num_devices = mesh.devices.size
    check_data_fits(config, data, num_devices)
    if distributed.is_primary():
        for c, w in zip(configs, workdirs, strict=True):
            workdir_lib.prepare(w, c, overwrite)
    distributed.sync('workdirs prepared')

    replicated = NamedSharding(mesh, P())
    sizes = augment.train_batch_sizes(
        len(data.train_labels), config.batch_size, config.drop_remainder, num_devices
    )
    eval_bs = device_eval_batch_size(config, num_devices)
    shared = _Shared(
        images=jax.device_put(np.concatenate([d.train_images for d in sets]), replicated),
        labels=jax.device_put(np.concatenate([d.train_labels for d in sets]), replicated),
        num_train=len(data.train_labels),
        test=_device_test_set(data, eval_bs, replicated),
        validation=_device_validation_set(data, eval_bs, replicated),
        sizes=sizes,
        eval_bs=eval_bs,
        prep=augment.Preprocess.from_config(config),
        batch_sharding=NamedSharding(mesh, P('data')),
        replicated=replicated,
        stop=StopSignals(),
        t_start=t_start,
        group_size=len(configs),
    )
    runs: list[_Run] = []
    try:
        for c, w, d, callback in zip(configs, workdirs, index, on_epoch, strict=True):
            runs.append(_new_run(c, w, d, shared))
            runs[-1].on_epoch = callback
        num_params, flops = _log_start(runs[0], data, shared, len(sets), num_devices)
        for run in runs:
            _resume(run, shared)
        # Runs resumed at different points train in sub-groups, in that order.
        by_point: dict[tuple[int, int], list[_Run]] = {}
        for run in runs:
            by_point.setdefault((run.epoch, run.position), []).append(run)
        with shared.stop:
            for point in sorted(by_point):
                _train_group(by_point[point], shared)
    finally:
        for run in runs:
            checkpoints.close_quietly(run.manager)
            if run.writer is not None:
                run.writer.close()
    summaries = [_finish(run, num_params, flops, data, mesh, shared) for run in runs]
    return [run.state for run in runs], summaries


def _log_start(
    run: _Run, data: datasets.Dataset, shared: _Shared, num_sets: int, num_devices: int
) -> tuple[int, float]:
    """Logs the model, the data and the group; returns the parameter and FLOP counts."""
    config = run.config
    model, _ = train.cached_model(config.model, config.num_classes, config.dtype, config.image_size)
    num_params = models.count_params(run.state.params)
    flops = models.flops_per_image(model, run.state.variables(), config.image_size)
    logger.info(
        f'model {config.model}: {num_params:,} trainable parameters, '
        f'{flops / 1e6:.1f} MFLOPs/image forward'
    )
    logger.info(
        f'data: {data.source} ({data.path or "default"}), {len(data.train_labels)} train / '
        f'{len(data.test_labels)} test images, {data.num_classes} classes; '
        f'{len(shared.sizes)} steps/epoch on {num_devices} device(s)'
    )
    if shared.group_size > 1:
        logger.info(
            'vectorised: %d runs as one program, %d training set(s)', shared.group_size, num_sets
        )
    return num_params, flops


def _new_run(
    config: ml_collections.ConfigDict, workdir: str, dataset: int, shared: _Shared
) -> _Run:
    """A run's initial state (replicated over the global mesh: a restore reads
    into its layout) and its checkpoint manager."""
    init_rng, order_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    state = jax.device_put(
        train.create_train_state(config, init_rng, len(shared.sizes)), shared.replicated
    )
    manager = checkpoints.checkpoint_manager(workdir, config.keep_checkpoints)
    return _Run(config, workdir, manager, state, order_rng, dataset)


def _resume(run: _Run, shared: _Shared) -> None:
    """Restores a run's newest readable checkpoint, if any, and opens its writers.

    Its ``config.json`` is written only once the checkpoint has been read, and
    not at all when the run has nothing left to train: a finished run is left
    as it is. The record of the checkpoint's epoch, if ``metrics.jsonl`` lost it
    (a torn last line), is rebuilt from the checkpoint, and epochs missing from
    TensorBoard's files are written again.
    """
    workdir, config = run.workdir, run.config
    restored = checkpoints.restore_latest_good(workdir, run.manager, run.state)
    if restored is not None:
        run.state, run.meta, partial = restored
        run.epoch, run.position = int(run.meta['epoch']), int(run.meta.get('position', 0))
        run.partial = partial if run.position else None
        if run.epoch > config.num_epochs:
            raise validation.ConfigError(
                f'{workdir} holds a run trained for {run.epoch} epochs, more than num_epochs='
                f'{config.num_epochs}; nothing was changed'
            )
    primary = distributed.is_primary()
    finished = run.epoch == config.num_epochs and not run.position
    config_path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
    if primary and not (finished and os.path.exists(config_path)):
        workdir_lib.write_config(workdir, config)
    run.records = writers.truncate_metrics(workdir, run.epoch, write=primary)
    run.writer = writers.MetricLogger(workdir, enabled=primary)
    _rebuild_record(run, shared)
    restored_epochs = run.writer.restore_tensorboard(run.records)
    if restored_epochs:
        logger.warning(
            '%sTensorBoard lacked epoch(s) %s of metrics.jsonl: written again',
            shared.prefix(run),
            ', '.join(map(str, restored_epochs)),
        )
    if finished:
        logger.info(
            '%sthe run is complete (%d epochs): nothing to train', shared.prefix(run), run.epoch
        )
    elif restored is not None:
        where = f' (step {run.position} of epoch {run.epoch + 1})' if run.position else ''
        logger.info('%sresuming after epoch %d%s', shared.prefix(run), run.epoch, where)
    for record in run.records:  # The callback sees the restored epochs too.
        if run.active and _pruned(run, record):
            run.changed = True
            logger.info('%spruned after epoch %d', shared.prefix(run), record['epoch'])


def _pruned(run: _Run, record: dict[str, Any]) -> bool:
    """Asks the run's epoch callback about ``record``; marks the run pruned if it says so."""
    if run.on_epoch is None or not run.on_epoch(record):
        return False
    run.status, run.pruned_epoch = 'pruned', int(record['epoch'])
    return True


def _rebuild_record(run: _Run, shared: _Shared) -> None:
    """Appends the checkpointed epoch's record if ``metrics.jsonl`` lacks it.

    Every end-of-epoch checkpoint holds its epoch's record in its ``meta``.
    """
    record = run.meta.get('record')
    last = run.records[-1]['epoch'] if run.records else 0
    if run.position or not run.epoch or last >= run.epoch or not isinstance(record, dict):
        return
    where = f'the checkpoint of epoch {run.epoch} in {run.manager.directory}'
    record = writers.check_record(dict(record), where)
    if record['epoch'] != run.epoch:
        return
    run.records.append(record)
    run.writer.write(record, log=False)
    run.changed = True
    logger.warning(
        '%sthe record of epoch %d was missing from metrics.jsonl: rebuilt from its checkpoint',
        shared.prefix(run),
        run.epoch,
    )


def _diverge(run: _Run, shared: _Shared, message: str) -> None:
    run.status, run.error = 'diverged', message
    logger.error(
        '%s%s: this run stops; its last good checkpoint is kept', shared.prefix(run), message
    )


def _save(
    run: _Run,
    state: train.TrainState,
    finite: bool,
    shared: _Shared,
    epoch_done: int,
    position: int,
    metrics: train.TrainMetrics | None,
    seconds: float,
    record: dict[str, Any] | None = None,
) -> None:
    """Checkpoints a run, unless its parameters stopped being finite (then it diverges).

    At an epoch's end ``record`` is its epoch record, kept in the checkpoint.
    """
    if not finite:
        _diverge(run, shared, 'non-finite parameters or batch statistics')
        return
    meta = {
        'epoch': epoch_done,
        'position': position,
        'partial_seconds': seconds,
        'wall_seconds': float(run.meta.get('wall_seconds', 0.0)) + time.time() - shared.t_start,
    }
    if record is not None:
        meta['record'] = workdir_lib.json_safe(record)
    checkpoints.save(run.manager, state, meta, metrics)


def _check_finite(
    runs: list[_Run], shared: _Shared, total: train.TrainMetrics, epoch: int, done: int
) -> None:
    """Marks runs whose loss or gradients stopped being finite (one host sync)."""
    for run, ok in zip(runs, np.asarray(train.metrics_finite(total)), strict=True):
        if run.active and not ok:
            _diverge(run, shared, f'non-finite loss or gradients in epoch {epoch} (by step {done})')


def _train_group(runs: list[_Run], shared: _Shared) -> None:
    """Trains ``runs`` (all resumed at the same point) to the end of their configs."""
    config = runs[0].config
    start_epoch, position = runs[0].epoch, runs[0].position
    n, stop, every = len(shared.sizes), shared.stop, config.check_finite_every_steps
    states = jax.device_put(train.stack([run.state for run in runs]), shared.replicated)
    partial = train.stack([run.partial for run in runs]) if position else None
    seconds_before = float(runs[0].meta.get('partial_seconds', 0.0)) if position else 0.0

    def active() -> bool:
        return any(run.active for run in runs)

    for epoch in range(start_epoch + 1, config.num_epochs + 1):
        if not active():
            break
        first = position if epoch == start_epoch + 1 else 0
        t0 = time.time()
        orders = jnp.stack(
            [
                augment.epoch_order(run.order_rng, epoch, shared.num_train, run.config.shuffle)
                + run.dataset * shared.num_train
                for run in runs
            ]
        )
        progress = Progress(epoch, n, config.progress_every_seconds)

        def after_call(
            i: int, done: int, total: train.TrainMetrics, epoch=epoch, progress=progress
        ):
            progress.maybe_report(done, total)
            if every and done // every != i // every:
                _check_finite(runs, shared, total, epoch, done)
                if not active():
                    return True
            return stop.agreed() is not None

        states, total, done = train_epoch(
            states,
            shared.images,
            shared.labels,
            orders,
            shared.sizes,
            shared.prep,
            shared.batch_sharding,
            first=first,
            total=partial if first else None,
            steps_per_call=config.steps_per_call,
            after_call=after_call,
        )
        _check_finite(runs, shared, total, epoch, done)  # Waits for the epoch's last step.
        train_seconds = (seconds_before if first else 0.0) + time.time() - t0
        if not active():
            break
        if stop.agreed() is None:  # Training stopped early only on a signal.
            tests = train.evaluate(
                states, shared.test, shared.eval_bs, shared.prep, shared.batch_sharding
            )
            if shared.validation is not None:
                vals = train.evaluate(
                    states, shared.validation, shared.eval_bs, shared.prep, shared.batch_sharding
                )
        if stop.agreed() is not None:  # Also when it came during evaluation.
            finite = np.asarray(train.runs_finite((states.params, states.batch_stats)))
            for r, run in enumerate(runs):
                if run.active:
                    run.changed = True
                    state, metrics = train.unstack(states, r), train.unstack(total, r)
                    _save(run, state, finite[r], shared, epoch - 1, done, metrics, train_seconds)
            where = (
                'checkpoints saved in each run'
                if shared.group_size > 1
                else f'checkpoint saved in {runs[0].manager.directory}'
            )
            raise Interrupted(
                stop.signum,
                f'stopped in epoch {epoch} after {done}/{n} steps; {where}; rerun the same '
                'command to resume',
            )
        save = epoch % config.checkpoint_every_epochs == 0 or epoch == config.num_epochs
        callbacks = any(run.on_epoch is not None for run in runs)
        rates = np.asarray(train.applied_learning_rate(states))  # Of each run's last update.
        finite = (
            np.asarray(train.runs_finite((states.params, states.batch_stats)))
            if save or callbacks
            else None
        )
        for r, run in enumerate(runs):
            if run.active and not math.isfinite(tests[r]['loss']):
                _diverge(run, shared, f'non-finite test loss in epoch {epoch}')
            if not run.active:
                continue
            result = {k: float(v) for k, v in train.unstack(total, r).compute().items()}
            record = train.EpochRecord(
                epoch=epoch,
                train_loss=result['loss'],
                train_accuracy=result['accuracy'],
                test_loss=tests[r]['loss'],
                test_accuracy=tests[r]['accuracy'],
                learning_rate=float(rates[r]),
                epoch_seconds=train_seconds,
                images_per_second=sum(shared.sizes) / train_seconds,
                val_loss=vals[r]['loss'] if shared.validation is not None else None,
                val_accuracy=vals[r]['accuracy'] if shared.validation is not None else None,
            ).asdict()
            run.records.append(record)
            run.changed = True
            run.writer.write(record)
            pruned = _pruned(run, record)
            if save or pruned:
                _save(run, train.unstack(states, r), finite[r], shared, epoch, 0, None, 0.0, record)
            if pruned:
                logger.info('%spruned after epoch %d', shared.prefix(run), epoch)
    for r, run in enumerate(runs):
        run.state = train.unstack(states, r)
        if not run.active:
            run.changed = True
        if run.active and run.records and run.records[-1]['epoch'] == config.num_epochs:
            run.status = 'completed'
            if start_epoch < config.num_epochs:  # Finished in this invocation.
                run.writer.write_hparams(hparams(run.config), final_metrics(run.records))


def hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config's scalar fields, dotted (``data.train_subset``), for TensorBoard."""
    flat = workdir_lib.flatten(workdir_lib.config_json(config))
    return {k: v for k, v in flat.items() if isinstance(v, (bool, int, float, str))}


def final_metrics(records: list[dict[str, Any]]) -> dict[str, float]:
    """A finished run's metrics for TensorBoard's HParams tab."""
    numbers = writers.summarize(records)
    return {
        f'hparam/{k}': numbers[k] for k in ('train_accuracy', 'test_accuracy', 'best_test_accuracy')
    }


def _finish(
    run: _Run,
    num_params: int,
    flops: float,
    data: datasets.Dataset,
    mesh: Mesh,
    shared: _Shared,
) -> dict[str, Any]:
    """Writes a run's ``summary.json`` and returns it.

    A run this invocation did not change (a rerun of a finished run) keeps its
    summary as it is; that summary is returned.
    """
    path = os.path.join(run.workdir, workdir_lib.SUMMARY_FILE)
    if not run.changed and run.status == 'completed':
        old = workdir_lib.read_summary(path)
        done = writers.summarize(run.records)['epochs_completed']
        same = old is not None and old.get('epochs_completed') == done
        if same and old.get('status') == 'completed':
            logger.info('%s%s is complete and was left as it is', shared.prefix(run), run.workdir)
            return old
    summary = {
        'config': workdir_lib.config_json(run.config),
        'num_params': num_params,
        'flops_per_image': flops,
        **writers.summarize(run.records),
        'wall_seconds': float(run.meta.get('wall_seconds', 0.0)) + time.time() - shared.t_start,
        'data': {
            'source': data.source,
            'path': data.path,
            'num_train': int(len(data.train_labels)),
            'num_test': int(len(data.test_labels)),
        },
        'devices': [str(d) for d in mesh.devices.flat],
        'versions': versions(),
        'status': run.status,
    }
    if shared.group_size > 1:
        summary['vectorized_lanes'] = shared.group_size
    if run.error:
        summary['error'] = run.error
    if run.pruned_epoch is not None:
        summary['pruned_at_epoch'] = run.pruned_epoch
    if distributed.is_primary():
        workdir_lib.write_json(path, summary)
    if run.records:
        logger.info(
            '%s%s: final test accuracy %.2f%%, best %.2f%% (epoch %s), %.0fs',
            shared.prefix(run),
            run.status,
            100 * summary['test_accuracy'],
            100 * summary['best_test_accuracy'],
            summary['best_epoch'],
            summary['wall_seconds'],
        )
    return summary


# The packages whose versions a run's summary records.
VERSIONED_PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint')


def versions() -> dict[str, str | None]:
    """``{package: version}`` of :data:`VERSIONED_PACKAGES` (None where not installed)."""
    found = {}
    for name in VERSIONED_PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def evaluate_workdir(workdir: str, data_path: str | None = None) -> dict[str, float]:
    """Restores a workdir's latest readable checkpoint and evaluates it on the test set."""
    model, variables, config = checkpoints.restore(workdir)
    if data_path:
        config.data.path = data_path
    data = datasets.load_for_config(config)
    mesh = train.make_mesh()
    replicated = NamedSharding(mesh, P())
    eval_bs = device_eval_batch_size(config, mesh.devices.size)
    state = train.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables['params'],
        batch_stats=variables['batch_stats'],
        opt_state=None,
        rng=jax.random.PRNGKey(0),
        apply_fn=model.apply,
        tx=None,
    )
    (result,) = train.evaluate(
        jax.device_put(train.stack([state]), replicated),
        _device_test_set(data, eval_bs, replicated),
        eval_bs,
        augment.Preprocess.from_config(config),
        NamedSharding(mesh, P('data')),
    )
    return result
