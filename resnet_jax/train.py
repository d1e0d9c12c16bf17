"""Training and evaluation: train state, jit-compiled steps, the epoch loop.

Library use::

    from resnet_jax import train
    state = train.create_train_state(config, jax.random.PRNGKey(0), steps_per_epoch=500)
    state, metrics = train.train_step(state, {'image': x, 'label': y})  # x: float NHWC
    print(metrics.compute())   # {'loss': ..., 'accuracy': ...}

Whole runs::

    state, summary = train.train_and_evaluate(config, workdir)

``train_and_evaluate`` keeps the uint8 dataset on the accelerator, gathers,
augments and normalises each batch there, shards batches over all local devices
on a ``data`` mesh axis (BatchNorm statistics are over the global batch), logs
one record per epoch (TensorBoard, ``metrics.jsonl``, console), checkpoints with
orbax and resumes from the latest checkpoint when rerun on the same workdir.
"""

# No `from __future__ import annotations`: clu reads Metrics annotations at run time.
import contextlib
import functools
import json
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from clu import metrics as clu_metrics
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_jax import augment, distributed, input_pipeline, models, validation, writers
from resnet_jax import workdir as workdir_lib

logger = logging.getLogger('resnet_jax')

# The names of one epoch's record in metrics.jsonl (accuracies are fractions).
METRIC_KEYS = (
    'epoch',
    'train_loss',
    'train_accuracy',
    'test_loss',
    'test_accuracy',
    'learning_rate',
    'epoch_seconds',
    'images_per_second',
)
CHECKPOINT_DIR = 'checkpoints'


@flax.struct.dataclass
class Metrics(clu_metrics.Collection):
    """Mean cross-entropy and accuracy over examples (masked examples excluded)."""

    loss: clu_metrics.Average.from_output('loss')
    accuracy: clu_metrics.Accuracy


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
    """:class:`Metrics` plus the mean global gradient norm (NaN once a gradient is).

    (clu reads a collection's fields from its own annotations: no subclassing.)
    """

    loss: clu_metrics.Average.from_output('loss')
    accuracy: clu_metrics.Accuracy
    grad_norm: clu_metrics.Average.from_output('grad_norm')


