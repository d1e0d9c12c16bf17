"""Train state, optimiser, jit-compiled steps and metrics.

Library use::

    from resnet_jax.training import train
    state = train.create_train_state(config, jax.random.PRNGKey(0), steps_per_epoch=500)
    state, metrics = train.train_step(state, {'image': x, 'label': y})  # x: float NHWC
    print(metrics.compute())   # {'loss': ..., 'accuracy': ...}

Optimisers and schedules are registered in :mod:`resnet_jax.training.optim`. The
learning rate is optimiser state (``optax.inject_hyperparams``): runs that
differ only in it share one optimiser, so their states stack along a leading
*run* axis (:func:`stack`) and train as one program
(:mod:`resnet_jax.training.steps` maps :func:`update` over that axis).
Whole runs: :func:`resnet_jax.training.loop.train_and_evaluate`.
"""

# No `from __future__ import annotations`: clu reads Metrics annotations at run time.
import dataclasses
import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metrics as clu_metrics
from flax.training import train_state
from jax.sharding import Mesh

from resnet_jax import models
from resnet_jax.training import optim

logger = logging.getLogger('resnet_jax')


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


class TrainState(train_state.TrainState):
    """flax's ``TrainState`` plus BatchNorm statistics and the augmentation key.

    ``apply_fn`` and ``tx`` are static; ``rng`` is folded with ``step`` for
    each step's augmentation draws.
    """

    batch_stats: Any
    rng: jax.Array

    def variables(self) -> dict[str, Any]:
        return {'params': self.params, 'batch_stats': self.batch_stats}


@dataclasses.dataclass(frozen=True)
class EpochRecord:
    """One epoch's line of metrics.jsonl (accuracies are fractions)."""

    epoch: int
    train_loss: float
    train_accuracy: float
    test_loss: float
    test_accuracy: float
    learning_rate: float  # Of the epoch's last update, from the optimiser state.
    epoch_seconds: float
    images_per_second: float
    # On the held-out training images (config.data.validation_size > 0), else absent.
    val_loss: float | None = None
    val_accuracy: float | None = None
    # The first compiled call of this start, in the epoch it ran in: its seconds
    # (compilation and that call's steps), which images_per_second leaves out.
    compile_seconds: float | None = None

    def asdict(self) -> dict[str, Any]:
        """The record as written: fields without a value (no validation split) left out."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


# The names of one epoch's record in metrics.jsonl, in order; with a validation
# split (config.data.validation_size > 0) VALIDATION_KEYS follow them.
METRIC_KEYS = tuple(
    f.name for f in dataclasses.fields(EpochRecord) if f.default is dataclasses.MISSING
)
VALIDATION_KEYS = tuple(
    f.name for f in dataclasses.fields(EpochRecord) if f.name.startswith('val_')
)


# --------------------------------------------------------------------------
# Model and state.


@functools.lru_cache(maxsize=16)
def cached_model(
    name: str, num_classes: int, dtype: str, image_size: int
) -> tuple[flax.linen.Module, Callable[[jax.Array], Any]]:
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

    Runs of one process that share a model and an optimiser config (learning
    rates aside) share the same ``apply_fn`` and ``tx``, so their steps are
    compiled once for all.
    """
    model, init = cached_model(config.model, config.num_classes, config.dtype, config.image_size)
    tx = optim.cached_optimizer(config, steps_per_epoch)
    init_rng, aug_rng = jax.random.split(rng)
    variables = init(init_rng)
    params = variables['params']
    opt_state = tx.init(params)
    opt_state.hyperparams['learning_rate'] = jnp.asarray(config.learning_rate, jnp.float32)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        apply_fn=model.apply,
        params=params,
        tx=tx,
        opt_state=opt_state,
        batch_stats=variables.get('batch_stats', {}),
        rng=aug_rng,
    )


# --------------------------------------------------------------------------
# Steps.


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def update(state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, TrainMetrics]:
    """One optimiser update on ``batch`` (``image``: float NHWC, ``label``: int32).

    Pure; jit-compiled as :func:`train_step`. BatchNorm uses the statistics of
    the whole (global) batch and updates its running averages.
    """

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {'params': params, 'batch_stats': state.batch_stats},
            batch['image'],
            train=True,
            mutable=['batch_stats'],
        )
        losses = _cross_entropy(logits, batch['label'])
        return losses.mean(), (logits, losses, updates.get('batch_stats', {}))

    grads, (logits, losses, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
    metrics = TrainMetrics.single_from_model_output(
        loss=losses,
        logits=logits,
        labels=batch['label'],
        grad_norm=optax.tree_utils.tree_norm(grads),
    )
    return state.apply_gradients(grads=grads, batch_stats=batch_stats), metrics


train_step = jax.jit(update, donate_argnums=0)


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


def learning_rate(state: TrainState) -> jax.Array:
    """The base learning rate of a state (stacked states: one per run)."""
    return optim.base_learning_rate(state.opt_state)


def applied_learning_rate(state: TrainState) -> jax.Array:
    """The learning rate of a state's last update (stacked states: one per run)."""
    return optim.applied_learning_rate(state.opt_state)


# --------------------------------------------------------------------------
# Runs along a leading axis.


def stack(trees: Sequence[Any]) -> Any:
    """Stacks equally shaped pytrees (states, metrics) along a new leading run axis."""
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree: Any, run: int) -> Any:
    """Run ``run`` of a stacked pytree."""
    return jax.tree_util.tree_map(lambda x: x[run], tree)


def num_runs(tree: Any) -> int:
    """The length of a stacked pytree's leading run axis."""
    return jax.tree_util.tree_leaves(tree)[0].shape[0]


@jax.jit
def runs_finite(tree: Any) -> jax.Array:
    """Per run, whether every leaf of a stacked pytree is finite."""
    leaves = [
        jnp.isfinite(x).reshape(x.shape[0], -1).all(axis=1) for x in jax.tree_util.tree_leaves(tree)
    ]
    return functools.reduce(jnp.logical_and, leaves)


@jax.jit
def metrics_finite(metrics: TrainMetrics) -> jax.Array:
    """Per run, whether every loss and gradient norm summed so far is finite."""
    return jnp.isfinite(metrics.loss.total) & jnp.isfinite(metrics.grad_norm.total)


# --------------------------------------------------------------------------
# Devices.


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: every device of every process) named ``data``."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.array(devices), ('data',))
