"""Vectorised sweeps: runs differing only in learning rate, shuffle or seed train as one program.

    groups = vectorize.group_runs(configs)              # indices of runs that can share one
    summaries = vectorize.train_group(configs, workdirs)

The runs of a group (*lanes*) share the model, the batch size and every other
setting. Their train states are stacked along a leading lane axis and one
``jax.vmap``-ed step trains all of them at once, each on its own batches: every
lane has its own data order (its seed and shuffle setting), its own augmentation
draws and its own learning rate (all lanes share an optimiser built for learning
rate 1 whose update is scaled per lane: every optimiser here is linear in it).

Each lane writes exactly what a run trained alone writes (``config.json``,
``metrics.jsonl``, TensorBoard events, orbax checkpoints, ``summary.json``), so a
vectorised run is resumed, evaluated and reported like any other, and can even be
resumed alone. A lane whose loss or parameters stop being finite is marked
``diverged`` and no longer written, while the other lanes go on; SIGINT/SIGTERM
checkpoint every lane mid-epoch.

Why: the study's network is small (57.5 MFLOPs per image), so an accelerator
training one run sits mostly idle between small kernels; R lanes make each kernel
R times larger. Vmapped convolution weights become grouped convolutions
(``feature_group_count=R``), which some backends run slower than R separate
convolutions: BENCHMARKS.md measures the trade.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_jax import distributed, input_pipeline, models, train, validation, writers
from resnet_jax import workdir as workdir_lib

logger = logging.getLogger('resnet_jax')

# Config fields in which the runs of one group may differ.
VECTORIZABLE = ('learning_rate', 'shuffle', 'seed')


def group_key(config: ml_collections.ConfigDict) -> str:
    """The config without its vectorisable fields: runs with equal keys share a program."""
    fields = workdir_lib.config_json(config)
    for name in (*VECTORIZABLE, 'sweep'):
        fields.pop(name, None)
    return json.dumps(fields, sort_keys=True)


def group_runs(configs: Sequence[ml_collections.ConfigDict]) -> list[list[int]]:
    """Indices of ``configs`` grouped by :func:`group_key`, in first-seen order."""
    groups: dict[str, list[int]] = {}
    for i, config in enumerate(configs):
        groups.setdefault(group_key(config), []).append(i)
    return list(groups.values())


def stack(trees: Sequence[Any]) -> Any:
    """Stacks equally shaped pytrees along a new leading (lane) axis."""
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree: Any, lane: int) -> Any:
    """Lane ``lane`` of a stacked pytree."""
    return jax.tree_util.tree_map(lambda x: x[lane], tree)


def _unit_lr(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    unit = ml_collections.ConfigDict(config.to_dict())
    unit.learning_rate = 1.0
    return unit


def create_lane_state(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> tuple[train.TrainState, jax.Array]:
    """A run's initial state (optimiser at learning rate 1) and data-order key.

    The same initial parameters and keys as :func:`train.train_and_evaluate`.
    """
    init_rng, order_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    return train.create_train_state(_unit_lr(config), init_rng, steps_per_epoch), order_rng


# --------------------------------------------------------------------------
# Compiled functions.


def _lane_step(
    state: train.TrainState,
    lr: jax.Array,
    order: jax.Array,
    images: jax.Array,
    labels: jax.Array,
    start: jax.Array,
    *,
    size: int,
    prep: train.Preprocess,
    sharding: NamedSharding | None,
) -> tuple[train.TrainState, train.TrainMetrics]:
    """One lane's step on batch ``order[start:start+size]``: the plain path's
    :func:`train.train_batch` and :func:`train.train_step`, at learning rate ``lr``."""
    batch = train._train_batch(  # pylint: disable=protected-access
        images, labels, order, start, state.rng, state.step, size=size, prep=prep, sharding=sharding
    )
    return train._train_step(state, batch, lr)  # pylint: disable=protected-access


@functools.partial(jax.jit, donate_argnums=0, static_argnames=('size', 'count', 'prep', 'sharding'))
def train_lanes(
    states: train.TrainState,
    lrs: jax.Array,
    orders: jax.Array,
    images: jax.Array,
    labels: jax.Array,
    start: jax.Array,
    *,
    size: int,
    count: int,
    prep: train.Preprocess,
    sharding: NamedSharding | None = None,
) -> tuple[train.TrainState, train.TrainMetrics]:
    """``count`` steps of every lane (``lax.scan`` when more than one) in one call.

    ``states``, ``lrs`` (base learning rates) and ``orders`` (indices into
    ``images``/``labels``, which all lanes share) have a leading lane axis.
    Returns the states and each lane's metrics over the ``count`` steps.
    """
    step = jax.vmap(
        functools.partial(_lane_step, size=size, prep=prep, sharding=sharding),
        in_axes=(0, 0, 0, None, None, None),
    )
    if count == 1:
        return step(states, lrs, orders, images, labels, start)

    def body(states, i):
        return step(states, lrs, orders, images, labels, start + i * size)

    states, metrics = jax.lax.scan(body, states, jnp.arange(count, dtype=jnp.int32))
    return states, metrics.reduce()


@jax.jit
def _eval_lanes(states: train.TrainState, batch: dict[str, jax.Array]) -> train.Metrics:
    return jax.vmap(train.eval_step, in_axes=(0, None))(states, batch)


@jax.jit
def _lanes_finite(metrics: train.TrainMetrics) -> jax.Array:
    return jnp.isfinite(metrics.loss.total) & jnp.isfinite(metrics.grad_norm.total)


@jax.jit
def _params_finite(params: Any) -> jax.Array:
    leaves = [
        jnp.isfinite(x).reshape(x.shape[0], -1).all(axis=1)
        for x in jax.tree_util.tree_leaves(params)
    ]
    return functools.reduce(jnp.logical_and, leaves)


def evaluate_lanes(
    states: train.TrainState,
    test: tuple[jax.Array, jax.Array, jax.Array],
    batch_size: int,
    prep: train.Preprocess,
    sharding: NamedSharding | None = None,
) -> list[dict[str, float]]:
    """Every lane's loss and accuracy over the (padded) test set."""
    total = train.evaluate_metrics(states, test, batch_size, prep, sharding, step=_eval_lanes)
    lanes = jax.tree_util.tree_leaves(states.step)[0].shape[0]
    return [{k: float(v) for k, v in unstack(total, r).compute().items()} for r in range(lanes)]