@flax.struct.dataclass
class TrainState:
    """Everything a step changes; ``apply_fn`` and ``tx`` are static."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: optax.OptState
    rng: jax.Array  # Key for the data augmentation, folded with ``step``.
    apply_fn: Callable[..., Any] = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)

    def variables(self) -> dict[str, Any]:
        return {'params': self.params, 'batch_stats': self.batch_stats}


# --------------------------------------------------------------------------
# Optimiser and schedule.


def create_learning_rate_schedule(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.Schedule:
    """The learning rate per step; epochs are converted with ``steps_per_epoch``."""
    lr = config.learning_rate
    if config.schedule == 'constant':
        return optax.constant_schedule(lr)
    if config.schedule == 'cosine':
        return optax.cosine_decay_schedule(lr, config.num_epochs * steps_per_epoch)
    if config.schedule == 'piecewise':
        every = config.decay_every_epochs * steps_per_epoch
        boundaries = range(every, config.num_epochs * steps_per_epoch, every)
        return optax.piecewise_constant_schedule(
            lr, {b: 1.0 / config.decay_factor for b in boundaries}
        )
    raise ValueError(f'unknown schedule {config.schedule!r}')


def create_optimizer(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.GradientTransformation:
    """The optax optimiser named by ``config.optimizer`` with its schedule.

    ``weight_decay`` is an L2 term added to the gradient (PyTorch's
    ``weight_decay``) except for ``adamw``, where it is decoupled.
    """
    schedule = create_learning_rate_schedule(config, steps_per_epoch)
    name = config.optimizer
    if name == 'adamw':
        return optax.adamw(
            schedule,
            b1=config.adam_b1,
            b2=config.adam_b2,
            eps=config.adam_eps,
            weight_decay=config.weight_decay,
        )
    if name == 'adam':
        tx = optax.adam(schedule, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps)
    elif name == 'sgd':
        tx = optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov)
    elif name == 'adagrad':
        tx = optax.adagrad(
            schedule,
            initial_accumulator_value=config.adagrad_initial_accumulator,
            eps=config.adagrad_eps,
        )
    else:
        raise ValueError(f'unknown optimizer {name!r}')
    if config.weight_decay:
        tx = optax.chain(optax.add_decayed_weights(config.weight_decay), tx)
    return tx


# Fields that define the optimiser besides the steps per epoch.
_OPTIMIZER_FIELDS = (
    'optimizer',
    'learning_rate',
    'momentum',
    'nesterov',
    'weight_decay',
    'adam_b1',
    'adam_b2',
    'adam_eps',
    'adagrad_initial_accumulator',
    'adagrad_eps',
    'schedule',
    'decay_every_epochs',
    'decay_factor',
    'num_epochs',
)


@functools.lru_cache(maxsize=64)
def _cached_optimizer(
    fields: tuple[tuple[str, Any], ...], steps_per_epoch: int
) -> optax.GradientTransformation:
    return create_optimizer(ml_collections.ConfigDict(dict(fields)), steps_per_epoch)


@functools.lru_cache(maxsize=16)
def cached_model(
    name: str, num_classes: int, dtype: str, image_size: int
) -> tuple[models.ResNet, Callable[[jax.Array], Any]]:
    model = models.create_model(name, num_classes, dtype)
    x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    lowered = jax.jit(lambda rng: model.init(rng, x, train=False)).lower(jax.random.PRNGKey(0))
    try:
        # Init runs once: skipping XLA's backend optimisations cuts its CPU
        # compile several-fold (BENCHMARKS.md) at no cost that matters.
        init = lowered.compile(compiler_options={'xla_backend_optimization_level': 0})
    except Exception:  # pylint: disable=broad-except  # Option unknown to a backend.
        init = lowered.compile()
    return model, init


def create_train_state(
    config: ml_collections.ConfigDict, rng: jax.Array, steps_per_epoch: int
) -> TrainState:
    """A freshly initialised state for ``config.model`` and ``config.optimizer``.

    Runs of one process that share a model and an optimiser config share the
    same ``apply_fn`` and ``tx``, so ``train_step`` is compiled once for all.
    """
    model, init = cached_model(config.model, config.num_classes, config.dtype, config.image_size)
    tx = _cached_optimizer(tuple((k, config[k]) for k in _OPTIMIZER_FIELDS), steps_per_epoch)
    init_rng, aug_rng = jax.random.split(rng)
    variables = init(init_rng)
    params = variables['params']
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables['batch_stats'],
        opt_state=tx.init(params),
        rng=aug_rng,
        apply_fn=model.apply,
        tx=tx,
    )


# --------------------------------------------------------------------------
# Steps.


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def _train_step(
    state: TrainState, batch: Mapping[str, jax.Array], lr_scale: jax.Array | None = None
) -> tuple[TrainState, TrainMetrics]:
    """One optimiser step on ``batch`` (``image``: float NHWC, ``label``: int32).

    Pure and jit-compiled as :func:`train_step`, with ``state`` donated.
    BatchNorm uses the statistics of the whole (global) batch and updates its
    running averages. ``lr_scale`` multiplies the optimiser's update: the
    vectorised sweeps give every run one optimiser built for learning rate 1
    and their own learning rate here (every optimiser's update is linear in it).
    """

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {'params': params, 'batch_stats': state.batch_stats},
            batch['image'],
            train=True,
            mutable=['batch_stats'],
        )
        losses = _cross_entropy(logits, batch['label'])
        return losses.mean(), (logits, losses, updates['batch_stats'])

    grads, (logits, losses, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    if lr_scale is not None:
        updates = jax.tree_util.tree_map(lambda u: u * lr_scale, updates)
    params = optax.apply_updates(state.params, updates)
    metrics = TrainMetrics.single_from_model_output(
        loss=losses,
        logits=logits,
        labels=batch['label'],
        grad_norm=optax.tree_utils.tree_norm(grads),
    )
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
    )
    return new_state, metrics


train_step = jax.jit(_train_step, donate_argnums=0)


@jax.jit
def eval_step(state: TrainState, batch: Mapping[str, jax.Array]) -> Metrics:
    """Loss and accuracy on ``batch``; examples with ``mask`` False are ignored."""
    logits = state.apply_fn(state.variables(), batch['image'], train=False)
    return Metrics.single_from_model_output(
        loss=_cross_entropy(logits, batch['label']),
        logits=logits,
        labels=batch['label'],
        mask=batch.get('mask'),
    )


@jax.jit
def merge_metrics(a: Metrics, b: Metrics) -> Metrics:
    """``a.merge(b)``; elementwise, so stacked (per-run) metrics merge too."""
    return a.merge(b)


# --------------------------------------------------------------------------
# Data on the device.


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: every device of every process) named ``data``."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.array(devices), ('data',))


@struct.dataclass
class Preprocess:
    """Static settings of the on-device batch functions."""

    pad: int = struct.field(pytree_node=False)
    flip: bool = struct.field(pytree_node=False)
    mean: tuple[float, ...] | None = struct.field(pytree_node=False)
    std: tuple[float, ...] | None = struct.field(pytree_node=False)

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> 'Preprocess':
        norm = config.data.normalize
        return cls(
            pad=config.data.pad,
            flip=config.data.flip,
            mean=tuple(config.data.mean) if norm else None,
            std=tuple(config.data.std) if norm else None,
        )


def epoch_order(order_rng: jax.Array, epoch: int, num_examples: int, shuffle: bool) -> jax.Array:
    """Training order of an epoch: a fresh permutation, or the stored order."""
    if not shuffle:
        return jnp.arange(num_examples, dtype=jnp.int32)
    return jax.random.permutation(jax.random.fold_in(order_rng, epoch), num_examples).astype(
        jnp.int32
    )


def _train_batch(
    images: jax.Array,
    labels: jax.Array,
    order: jax.Array,
    start: jax.Array,
    rng: jax.Array,
    step: jax.Array,
    *,
    size: int,
    prep: Preprocess,
    sharding: NamedSharding | None = None,
) -> dict[str, jax.Array]:
    """Gathers ``order[start:start+size]``, augments it and scales to float."""
    idx = jax.lax.dynamic_slice(order, (start,), (size,))
    x = augment.random_crop_flip(jax.random.fold_in(rng, step), images[idx], prep.pad, prep.flip)
    batch = {'image': augment.to_float(x, prep.mean, prep.std), 'label': labels[idx]}
    if sharding is not None:
        batch = jax.lax.with_sharding_constraint(batch, sharding)
    return batch


train_batch = jax.jit(_train_batch, static_argnames=('size', 'prep', 'sharding'))


@functools.partial(jax.jit, donate_argnums=0, static_argnames=('size', 'count', 'prep', 'sharding'))
def train_steps(
    state: TrainState,
    images: jax.Array,
    labels: jax.Array,
    order: jax.Array,
    start: jax.Array,
    *,
    size: int,
    count: int,
    prep: Preprocess,
    sharding: NamedSharding | None = None,
) -> tuple[TrainState, TrainMetrics]:
    """``count`` steps on batches ``order[start + i*size:][:size]`` in one call.

    The same gather, augmentation and step as :func:`train_batch` followed by
    :func:`train_step`, run by ``lax.scan`` on the device: one dispatch and no
    host work for the whole chunk. Returns the state and the chunk's metrics.
    """

    def body(state, i):
        batch = _train_batch(
            images,
            labels,
            order,
            start + i * size,
            state.rng,
            state.step,
            size=size,
            prep=prep,
            sharding=sharding,
        )
        return _train_step(state, batch)

    state, metrics = jax.lax.scan(body, state, jnp.arange(count, dtype=jnp.int32))
    return state, metrics.reduce()


@functools.partial(jax.jit, static_argnames=('size', 'prep', 'sharding'))
def eval_batch(
    images: jax.Array,
    labels: jax.Array,
    mask: jax.Array,
    start: jax.Array,
    *,
    size: int,
    prep: Preprocess,
    sharding: NamedSharding | None = None,
) -> dict[str, jax.Array]:
    """Slice ``[start, start+size)`` of the padded test set, scaled to float."""
    sl = lambda a: jax.lax.dynamic_slice_in_dim(a, start, size)
    batch = {
        'image': augment.to_float(sl(images), prep.mean, prep.std),
        'label': sl(labels),
        'mask': sl(mask),
    }
    if sharding is not None:
        batch = jax.lax.with_sharding_constraint(batch, sharding)
    return batch


def train_batch_sizes(
    num_examples: int, batch_size: int, drop_remainder: bool, num_devices: int = 1
) -> list[int]:
    """Sizes of an epoch's batches; a last partial one is kept unless dropped.

    With several devices the partial batch is cut to a multiple of the device
    count (each device needs an equal share).
    """
    full, rest = divmod(num_examples, batch_size)
    sizes = [batch_size] * full
    rest -= rest % num_devices
    if rest and not drop_remainder:
        sizes.append(rest)
    return sizes


def pad_test_set(
    images: np.ndarray, labels: np.ndarray, batch_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pads the test set to whole batches and returns (images, labels, mask)."""
    n = len(labels)
    padded = math.ceil(n / batch_size) * batch_size
    extra = padded - n
    images = np.concatenate([images, np.zeros((extra,) + images.shape[1:], images.dtype)])
    labels = np.concatenate([labels, np.zeros((extra,), labels.dtype)])
    mask = np.arange(padded) < n
    return images, labels, mask


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
    state: TrainState,
    images: jax.Array,
    labels: jax.Array,
    order: jax.Array,
    sizes: list[int],
    prep: Preprocess,
    sharding: NamedSharding,
    progress: 'Progress',
    *,
    first: int = 0,
    total: TrainMetrics | None = None,
    stop: 'StopSignals | None' = None,
    check_every: int = 0,
    steps_per_call: int = 1,
) -> tuple[TrainState, TrainMetrics | None, int]:
    """Trains on batches ``first..`` of the epoch's ``order``.

    Steps run ``steps_per_call`` at a time in one compiled call
    (:func:`train_steps`), or one by one (:func:`train_batch` then
    :func:`train_step`) when it is 1. Returns the state, the running metrics
    (merged into ``total``) and the number of batches done: less than
    ``len(sizes)`` when a stop was requested or the loss or gradients stopped
    being finite (checked every ``check_every`` steps, at call boundaries).
    """
    start = sum(sizes[:first])
    for i, size, count in call_chunks(sizes, first, steps_per_call):
        if count == 1:
            batch = train_batch(
                images,
                labels,
                order,
                jnp.int32(start),
                state.rng,
                state.step,
                size=size,
                prep=prep,
                sharding=sharding,
            )
            state, m = train_step(state, batch)
        else:
            state, m = train_steps(
                state,
                images,
                labels,
                order,
                jnp.int32(start),
                size=size,
                count=count,
                prep=prep,
                sharding=sharding,
            )
        total = m if total is None else merge_metrics(total, m)
        start += size * count
        done = i + count
        progress.maybe_report(done, total)
        crossed = check_every and done // check_every != i // check_every
        if crossed and not _metrics_finite(total):
            return state, total, done
        if stop is not None and stop.agreed() is not None:
            return state, total, done
    return state, total, len(sizes)


