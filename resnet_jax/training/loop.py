"""The training loop: one or more runs trained together, each into its own workdir.

    state, summary = loop.train_and_evaluate(config, workdir)       # one run
    states, summaries = loop.train_runs(configs, workdirs)          # runs as one program

Every group of runs carries a leading *run* axis: a single run is a group of
one. Runs of a group share the model, the batch size and every other setting
but their learning rate, shuffle and seed (:func:`group_key`);
one compiled call trains all of them, each on its own data order, augmentation
draws and learning rate (:mod:`resnet_jax.training.steps`, the one seam of the run axis).

One run, from :func:`train_and_evaluate` to :func:`resnet_jax.training.train.update`:
:func:`train_runs` locks the workdirs, :func:`_train_runs` loads the data and
resumes each run (:mod:`resnet_jax.training.runs`), :func:`_train_group` trains the
epochs, :func:`resnet_jax.training.steps.train_epoch` makes the compiled calls.

The uint8 datasets stay on the accelerator; batches are gathered, augmented and
scaled there and sharded over all devices on a ``data`` mesh axis (BatchNorm
statistics are over the global batch). Every run writes exactly what a run
trained alone writes: ``config.json``, ``metrics.jsonl``, TensorBoard events,
orbax checkpoints (:mod:`resnet_jax.training.checkpoints`) and ``summary.json``; rerun on
the same workdirs, training resumes from the latest checkpoints. A run whose
loss or parameters stop being finite is marked ``diverged`` and no longer
written while the others go on; SIGINT/SIGTERM checkpoint every run mid-epoch
and raise :class:`Interrupted` (:mod:`resnet_jax.training.signals`).
"""

# No `from __future__ import annotations`: clu reads Metrics annotations at run time.
import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_jax import datasets, models, validation
from resnet_jax.datasets import augment
from resnet_jax.rundir import locks
from resnet_jax.rundir import workdir as workdir_lib
from resnet_jax.training import checkpoints, checks, distributed, signals, steps, train
from resnet_jax.training import runs as runs_lib

logger = logging.getLogger('resnet_jax')


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
        checks.validate_config(config)
    if len({group_key(c) for c in configs}) > 1:
        raise validation.ConfigError(
            f'runs trained together may differ only in {", ".join(VECTORIZABLE)}'
        )
    created = [w for w in workdirs if not os.path.exists(w)]
    try:
        for workdir in workdirs:
            workdir_lib.check_writable(workdir)
        with contextlib.ExitStack() as held:
            for workdir in workdirs:
                held.enter_context(distributed.primary_only(locks.lock(workdir)))
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