# --------------------------------------------------------------------------
# The loop.


@dataclasses.dataclass
class _Lane:
    """One run of a group and everything the loop keeps for it."""

    config: ml_collections.ConfigDict
    workdir: str
    manager: ocp.CheckpointManager
    state: train.TrainState
    order_rng: jax.Array
    dataset: int
    epoch: int = 0  # Completed epochs when the group starts.
    position: int = 0  # Batches of the next epoch already trained.
    partial: train.TrainMetrics | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    records: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    logger: writers.MetricLogger | None = None
    status: str = 'incomplete'
    error: str | None = None

    @property
    def active(self) -> bool:
        return self.status == 'incomplete'


@dataclasses.dataclass
class _Shared:
    """What all lanes of a group share: data, sharding, sizes and the stop flag."""

    images: jax.Array  # The distinct training sets, concatenated: (datasets x N, H, W, C) uint8.
    labels: jax.Array  # (datasets x N,)
    num_train: int  # N: a lane with training set d reads images[d * N + order].
    test: tuple[jax.Array, jax.Array, jax.Array]
    sizes: list[int]
    eval_bs: int
    prep: train.Preprocess
    batch_sharding: NamedSharding
    replicated: NamedSharding
    schedule: Any  # The learning-rate schedule at learning rate 1.
    stop: Any
    t_start: float