def _metrics_finite(metrics: TrainMetrics) -> bool:
    """Whether every loss and gradient norm summed so far is finite (one host sync)."""
    return bool(jnp.isfinite(metrics.loss.total) & jnp.isfinite(metrics.grad_norm.total))


def _tree_finite(tree: Any) -> bool:
    return bool(
        jax.tree_util.tree_reduce(
            jnp.logical_and, jax.tree_util.tree_map(lambda x: jnp.isfinite(x).all(), tree)
        )
    )


# --------------------------------------------------------------------------
# Evaluation.


def evaluate_metrics(
    state: TrainState,
    test: tuple[jax.Array, jax.Array, jax.Array],
    batch_size: int,
    prep: Preprocess,
    sharding: NamedSharding | None = None,
    step: Callable[[TrainState, dict[str, jax.Array]], Metrics] | None = None,
) -> Metrics:
    """``step``'s metrics (default :func:`eval_step`) merged over every test image exactly once."""
    step = eval_step if step is None else step  # Looked up per call: it can be replaced.
    images, labels, mask = test
    total: Metrics | None = None
    for start in range(0, len(labels), batch_size):
        batch = eval_batch(
            images, labels, mask, jnp.int32(start), size=batch_size, prep=prep, sharding=sharding
        )
        m = step(state, batch)
        total = m if total is None else merge_metrics(total, m)
    return total