def device_eval_batch_size(config: ml_collections.ConfigDict, num_devices: int) -> int:
    """``config.eval_batch_size`` rounded up to a multiple of the device count."""
    return -(-config.eval_batch_size // num_devices) * num_devices


def _device_eval_set(
    images: np.ndarray, labels: np.ndarray, batch_size: int, replicated: NamedSharding
) -> tuple[jax.Array, ...]:
    """An evaluation split (test or validation) padded to whole batches, on the device."""
    padded = augment.pad_test_set(images, labels, batch_size)
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
    checks.check_data_fits(config, data, num_devices)
    if distributed.is_primary():
        for c, w in zip(configs, workdirs, strict=True):
            workdir_lib.prepare(w, c, overwrite)
    distributed.sync('workdirs prepared')

    replicated = NamedSharding(mesh, P())
    sizes = augment.train_batch_sizes(
        len(data.train_labels), config.batch_size, config.drop_remainder, num_devices
    )
    eval_bs = device_eval_batch_size(config, num_devices)
    shared = runs_lib.Shared(
        images=jax.device_put(np.concatenate([d.train_images for d in sets]), replicated),
        labels=jax.device_put(np.concatenate([d.train_labels for d in sets]), replicated),
        num_train=len(data.train_labels),
        test=_device_eval_set(data.test_images, data.test_labels, eval_bs, replicated),
        validation=(  # The held-out training images, if the config holds any out.
            _device_eval_set(data.validation_images, data.validation_labels, eval_bs, replicated)
            if len(data.validation_labels)
            else None
        ),
        sizes=sizes,
        eval_bs=eval_bs,
        prep=augment.Preprocess.from_config(config),
        batch_sharding=NamedSharding(mesh, P('data')),
        replicated=replicated,
        stop=signals.StopSignals(),
        t_start=t_start,
        group_size=len(configs),
    )
    runs: list[runs_lib.Run] = []
    try:
        for c, w, d, callback in zip(configs, workdirs, index, on_epoch, strict=True):
            runs.append(runs_lib.new_run(c, w, d, shared))
            runs[-1].on_epoch = callback
        num_params, flops = _log_start(runs[0], data, shared, len(sets), num_devices)
        for run in runs:
            runs_lib.resume(run, shared)
        # Runs resumed at different points train in sub-groups, in that order.
        by_point: dict[tuple[int, int], list[runs_lib.Run]] = {}
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
    summaries = [runs_lib.finish(run, num_params, flops, data, mesh, shared) for run in runs]
    return [run.state for run in runs], summaries


def _log_start(
    run: runs_lib.Run,
    data: datasets.Dataset,
    shared: runs_lib.Shared,
    num_sets: int,
    num_devices: int,
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


def _any_active(runs: list[runs_lib.Run]) -> bool:
    return any(run.active for run in runs)


def _train_group(runs: list[runs_lib.Run], shared: runs_lib.Shared) -> None:
    """Trains ``runs`` (all resumed at the same point) to the end of their configs."""
    config = runs[0].config
    start_epoch, position = runs[0].epoch, runs[0].position
    states = jax.device_put(train.stack([run.state for run in runs]), shared.replicated)
    partial = train.stack([run.partial for run in runs]) if position else None
    seconds_before = float(runs[0].meta.get('partial_seconds', 0.0)) if position else 0.0
    for epoch in range(start_epoch + 1, config.num_epochs + 1):
        if not _any_active(runs):
            break
        first = position if epoch == start_epoch + 1 else 0
        t0 = time.time()
        states, total, done = _train_epoch(
            runs, shared, states, epoch, first, partial if first else None
        )
        train_seconds = (seconds_before if first else 0.0) + time.time() - t0
        if not _any_active(runs):
            break
        # Training stopped early only on a signal.
        evaluations = _evaluate(states, shared) if shared.stop.agreed() is None else None
        if shared.stop.agreed() is not None:  # Also when it came during evaluation.
            _save_and_stop(runs, shared, states, total, epoch, done, train_seconds)
        _end_epoch(runs, shared, states, total, evaluations, epoch, train_seconds)
    _end_group(runs, states, start_epoch)


def _epoch_orders(runs: list[runs_lib.Run], shared: runs_lib.Shared, epoch: int) -> jax.Array:
    """Each run's order of the epoch, as indices into the group's training sets."""
    return jnp.stack(
        [
            augment.epoch_order(run.order_rng, epoch, shared.num_train, run.config.shuffle)
            + run.dataset * shared.num_train
            for run in runs
        ]
    )


def _train_epoch(
    runs: list[runs_lib.Run],
    shared: runs_lib.Shared,
    states: train.TrainState,
    epoch: int,
    first: int,
    partial: train.TrainMetrics | None,
) -> tuple[train.TrainState, train.TrainMetrics, int]:
    """Trains batches ``first..`` of ``epoch`` (:func:`resnet_jax.training.steps.train_epoch`).

    Between compiled calls it reports progress, checks every
    ``check_finite_every_steps`` steps that the runs are finite, and stops on a
    signal. Returns the states, the epoch's running metrics and the batches done.
    """
    config = runs[0].config
    every = config.check_finite_every_steps
    progress = Progress(epoch, len(shared.sizes), config.progress_every_seconds)

    def after_call(i: int, done: int, total: train.TrainMetrics) -> bool:
        progress.maybe_report(done, total)
        if every and done // every != i // every:
            runs_lib.check_finite(runs, shared, total, epoch, done)
            if not _any_active(runs):
                return True
        return shared.stop.agreed() is not None

    states, total, done = steps.train_epoch(
        states,
        shared.images,
        shared.labels,
        _epoch_orders(runs, shared, epoch),
        shared.sizes,
        shared.prep,
        shared.batch_sharding,
        first=first,
        total=partial,
        steps_per_call=config.steps_per_call,
        after_call=after_call,
    )
    runs_lib.check_finite(runs, shared, total, epoch, done)  # Waits for the epoch's last step.
    return states, total, done


def _evaluate(
    states: train.TrainState, shared: runs_lib.Shared
) -> tuple[list[dict[str, float]], list[dict[str, float]] | None]:
    """Every run's test metrics, and its validation metrics (None without a split)."""
    tests = train.evaluate(states, shared.test, shared.eval_bs, shared.prep, shared.batch_sharding)
    if shared.validation is None:
        return tests, None
    vals = train.evaluate(
        states, shared.validation, shared.eval_bs, shared.prep, shared.batch_sharding
    )
    return tests, vals


def _save_and_stop(
    runs: list[runs_lib.Run],
    shared: runs_lib.Shared,
    states: train.TrainState,
    total: train.TrainMetrics,
    epoch: int,
    done: int,
    train_seconds: float,
) -> NoReturn:
    """Checkpoints every active run mid-epoch after a signal, then raises :class:`Interrupted`."""
    finite = np.asarray(train.runs_finite((states.params, states.batch_stats)))
    for r, run in enumerate(runs):
        if run.active:
            run.changed = True
            state, metrics = train.unstack(states, r), train.unstack(total, r)
            runs_lib.save(run, state, finite[r], shared, epoch - 1, done, metrics, train_seconds)
    where = (
        'checkpoints saved in each run'
        if shared.group_size > 1
        else f'checkpoint saved in {runs[0].manager.directory}'
    )
    raise signals.Interrupted(
        shared.stop.signum,
        f'stopped in epoch {epoch} after {done}/{len(shared.sizes)} steps; {where}; rerun the '
        'same command to resume',
    )


def _end_epoch(
    runs: list[runs_lib.Run],
    shared: runs_lib.Shared,
    states: train.TrainState,
    total: train.TrainMetrics,
    evaluations: tuple[list[dict[str, float]], list[dict[str, float]] | None],
    epoch: int,
    train_seconds: float,
) -> None:
    """Writes each active run's epoch record; checkpoints where due, or where pruned."""
    config = runs[0].config
    tests, vals = evaluations
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
            runs_lib.diverge(run, shared, f'non-finite test loss in epoch {epoch}')
        if not run.active:
            continue
        record = train.EpochRecord(
            epoch=epoch,
            **_metrics('train', train.unstack(total, r).compute()),
            **_metrics('test', tests[r]),
            learning_rate=float(rates[r]),
            epoch_seconds=train_seconds,
            images_per_second=sum(shared.sizes) / train_seconds,
            **(_metrics('val', vals[r]) if vals is not None else {}),
        ).asdict()
        run.records.append(record)
        run.changed = True
        run.writer.write(record)
        pruned = runs_lib.pruned(run, record)
        if save or pruned:
            state = train.unstack(states, r)
            runs_lib.save(run, state, finite[r], shared, epoch, 0, None, 0.0, record)
        if pruned:
            logger.info('%spruned after epoch %d', shared.prefix(run), epoch)


def _metrics(prefix: str, metrics: dict[str, Any]) -> dict[str, float]:
    """``{prefix_loss, prefix_accuracy}`` of a run's computed metrics, as floats."""
    return {f'{prefix}_{k}': float(metrics[k]) for k in ('loss', 'accuracy')}


def _end_group(runs: list[runs_lib.Run], states: train.TrainState, start_epoch: int) -> None:
    """Hands each run its final state and status; a run finished now gets its HParams."""
    num_epochs = runs[0].config.num_epochs
    for r, run in enumerate(runs):
        run.state = train.unstack(states, r)
        if not run.active:
            run.changed = True
        if run.active and run.records and run.records[-1]['epoch'] == num_epochs:
            run.status = 'completed'
            if start_epoch < num_epochs:  # Finished in this invocation.
                run.writer.write_hparams(
                    runs_lib.hparams(run.config), runs_lib.final_metrics(run.records)
                )


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
        _device_eval_set(data.test_images, data.test_labels, eval_bs, replicated),
        eval_bs,
        augment.Preprocess.from_config(config),
        NamedSharding(mesh, P('data')),
    )
    return result
