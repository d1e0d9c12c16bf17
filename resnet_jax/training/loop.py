"""The training loop: one or more runs trained together, each into its own workdir.

    state, summary = loop.train_and_evaluate(config, workdir)       # one run
    states, summaries = loop.train_runs(configs, workdirs)          # runs as one program

A single run is a group of one: :func:`train_and_evaluate` is :func:`train_runs`
of one config. Runs of a group share the model, the batch size and every other
setting but their learning rate, shuffle and seed (:func:`group_key`); their
states are stacked on a leading *run* axis and one compiled call trains all of
them, each on its own data order, augmentation draws and learning rate.

:func:`train_runs` reads top to bottom: lock the workdirs, load the data onto
the device, create or resume each run (:mod:`resnet_jax.training.runs`), then
for each epoch train (:func:`resnet_jax.training.steps.train_epoch`, whose
compiled calls map :func:`resnet_jax.training.train.update` over the run axis),
evaluate, log and checkpoint (:mod:`resnet_jax.training.epochs`); last, each
run's ``summary.json``. Runs resumed at different points train in sub-groups,
earliest first.

The uint8 datasets stay on the accelerator; batches are gathered, augmented and
scaled there and sharded over all devices on a ``data`` mesh axis (BatchNorm
statistics are over the global batch). Every run writes exactly what a run
trained alone writes: ``config.json``, ``metrics.jsonl``, TensorBoard events,
orbax checkpoints (:mod:`resnet_jax.training.checkpoints`) and ``summary.json``; rerun on
the same workdirs, training resumes from the latest checkpoints. A run whose
loss or parameters stop being finite is marked ``diverged`` and no longer
written while the others go on; SIGINT/SIGTERM checkpoint every run mid-epoch
and raise :class:`~resnet_jax.training.signals.Interrupted` (:mod:`resnet_jax.training.signals`).
"""

# No `from __future__ import annotations`: clu reads Metrics annotations at run time.
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

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
from resnet_jax.training import checkpoints, checks, distributed, epochs, signals, steps, train
from resnet_jax.training import runs as runs_lib

logger = logging.getLogger('resnet_jax')

OnEpoch = Callable[[dict[str, Any]], bool]
Fence = Callable[[], None]  # Raises locks.OwnershipLost when the run is no longer this process's.

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
    on_epoch: OnEpoch | None = None,
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
    on_epoch: Sequence[OnEpoch | None] | None = None,
    fence: Sequence[Fence | None] | None = None,
) -> tuple[list[train.TrainState], list[dict[str, Any]]]:
    """Trains ``configs[i]`` into ``workdirs[i]``, all as one program; returns the final
    states and summaries. The configs may differ only in :data:`VECTORIZABLE` fields; each
    workdir and ``on_epoch[i]`` behave as with :func:`train_and_evaluate`; ``fence[i]``:
    :func:`_fence_runs`."""
    callbacks = _check_group(configs, workdirs, on_epoch)
    with _workdirs_held(workdirs) as held:
        started = time.time()
        sets, index = _training_sets(configs)
        mesh = train.make_mesh() if mesh is None else mesh
        checks.check_data_fits(configs[0], sets[0], mesh.devices.size)
        _prepare_workdirs(configs, workdirs, overwrite)
        data, plan = _on_device(sets, configs[0], mesh)
        with contextlib.ExitStack() as opened:  # Closes the runs' checkpoints and writers.
            runs = _new_runs(configs, workdirs, index, callbacks, plan, started, opened)
            _fence_runs(runs, held, fence)
            num_params, flops = _log_start(runs[0], sets, plan, mesh)
            for run in runs:
                runs_lib.resume(run)
            stop = opened.enter_context(signals.StopSignals())
            for group in _by_resume_point(runs):
                states = jax.device_put(train.stack([r.state for r in group]), plan.replicated)
                for epoch in range(group[0].epoch + 1, configs[0].num_epochs + 1):
                    if not runs_lib.any_active(group):
                        break
                    first, partial, seconds = epochs.resume_point(group, epoch)
                    t0 = time.time()
                    states, total, done = steps.train_epoch(
                        states,
                        data.images,
                        data.labels,
                        epochs.orders(group, data, epoch),
                        plan.sizes,
                        plan.prep,
                        plan.sharding,
                        first=first,
                        total=partial,
                        steps_per_call=configs[0].steps_per_call,
                        after_call=epochs.between_calls(group, epoch, plan, stop),
                    )
                    runs_lib.check_finite(group, total, epoch, done)  # Waits for the last step.
                    seconds += time.time() - t0
                    if not runs_lib.any_active(group):
                        break
                    epochs.finish_epoch(
                        group, states, total, data, epoch, done, seconds, plan, stop
                    )
                epochs.end_group(group, states)
        summaries = [runs_lib.finish(run, num_params, flops, sets[0], mesh) for run in runs]
    return [run.state for run in runs], summaries


def _check_group(
    configs: Sequence[ml_collections.ConfigDict],
    workdirs: Sequence[str],
    on_epoch: Sequence[OnEpoch | None] | None,
) -> list[OnEpoch | None]:
    """Checks the arguments of :func:`train_runs`; returns each run's epoch callback."""
    if len(configs) != len(workdirs) or not configs:
        raise ValueError('train_runs needs one workdir per config, and at least one')
    callbacks = list(on_epoch) if on_epoch is not None else [None] * len(configs)
    if len(callbacks) != len(configs):
        raise ValueError('train_runs needs one on_epoch callback (or None) per config')
    for config in configs:
        checks.validate_config(config)
    if len({group_key(c) for c in configs}) > 1:
        raise validation.ConfigError(
            f'runs trained together may differ only in {", ".join(VECTORIZABLE)}'
        )
    return callbacks