def evaluate(
    state: TrainState,
    test: tuple[jax.Array, jax.Array, jax.Array],
    batch_size: int,
    prep: Preprocess,
    sharding: NamedSharding | None = None,
) -> dict[str, float]:
    """Loss and accuracy over every test image exactly once."""
    total = evaluate_metrics(state, test, batch_size, prep, sharding)
    return {k: float(v) for k, v in total.compute().items()}


# --------------------------------------------------------------------------
# Progress.


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
# Checkpoints.


def checkpoint_manager(
    workdir: str, keep: int = 3, read_only: bool = False
) -> ocp.CheckpointManager:
    """Orbax manager of ``workdir/checkpoints``; checkpoints are named by global step."""
    if read_only:  # (Options that only matter for saving would be warned about.)
        options = ocp.CheckpointManagerOptions(
            read_only=True, create=False, save_interval_steps=0, max_to_keep=None
        )
    else:  # Temporary folders of saves that a kill or a full disk cut short are removed.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True
        )
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR)), options=options
    )


def _state_tree(state: TrainState) -> dict[str, Any]:
    return {
        'step': state.step,
        'params': state.params,
        'batch_stats': state.batch_stats,
        'opt_state': state.opt_state,
        'rng': state.rng,
    }


class CheckpointError(RuntimeError):
    """No checkpoint of a workdir can be read, or one cannot be written."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped training after a checkpoint was saved."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


def _metrics_tree(metrics: TrainMetrics | None) -> dict[str, Any]:
    """Running metrics as host numpy scalars (the same on every process)."""
    metrics = TrainMetrics.empty() if metrics is None else metrics
    return jax.tree_util.tree_map(np.asarray, flax.serialization.to_state_dict(metrics))


def save_checkpoint(
    manager: ocp.CheckpointManager,
    state: TrainState,
    meta: Mapping[str, Any],
    metrics: TrainMetrics | None = None,
) -> None:
    """Saves ``state`` under its global step, with ``meta`` and partial metrics.

    ``meta['epoch']`` counts completed epochs and ``meta['position']`` the
    batches of the next epoch already trained (0 at an epoch boundary), whose
    running ``metrics`` are saved too. Writing goes to a temporary folder that
    orbax renames when complete, so a kill never leaves a half checkpoint.
    """
    step = int(state.step)
    if step in manager.all_steps():  # Superseded (an interrupt saved this very step).
        manager.delete(step)
    try:
        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_state_tree(state)),
                train_metrics=ocp.args.StandardSave(_metrics_tree(metrics)),
                meta=ocp.args.JsonSave(dict(meta)),
            ),
        )
        manager.wait_until_finished()
    except Exception as e:  # OSError, or TensorStore's ValueError (RESOURCE_EXHAUSTED, ...).
        remove_partial_checkpoints(str(manager.directory))
        raise CheckpointError(
            f'could not write the checkpoint of step {step} in {manager.directory}: '
            f'{short_error(e)}; the earlier checkpoints are intact'
        ) from e


def short_error(error: BaseException, limit: int = 200) -> str:
    """One short line for an exception (TensorStore's messages span kilobytes)."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(error)
    if 'No space left on device' in text or 'RESOURCE_EXHAUSTED' in text:
        return 'No space left on device'
    text = ' '.join(text.split()).split(' [tensorstore_spec')[0]
    text = text or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + '...'


def remove_partial_checkpoints(directory: str) -> None:
    """Deletes orbax's temporary folders of unfinished saves in ``directory``."""
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(directory):
            if '.orbax-checkpoint-tmp' in name:
                shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def _quiet_unraisable(previous: Callable[[Any], None]) -> Callable[[Any], None]:
    """A ``sys.unraisablehook`` dropping orbax's noise after a failed read or write.

    A restore that fails part-way leaves TensorStore callbacks that fire into
    orbax's closed event loop, and a failed save leaves coroutines that die at
    interpreter exit: hundreds of traceback lines about nothing actionable.
    """

    def hook(unraisable: Any) -> None:
        text = str(unraisable.exc_value)
        if 'Event loop is closed' in text or 'Python is likely shutting down' in text:
            return
        previous(unraisable)

    hook.quiet_orbax = True
    return hook


def quiet_orbax_noise() -> None:
    """Installs :func:`_quiet_unraisable` (once; other unraisables still print).

    A failed read also abandons orbax coroutines; Python reports each as a
    ``RuntimeWarning`` when it is collected, so those warnings are ignored too.
    """
    warnings.filterwarnings(
        'ignore', message=r'coroutine .* was never awaited', category=RuntimeWarning
    )
    if not getattr(sys.unraisablehook, 'quiet_orbax', False):
        sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)