def train_group(
    configs: Sequence[ml_collections.ConfigDict],
    workdirs: Sequence[str],
    mesh: Mesh | None = None,
    *,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Trains ``configs[i]`` into ``workdirs[i]`` together; returns their summaries.

    The configs must differ only in :data:`VECTORIZABLE` fields. Each workdir
    behaves as with :func:`train.train_and_evaluate`: it is locked, refused if it
    holds another config's run (unless ``overwrite``), and resumed from its latest
    checkpoint; lanes at different points of training are trained in sub-groups.
    Raises :class:`train.Interrupted` after checkpointing every lane on
    SIGINT/SIGTERM.
    """
    if len(configs) != len(workdirs) or not configs:
        raise ValueError('train_group needs one workdir per config, and at least one')
    for config in configs:
        validation.validate_config(config)
    keys = {group_key(c) for c in configs}
    if len(keys) > 1:
        raise validation.ConfigError(
            f'vectorised runs may differ only in {", ".join(VECTORIZABLE)}'
        )
    for workdir in workdirs:
        train.check_writable(workdir)
    with contextlib.ExitStack() as locks:
        for workdir in workdirs:
            locks.enter_context(distributed.primary_only(workdir_lib.lock(workdir)))
        return _train_group(list(configs), list(workdirs), mesh, overwrite)


def _load_datasets(
    configs: list[ml_collections.ConfigDict],
) -> tuple[list[input_pipeline.Dataset], list[int]]:
    """The distinct training sets of ``configs`` (the seed orders image folders and
    subsets) and each config's index into them."""
    by_seed: dict[int, int] = {}
    datasets: list[input_pipeline.Dataset] = []
    for config in configs:
        if config.seed in by_seed:
            continue
        data = train.load_dataset(config)
        same = next(
            (
                k
                for k, d in enumerate(datasets)
                if np.array_equal(d.train_labels, data.train_labels)
                and np.array_equal(d.train_images, data.train_images)
            ),
            None,
        )
        if same is None:
            datasets.append(data)
            same = len(datasets) - 1
        by_seed[config.seed] = same
    return datasets, [by_seed[c.seed] for c in configs]


def _train_group(
    configs: list[ml_collections.ConfigDict],
    workdirs: list[str],
    mesh: Mesh | None,
    overwrite: bool,
) -> list[dict[str, Any]]:
    t_start = time.time()
    datasets, index = _load_datasets(configs)
    data, config = datasets[0], configs[0]
    mesh = train.make_mesh() if mesh is None else mesh
    num_devices = mesh.devices.size
    train.check_data_fits(config, len(data.train_labels), num_devices)
    if data.num_classes > config.num_classes:
        raise validation.ConfigError(
            f'the dataset has {data.num_classes} classes but config.num_classes='
            f'{config.num_classes}'
        )
    if distributed.is_primary():
        for c, w in zip(configs, workdirs, strict=True):
            train.prepare_workdir(w, c, overwrite)
    distributed.sync('workdirs prepared')

    replicated = NamedSharding(mesh, P())
    sizes = train.train_batch_sizes(
        len(data.train_labels), config.batch_size, config.drop_remainder, num_devices
    )
    eval_bs = train.device_eval_batch_size(config, num_devices)
    test = tuple(
        jax.device_put(a, replicated)
        for a in train.pad_test_set(data.test_images, data.test_labels, eval_bs)
    )
    shared = _Shared(
        images=jax.device_put(np.concatenate([d.train_images for d in datasets]), replicated),
        labels=jax.device_put(np.concatenate([d.train_labels for d in datasets]), replicated),
        num_train=len(data.train_labels),
        test=test,
        sizes=sizes,
        eval_bs=eval_bs,
        prep=train.Preprocess.from_config(config),
        batch_sharding=NamedSharding(mesh, P('data')),
        replicated=replicated,
        schedule=train.create_learning_rate_schedule(_unit_lr(config), len(sizes)),
        stop=None,
        t_start=t_start,
    )
    lanes = [
        _restore_lane(c, w, d, len(sizes)) for c, w, d in zip(configs, workdirs, index, strict=True)
    ]
    model, _ = train.cached_model(config.model, config.num_classes, config.dtype, config.image_size)
    num_params = models.count_params(lanes[0].state.params)
    flops = models.flops_per_image(model, lanes[0].state.variables(), config.image_size)
    logger.info(
        'vectorised: %d runs of %s (%s parameters) as one program, %d distinct training '
        'order(s) of %d images, %d steps/epoch on %d device(s)',
        len(lanes),
        config.model,
        f'{num_params:,}',
        len(datasets),
        len(data.train_labels),
        len(sizes),
        num_devices,
    )
    # Lanes resumed at different points train in sub-groups, in that order.
    by_point: dict[tuple[int, int], list[_Lane]] = {}
    for lane in lanes:
        by_point.setdefault((lane.epoch, lane.position), []).append(lane)
    stop = train.StopSignals()
    shared.stop = stop
    try:
        with stop:
            for point in sorted(by_point):
                _run_lanes(by_point[point], shared)
    finally:
        for lane in lanes:
            train.close_quietly(lane.manager)
            if lane.logger is not None:
                lane.logger.close()
    return [
        _finish_lane(lane, num_params, flops, data, mesh, len(lanes), t_start) for lane in lanes
    ]


def _restore_lane(
    config: ml_collections.ConfigDict, workdir: str, dataset: int, steps_per_epoch: int
) -> _Lane:
    state, order_rng = create_lane_state(config, steps_per_epoch)
    manager = train.checkpoint_manager(workdir, config.keep_checkpoints)
    lane = _Lane(config, workdir, manager, state, order_rng, dataset)
    try:
        restored = train.restore_latest_good(workdir, manager, state)
    except BaseException:
        manager.close()
        raise
    if distributed.is_primary():
        train.write_config(workdir, config)
    if restored is not None:
        lane.state, lane.meta, partial = restored
        lane.epoch, lane.position = int(lane.meta['epoch']), int(lane.meta.get('position', 0))
        lane.partial = partial if lane.position else None
        logger.info(
            '%s: resuming after epoch %d (step %d of the next)', workdir, lane.epoch, lane.position
        )
    lane.records = writers.truncate_metrics(workdir, lane.epoch, write=distributed.is_primary())
    lane.logger = writers.MetricLogger(workdir, enabled=distributed.is_primary())
    return lane


def _diverge(lane: _Lane, message: str) -> None:
    lane.status, lane.error = 'diverged', message
    logger.error('%s: %s: this run stops; its last good checkpoint is kept', lane.workdir, message)


def _save(
    lane: _Lane,
    state: train.TrainState,
    shared: _Shared,
    epoch_done: int,
    position: int,
    metrics: train.TrainMetrics | None,
    seconds: float,
) -> None:
    meta = {
        'epoch': epoch_done,
        'position': position,
        'partial_seconds': seconds,
        'wall_seconds': float(lane.meta.get('wall_seconds', 0.0)) + time.time() - shared.t_start,
        'vectorized': True,
    }
    train.save_checkpoint(lane.manager, state, meta, metrics)


def _run_lanes(lanes: list[_Lane], shared: _Shared) -> None:
    """Trains ``lanes`` (all resumed at the same point) to the end of their configs."""
    config = lanes[0].config
    start_epoch, position = lanes[0].epoch, lanes[0].position
    n = len(shared.sizes)
    states = jax.device_put(stack([lane.state for lane in lanes]), shared.replicated)
    lrs = jnp.asarray([lane.config.learning_rate for lane in lanes], jnp.float32)
    partial = stack([lane.partial for lane in lanes]) if position else None
    seconds_before = float(lanes[0].meta.get('partial_seconds', 0.0)) if position else 0.0
    stop = shared.stop

    def check(total: train.TrainMetrics, epoch: int, done: int) -> None:
        finite = np.asarray(_lanes_finite(total))
        for lane, ok in zip(lanes, finite, strict=True):
            if lane.active and not ok:
                _diverge(lane, f'non-finite loss or gradients in epoch {epoch} (by step {done})')

    for epoch in range(start_epoch + 1, config.num_epochs + 1):
        if not any(lane.active for lane in lanes):
            return
        first = position if epoch == start_epoch + 1 else 0
        t0 = time.time()
        orders = jnp.stack(
            [
                train.epoch_order(lane.order_rng, epoch, shared.num_train, lane.config.shuffle)
                + lane.dataset * shared.num_train
                for lane in lanes
            ]
        )
        progress = train.Progress(epoch, n, config.progress_every_seconds)
        total = partial if first else None
        start = sum(shared.sizes[:first])
        done = first
        for i, size, count in train.call_chunks(shared.sizes, first, config.steps_per_call):
            states, m = train_lanes(
                states,
                lrs,
                orders,
                shared.images,
                shared.labels,
                jnp.int32(start),
                size=size,
                count=count,
                prep=shared.prep,
                sharding=shared.batch_sharding,
            )
            total = m if total is None else train.merge_metrics(total, m)
            start += size * count
            done = i + count
            progress.maybe_report(done, total)
            every = config.check_finite_every_steps
            if every and done // every != i // every:
                check(total, epoch, done)
                if not any(lane.active for lane in lanes):
                    return
            if stop.agreed() is not None:
                break
        check(total, epoch, done)  # Waits for the epoch's last step.
        train_seconds = (seconds_before if first else 0.0) + time.time() - t0
        if stop.agreed() is None and any(lane.active for lane in lanes):
            tests = evaluate_lanes(
                states, shared.test, shared.eval_bs, shared.prep, shared.batch_sharding
            )
        if stop.agreed() is not None:
            for r, lane in enumerate(lanes):
                if lane.active:
                    _save(
                        lane,
                        unstack(states, r),
                        shared,
                        epoch - 1,
                        done,
                        unstack(total, r),
                        train_seconds,
                    )
            raise train.Interrupted(
                stop.signum,
                f'stopped in epoch {epoch} after {done}/{n} steps; checkpoints saved in each '
                'run; rerun the same command to resume',
            )
        save = epoch % config.checkpoint_every_epochs == 0 or epoch == config.num_epochs
        params_ok = (
            np.asarray(_params_finite((states.params, states.batch_stats))) if save else None
        )
        for r, lane in enumerate(lanes):
            if lane.active and not math.isfinite(tests[r]['loss']):
                _diverge(lane, f'non-finite test loss in epoch {epoch}')
            if not lane.active:
                continue
            result = {k: float(v) for k, v in unstack(total, r).compute().items()}
            record = {
                'epoch': epoch,
                'train_loss': result['loss'],
                'train_accuracy': result['accuracy'],
                'test_loss': tests[r]['loss'],
                'test_accuracy': tests[r]['accuracy'],
                'learning_rate': lane.config.learning_rate * float(shared.schedule(epoch * n - 1)),
                'epoch_seconds': train_seconds,
                'images_per_second': sum(shared.sizes) / train_seconds,
            }
            lane.records.append(record)
            lane.logger.write(record)
            if save:
                if not params_ok[r]:
                    _diverge(lane, f'non-finite parameters after epoch {epoch}')
                    continue
                _save(lane, unstack(states, r), shared, epoch, 0, None, 0.0)
    for lane in lanes:
        if lane.active and lane.records and lane.records[-1]['epoch'] == config.num_epochs:
            lane.status = 'completed'
            if start_epoch < config.num_epochs:
                lane.logger.write_hparams(
                    train.hparams(lane.config),
                    train.final_metrics(lane.records),
                )


def _finish_lane(
    lane: _Lane,
    num_params: int,
    flops: float,
    data: input_pipeline.Dataset,
    mesh: Mesh,
    group_size: int,
    t_start: float,
) -> dict[str, Any]:
    """Writes a lane's ``summary.json`` and returns it."""
    wall = float(lane.meta.get('wall_seconds', 0.0)) + time.time() - t_start
    summary = train.run_summary(lane.config, lane.records, num_params, flops, data, wall, mesh)
    summary['status'] = lane.status
    summary['vectorized_lanes'] = group_size
    if lane.error:
        summary['error'] = lane.error
    if distributed.is_primary():
        workdir_lib.write_json(os.path.join(lane.workdir, workdir_lib.SUMMARY_FILE), summary)
    return summary