@contextlib.contextmanager
def _workdirs_held(workdirs: Sequence[str]) -> Iterator[list[locks.Held | None]]:
    """Holds every workdir's lock (on the primary; None elsewhere); a workdir
    created meanwhile that a failed run left empty is removed again."""
    created = [w for w in workdirs if not os.path.exists(w)]
    try:
        for workdir in workdirs:
            workdir_lib.check_writable(workdir)
        with contextlib.ExitStack() as held:
            primary = distributed.is_primary()
            yield [held.enter_context(locks.lock(w)) if primary else None for w in workdirs]
    except BaseException:
        for workdir in created:  # A run that failed before it wrote anything leaves nothing.
            for folder in (os.path.join(workdir, workdir_lib.CHECKPOINT_DIR), workdir):
                with contextlib.suppress(OSError):
                    os.rmdir(folder)  # Only if empty.
        raise


def _prepare_workdirs(
    configs: Sequence[ml_collections.ConfigDict], workdirs: Sequence[str], overwrite: bool
) -> None:
    """Refuses (or with ``overwrite`` clears) workdirs of other configs, on the primary."""
    if distributed.is_primary():
        for config, workdir in zip(configs, workdirs, strict=True):
            workdir_lib.prepare(workdir, config, overwrite)
    distributed.sync('workdirs prepared')


def _on_device(
    sets: list[datasets.Dataset], config: ml_collections.ConfigDict, mesh: Mesh
) -> tuple[epochs.DeviceData, epochs.BatchPlan]:
    """The group's data, put on the devices of ``mesh``, and its batching plan."""
    num_devices, data = mesh.devices.size, sets[0]
    replicated = NamedSharding(mesh, P())
    eval_bs = device_eval_batch_size(config, num_devices)
    plan = epochs.BatchPlan(
        sizes=augment.train_batch_sizes(
            len(data.train_labels), config.batch_size, config.drop_remainder, num_devices
        ),
        eval_batch_size=eval_bs,
        prep=augment.Preprocess.from_config(config),
        sharding=NamedSharding(mesh, P('data')),
        replicated=replicated,
    )
    on_device = epochs.DeviceData(
        images=jax.device_put(np.concatenate([d.train_images for d in sets]), replicated),
        labels=jax.device_put(np.concatenate([d.train_labels for d in sets]), replicated),
        num_train=len(data.train_labels),
        test=_device_eval_set(data.test_images, data.test_labels, eval_bs, replicated),
        validation=(  # The held-out training images, if the config holds any out.
            _device_eval_set(data.validation_images, data.validation_labels, eval_bs, replicated)
            if len(data.validation_labels)
            else None
        ),
    )
    return on_device, plan


def _new_runs(
    configs: Sequence[ml_collections.ConfigDict],
    workdirs: Sequence[str],
    index: list[int],
    callbacks: list[OnEpoch | None],
    plan: epochs.BatchPlan,
    started: float,
    opened: contextlib.ExitStack,
) -> list[runs_lib.Run]:
    """Every run's initial state and checkpoint manager, each closed by ``opened``."""
    runs = []
    for config, workdir, dataset, callback in zip(configs, workdirs, index, callbacks, strict=True):
        run = runs_lib.new_run(
            config,
            workdir,
            dataset=dataset,
            steps_per_epoch=len(plan.sizes),
            replicated=plan.replicated,
            lanes=len(configs),
            started=started,
            on_epoch=callback,
        )
        opened.callback(runs_lib.close, run)
        runs.append(run)
    return runs


def _fence_runs(
    runs: list[runs_lib.Run], held: list[locks.Held | None], fences: Sequence[Fence | None] | None
) -> None:
    """Gives each run its workdir's lock and its fence, both checked before each write
    into the workdir (records, checkpoints, TensorBoard, summary): either raises
    :class:`~resnet_jax.rundir.locks.OwnershipLost`, which stops the group writing nothing more.
    """
    for r, run in enumerate(runs):
        run.held, run.fence = held[r], fences[r] if fences is not None else None


def _by_resume_point(runs: list[runs_lib.Run]) -> list[list[runs_lib.Run]]:
    """The runs in sub-groups resumed at the same point, earliest first."""
    by_point: dict[tuple[int, int], list[runs_lib.Run]] = {}
    for run in runs:
        by_point.setdefault((run.epoch, run.position), []).append(run)
    return [by_point[point] for point in sorted(by_point)]


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


def _log_start(
    run: runs_lib.Run, sets: list[datasets.Dataset], plan: epochs.BatchPlan, mesh: Mesh
) -> tuple[int, float]:
    """Logs the model, the data and the group; returns the parameter and FLOP counts."""
    config, data = run.config, sets[0]
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
        f'{len(plan.sizes)} steps/epoch on {mesh.devices.size} device(s)'
    )
    if run.lanes > 1:
        logger.info('vectorised: %d runs as one program, %d training set(s)', run.lanes, len(sets))
    return num_params, flops


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
    (result,) = steps.evaluate(
        jax.device_put(train.stack([state]), replicated),
        _device_eval_set(data.test_images, data.test_labels, eval_bs, replicated),
        eval_bs,
        augment.Preprocess.from_config(config),
        NamedSharding(mesh, P('data')),
    )
    return result