def restore_checkpoint(
    manager: ocp.CheckpointManager, state: TrainState, step: int | None = None
) -> tuple[TrainState, dict[str, Any], Metrics]:
    """Restores ``step`` (default: the latest) into the structure of ``state``."""
    step = manager.latest_step() if step is None else step
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_state_tree(state)),
            train_metrics=ocp.args.StandardRestore(_metrics_tree(None)),
            meta=ocp.args.JsonRestore(),
        ),
    )
    metrics = flax.serialization.from_state_dict(TrainMetrics.empty(), restored['train_metrics'])
    return state.replace(**restored['state']), dict(restored['meta']), metrics


def restore_latest_good(
    workdir: str, manager: ocp.CheckpointManager, state: TrainState
) -> tuple[TrainState, dict[str, Any], Metrics] | None:
    """Restores the newest readable checkpoint; None if there are none.

    Unreadable newer checkpoints are moved to ``workdir/checkpoints_corrupt/``
    (kept, not deleted) with a warning. If no checkpoint is readable,
    :class:`CheckpointError` names the folder and nothing is moved.
    """
    step, restored, bad = _newest_readable(manager, state)
    if step is None and not bad:
        return None
    for b, error in bad:
        target = _quarantine(workdir, b) if step is not None else None
        moved = f'; moved to {target}' if target else ''
        logger.warning('checkpoint %d is unreadable (%s)%s', b, error, moved)
    if bad and step is not None:
        manager.reload()
        logger.warning('resuming from the older checkpoint of step %d', step)
    return restored


def _newest_readable(
    manager: ocp.CheckpointManager, state: TrainState
) -> tuple[int | None, Any, list[tuple[int, str]]]:
    """``(step, restored, [(unreadable step, why), ...])`` trying newest first.

    Raises :class:`CheckpointError` when checkpoints exist but none is readable.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    bad = []
    for step in steps:
        try:
            return step, restore_checkpoint(manager, state, step), bad
        except Exception as e:  # pylint: disable=broad-except  # Any corruption.
            quiet_orbax_noise()
            bad.append((step, short_error(e)))
    if steps:
        raise CheckpointError(
            f'no readable checkpoint in {manager.directory} (steps {", ".join(map(str, steps))}: '
            f'{bad[0][1]}); fix or remove them, or rerun with --overwrite to start over'
        )
    return None, None, bad


def _quarantine(workdir: str, step: int) -> str:
    """Moves an unreadable checkpoint out of the way (kept); returns where."""
    source = os.path.join(workdir, CHECKPOINT_DIR, str(step))
    target_dir = os.path.join(workdir, CHECKPOINT_DIR + '_corrupt')
    os.makedirs(target_dir, exist_ok=True)
    target = os.path.join(target_dir, f'{step}-{int(time.time())}')
    os.rename(source, target)
    return target


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a workdir was trained with."""
    path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f'{workdir} holds no run ({workdir_lib.CONFIG_FILE} not found)')
    config = workdir_lib.read_json_object(path)
    if not is_run_config(config):
        raise CheckpointError(f'{path} is not the config of a resnet_jax run')
    return ml_collections.ConfigDict(config)


def restore(
    workdir: str, step: int | None = None
) -> tuple[flax.linen.Module, dict[str, Any], ml_collections.ConfigDict]:
    """Returns ``(model, variables, config)`` from a workdir's latest checkpoint.

    ``step`` picks another checkpoint (they are named by global step).

    ``model.apply(variables, x, train=False)`` gives logits for float NHWC ``x``
    preprocessed like the training data (see ``config.data``).
    """
    config = load_config(workdir)
    manager = checkpoint_manager(workdir, read_only=True)
    try:
        if manager.latest_step() is None:
            raise FileNotFoundError(f'no checkpoint in {os.path.join(workdir, CHECKPOINT_DIR)}')
        state = create_train_state(config, jax.random.PRNGKey(config.seed), 1)
        if step is not None:
            state, _, _ = restore_checkpoint(manager, state, step)
        else:  # The newest readable one; nothing is moved (this may be read-only use).
            found, (state, _, _), bad = _newest_readable(manager, state)
            for b, error in bad:
                logger.warning(
                    'checkpoint %d is unreadable (%s); using checkpoint %d', b, error, found
                )
    finally:
        manager.close()
    model, _ = cached_model(config.model, config.num_classes, config.dtype, config.image_size)
    return model, state.variables(), config


# --------------------------------------------------------------------------
# The loop.


# Fields that may change when a run is resumed: they do not change its result.
RESUMABLE_CHANGES = (
    'num_epochs',
    'eval_batch_size',
    'checkpoint_every_epochs',
    'keep_checkpoints',
    'progress_every_seconds',
    'check_finite_every_steps',
    'steps_per_call',
    'data.path',
    'data.download',
    'distributed.*',  # How many processes train it, and where they meet.
)
# The outputs of a run, removed by ``overwrite=True``.
RUN_OUTPUTS = (
    CHECKPOINT_DIR,
    workdir_lib.METRICS_FILE,
    workdir_lib.SUMMARY_FILE,
    workdir_lib.CONFIG_FILE,
)


def _flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
    """``{'data': {'path': p}}`` -> ``{'data.path': p}``."""
    return flax.traverse_util.flatten_dict(dict(tree), sep='.')


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``'field: old -> new'`` for each field that differs, resumable ones excluded."""
    a, b = _flatten(old), _flatten(new)
    allowed = set(RESUMABLE_CHANGES)
    if b.get('schedule') == 'cosine':  # Its shape depends on the run's length.
        allowed.discard('num_epochs')
    return [
        f'{k}: {a.get(k, "(absent)")!r} -> {b.get(k, "(absent)")!r}'
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
        and k not in allowed
        and not any(p.endswith('.*') and k.startswith(p[:-1]) for p in allowed)
    ]


def _has_run(workdir: str) -> bool:
    return os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR)) or os.path.exists(
        os.path.join(workdir, workdir_lib.METRICS_FILE)
    )


# Fields every run config of this tool has: a config.json without them is not ours.
_RUN_CONFIG_FIELDS = ('model', 'optimizer', 'learning_rate', 'batch_size', 'seed', 'data')


def is_run_config(obj: Any) -> bool:
    """Whether ``obj`` (a workdir's parsed config.json) is a run config of this tool."""
    return isinstance(obj, Mapping) and all(k in obj for k in _RUN_CONFIG_FIELDS)


def prepare_workdir(workdir: str, config: ml_collections.ConfigDict, overwrite: bool) -> None:
    """Refuses a workdir holding another config's run, or clears it on request.

    A ``config.json`` that is not a run config of this tool is never replaced,
    not even with ``overwrite``. The config itself is written by
    :func:`write_config` once the run's checkpoint has been read.
    """
    path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
    if os.path.exists(path) and not is_run_config(workdir_lib.read_json_object(path)):
        raise validation.ConfigError(
            f'{path} exists and is not the config of a resnet_jax run; choose another '
            '--workdir (nothing was changed)'
        )
    if overwrite:
        for name in RUN_OUTPUTS:
            target = os.path.join(workdir, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            elif os.path.exists(target):
                os.remove(target)
        for name in os.listdir(workdir):
            if name.startswith('events.out.tfevents.'):
                os.remove(os.path.join(workdir, name))
    elif _has_run(workdir) and os.path.exists(path):
        diffs = config_differences(workdir_lib.read_json(path), workdir_lib.config_json(config))
        if diffs:
            raise validation.ConfigError(
                f'{workdir} holds a run of a different config ({"; ".join(diffs)}); rerun '
                'with --overwrite to replace it, or --new_run to train into a new workdir'
            )


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Records ``config`` as the workdir's run config (``config.json``)."""
    workdir_lib.write_json(
        os.path.join(workdir, workdir_lib.CONFIG_FILE), workdir_lib.config_json(config)
    )


def check_writable(workdir: str) -> None:
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.TemporaryFile(dir=workdir):
            pass
    except OSError as e:
        raise validation.ConfigError(
            f'workdir {workdir} is not writable: {e.strerror or e}'
        ) from None


class StopSignals:
    """Turns the first SIGINT/SIGTERM into a request to checkpoint and stop.

    A second signal stops the process at once (the default action, at kernel
    level: it does not wait for a compiled call or a save in flight). An
    unfinished save is then never taken as a checkpoint.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        del frame
        self.signum = signum
        for sig in self._previous:
            signal.signal(sig, signal.SIG_DFL)
        logger.warning(
            '%s received: saving a checkpoint, then stopping (again: stop at once)',
            signal.Signals(signum).name,
        )

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
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def check_data_fits(config: ml_collections.ConfigDict, num_train: int, num_devices: int) -> None:
    if config.batch_size > num_train:
        raise validation.ConfigError(
            f'config.batch_size={config.batch_size} is larger than the training set '
            f'({num_train} images)'
        )
    if config.batch_size % num_devices:
        raise validation.ConfigError(
            f'config.batch_size={config.batch_size} is not divisible by the '
            f'{num_devices} devices it is sharded over'
        )


def device_eval_batch_size(config: ml_collections.ConfigDict, num_devices: int) -> int:
    """``config.eval_batch_size`` rounded up to a multiple of the device count."""
    return -(-config.eval_batch_size // num_devices) * num_devices


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    mesh: Mesh | None = None,
    *,
    overwrite: bool = False,
) -> tuple[TrainState, dict[str, Any]]:
    """Trains ``config`` into ``workdir``, resuming from its latest checkpoint.

    Batches are sharded over ``mesh`` (default: all local devices). A workdir
    holding a run of another config is refused unless ``overwrite``, which
    deletes that run's outputs first. SIGINT/SIGTERM save a checkpoint (mid-epoch
    if need be) and raise :class:`Interrupted`; a non-finite loss stops the run
    with status ``diverged``, keeping the last good checkpoint. Returns the final
    state and the summary also written to ``workdir/summary.json``.
    """
    validation.validate_config(config)
    check_writable(workdir)
    with distributed.primary_only(workdir_lib.lock(workdir)):
        return _train_and_evaluate(config, workdir, mesh, overwrite)


@functools.lru_cache(maxsize=1)
def _load_dataset_cached(data_json: str, seed: int) -> input_pipeline.Dataset:
    return input_pipeline.load_dataset(ml_collections.ConfigDict(json.loads(data_json)), seed)


def load_dataset(config: ml_collections.ConfigDict) -> input_pipeline.Dataset:
    """``config``'s dataset; the last one loaded is reused (runs of a sweep)."""
    data = dict(workdir_lib.config_json(config.data), image_size=config.image_size)
    return _load_dataset_cached(json.dumps(data, sort_keys=True), config.seed)


def _train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, mesh: Mesh | None, overwrite: bool
) -> tuple[TrainState, dict[str, Any]]:
    t_start = time.time()
    data = load_dataset(config)
    mesh = make_mesh() if mesh is None else mesh
    num_devices = mesh.devices.size
    check_data_fits(config, len(data.train_labels), num_devices)
    if data.num_classes > config.num_classes:
        raise validation.ConfigError(
            f'the dataset has {data.num_classes} classes but config.num_classes='
            f'{config.num_classes}'
        )
    if distributed.is_primary():
        prepare_workdir(workdir, config, overwrite)
    distributed.sync('workdir prepared')

    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P('data'))
    prep = Preprocess.from_config(config)
    sizes = train_batch_sizes(
        len(data.train_labels), config.batch_size, config.drop_remainder, num_devices
    )
    steps_per_epoch = len(sizes)
    eval_bs = device_eval_batch_size(config, num_devices)

    train_images = jax.device_put(data.train_images, replicated)
    train_labels = jax.device_put(data.train_labels, replicated)
    test = tuple(
        jax.device_put(a, replicated)
        for a in pad_test_set(data.test_images, data.test_labels, eval_bs)
    )

    init_rng, order_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    state = jax.device_put(create_train_state(config, init_rng, steps_per_epoch), replicated)
    num_params = models.count_params(state.params)
    model, _ = cached_model(config.model, config.num_classes, config.dtype, config.image_size)
    flops = models.flops_per_image(model, state.variables(), config.image_size)
    logger.info(
        'model %s: %s trainable parameters, %.1f MFLOPs/image forward',
        config.model,
        f'{num_params:,}',
        flops / 1e6,
    )
    logger.info(
        'data: %s (%s), %d train / %d test images, %d classes; %d steps/epoch on %d device(s)',
        data.source,
        data.path or 'default',
        len(data.train_labels),
        len(data.test_labels),
        data.num_classes,
        steps_per_epoch,
        num_devices,
    )

    manager = checkpoint_manager(workdir, config.keep_checkpoints)
    start_epoch, position, partial, meta = 0, 0, None, {}
    try:
        restored = restore_latest_good(workdir, manager, state)
    except BaseException:
        manager.close()
        raise
    if distributed.is_primary():
        write_config(workdir, config)
    if restored is not None:
        state, meta, partial = restored
        start_epoch, position = int(meta['epoch']), int(meta.get('position', 0))
        where = f' (step {position} of epoch {start_epoch + 1})' if position else ''
        logger.info('resuming after epoch %d%s', start_epoch, where)
    prior_seconds = float(meta.get('wall_seconds', 0.0))
    records = writers.truncate_metrics(workdir, start_epoch, write=distributed.is_primary())
    metric_logger = writers.MetricLogger(workdir, enabled=distributed.is_primary())
    schedule = create_learning_rate_schedule(config, steps_per_epoch)

    def checkpoint(epoch_done: int, pos: int, metrics: TrainMetrics | None, seconds: float) -> None:
        if not _tree_finite((state.params, state.batch_stats)):
            raise _NonFinite('non-finite parameters or batch statistics')
        save_checkpoint(
            manager,
            state,
            {
                'epoch': epoch_done,
                'position': pos,
                'partial_seconds': seconds,
                'wall_seconds': prior_seconds + time.time() - t_start,
            },
            metrics,
        )

    status, error = 'incomplete', None
    stop = StopSignals()
    try:
        with stop:
            for epoch in range(start_epoch + 1, config.num_epochs + 1):
                first = position if epoch == start_epoch + 1 else 0
                seconds_before = float(meta.get('partial_seconds', 0.0)) if first else 0.0
                t0 = time.time()
                order = epoch_order(order_rng, epoch, len(data.train_labels), config.shuffle)
                progress = Progress(epoch, steps_per_epoch, config.progress_every_seconds)
                state, total, done = train_epoch(
                    state,
                    train_images,
                    train_labels,
                    order,
                    sizes,
                    prep,
                    batch_sharding,
                    progress,
                    first=first,
                    total=partial if first else None,
                    stop=stop,
                    check_every=config.check_finite_every_steps,
                    steps_per_call=config.steps_per_call,
                )
                finite = _metrics_finite(total)  # Waits for the epoch's last step.
                train_seconds = seconds_before + time.time() - t0
                if not finite:
                    raise _NonFinite(
                        f'non-finite loss or gradients in epoch {epoch} (by step {done})'
                    )
                if stop.agreed() is None:  # Training stopped early only on a signal.
                    test_result = evaluate(state, test, eval_bs, prep, batch_sharding)
                if stop.agreed() is not None:  # Also when it came during evaluation.
                    checkpoint(epoch - 1, done, total, train_seconds)
                    raise Interrupted(
                        stop.signum,
                        f'stopped in epoch {epoch} after {done}/{steps_per_epoch} steps; '
                        f'checkpoint saved in {manager.directory}; rerun the same command '
                        'to resume',
                    )
                if not math.isfinite(test_result['loss']):
                    raise _NonFinite(f'non-finite test loss in epoch {epoch}')
                train_result = {k: float(v) for k, v in total.compute().items()}
                record = {
                    'epoch': epoch,
                    'train_loss': train_result['loss'],
                    'train_accuracy': train_result['accuracy'],
                    'test_loss': test_result['loss'],
                    'test_accuracy': test_result['accuracy'],
                    'learning_rate': float(schedule(epoch * steps_per_epoch - 1)),
                    'epoch_seconds': train_seconds,
                    'images_per_second': sum(sizes) / train_seconds,
                }
                records.append(record)
                metric_logger.write(record)
                if epoch % config.checkpoint_every_epochs == 0 or epoch == config.num_epochs:
                    checkpoint(epoch, 0, None, 0.0)
    except _NonFinite as e:
        status, error = 'diverged', str(e)
        logger.error('%s: stopping; the last good checkpoint is kept', error)
    else:
        if records and records[-1]['epoch'] == config.num_epochs:
            status = 'completed'
            if start_epoch < config.num_epochs:  # Finished in this invocation.
                metric_logger.write_hparams(hparams(config), final_metrics(records))
    finally:
        close_quietly(manager)
        metric_logger.close()

    summary = run_summary(
        config, records, num_params, flops, data, prior_seconds + time.time() - t_start, mesh
    )
    summary['status'] = status
    if error:
        summary['error'] = error
    if distributed.is_primary():
        workdir_lib.write_json(os.path.join(workdir, workdir_lib.SUMMARY_FILE), summary)
    if records:
        logger.info(
            '%s: final test accuracy %.2f%%, best %.2f%% (epoch %s), %.0fs',
            status,
            100 * summary['test_accuracy'],
            100 * summary['best_test_accuracy'],
            summary['best_epoch'],
            summary['wall_seconds'],
        )
    return state, summary


def hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config's scalar fields, dotted (``data.train_subset``), for TensorBoard."""
    flat = _flatten(workdir_lib.config_json(config))
    return {k: v for k, v in flat.items() if isinstance(v, (bool, int, float, str))}


def final_metrics(records: list[dict[str, Any]]) -> dict[str, float]:
    last = records[-1]
    return {
        'hparam/train_accuracy': last['train_accuracy'],
        'hparam/test_accuracy': last['test_accuracy'],
        'hparam/best_test_accuracy': max(r['test_accuracy'] for r in records),
    }


def close_quietly(manager: ocp.CheckpointManager) -> None:
    """Finishes and closes ``manager``; a failed save was already reported."""
    try:
        manager.wait_until_finished()
    except Exception:  # pylint: disable=broad-except  # save_checkpoint raised it.
        remove_partial_checkpoints(str(manager.directory))
    with contextlib.suppress(Exception):
        manager.close()


class _NonFinite(Exception):
    """The loss or the parameters stopped being finite."""


def run_summary(
    config: ml_collections.ConfigDict,
    records: list[dict[str, Any]],
    num_params: int,
    flops: float,
    data: input_pipeline.Dataset,
    wall_seconds: float,
    mesh: Mesh,
) -> dict[str, Any]:
    last = records[-1] if records else {}
    best = max(records, key=lambda r: r['test_accuracy']) if records else {}
    return {
        'config': workdir_lib.config_json(config),
        'num_params': num_params,
        'flops_per_image': flops,
        'epochs_completed': last.get('epoch', 0),
        'train_loss': last.get('train_loss'),
        'train_accuracy': last.get('train_accuracy'),
        'test_loss': last.get('test_loss'),
        'test_accuracy': last.get('test_accuracy'),
        'best_test_accuracy': best.get('test_accuracy'),
        'best_epoch': best.get('epoch'),
        'wall_seconds': wall_seconds,
        'data': {
            'source': data.source,
            'path': data.path,
            'num_train': int(len(data.train_labels)),
            'num_test': int(len(data.test_labels)),
        },
        'devices': [str(d) for d in mesh.devices.flat],
    }


def evaluate_workdir(workdir: str, data_path: str | None = None) -> dict[str, float]:
    """Restores a workdir's latest checkpoint and evaluates it on the test set."""
    model, variables, config = restore(workdir)
    if data_path:
        config.data.path = data_path
    data = load_dataset(config)
    mesh = make_mesh()
    eval_bs = device_eval_batch_size(config, mesh.devices.size)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables['params'],
        batch_stats=variables['batch_stats'],
        opt_state=None,
        rng=jax.random.PRNGKey(0),
        apply_fn=model.apply,
        tx=optax.identity(),
    )
    replicated = NamedSharding(mesh, P())
    test = tuple(
        jax.device_put(a, replicated)
        for a in pad_test_set(data.test_images, data.test_labels, eval_bs)
    )
    return evaluate(
        jax.device_put(state, replicated),
        test,
        eval_bs,
        Preprocess.from_config(config),
        NamedSharding(mesh, P('data')),
    )
