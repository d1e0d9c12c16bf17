"""The compiled calls over the run axis: the one place that maps a run's step over runs.

    states, total, done = steps.train_epoch(states, images, labels, orders, sizes, prep)
    results = steps.evaluate(states, test, batch_size, prep)

``states`` and ``orders`` carry a leading *run* axis (a single run is a group of
one). :func:`over_runs` compiles a one-run function over that axis:
:data:`update_runs` is :func:`resnet_jax.training.train.update` of every run,
:data:`scan_updates` several of its steps in one ``lax.scan``, :data:`eval_steps`
:func:`resnet_jax.training.train.eval_step`. Each run trains on its own data
order, augmentation draws and learning rate: batches are gathered from the
uint8 images on the device, augmented there and sharded over the ``data`` mesh
axis. A single run calls the plain one-run program, bit for bit.
"""

# No `from __future__ import annotations`: clu reads Metrics annotations at run time.
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from resnet_jax.datasets import augment
from resnet_jax.training import train


@jax.jit
def _squeeze(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: x[0], tree)


@jax.jit
def _expand(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: x[None], tree)


def over_runs(
    fn: Callable[..., Any],
    in_axes: Sequence[int | None],
    *,
    static_argnames: Sequence[str] = (),
    donate_argnums: Sequence[int] = (),
) -> Callable[..., Any]:
    """``fn`` jit-compiled over the leading run axis of the arguments whose ``in_axes`` is 0.

    Several runs go through ``jax.vmap`` (vmapped convolution weights become
    grouped convolutions: one kernel R times larger). A single run calls the
    compiled ``fn`` itself on its arguments without their run axis (squeezed
    and expanded again in calls of their own), so it runs exactly the program
    of a run trained alone: the same numbers, bit for bit. Keyword arguments
    are the ``static_argnames``.
    """
    statics, donate = tuple(static_argnames), tuple(donate_argnums)
    single = jax.jit(fn, static_argnames=statics, donate_argnums=donate)

    def vmapped(*args, **static):
        return jax.vmap(functools.partial(fn, **static), in_axes=tuple(in_axes))(*args)

    mapped = jax.jit(vmapped, static_argnames=statics, donate_argnums=donate)

    def call(*args, **static):
        runs = {train.num_runs(a) for a, axis in zip(args, in_axes, strict=True) if axis == 0}
        if runs != {1}:
            return mapped(*args, **static)
        squeezed = [_squeeze(a) if axis == 0 else a for a, axis in zip(args, in_axes, strict=True)]
        return _expand(single(*squeezed, **static))

    call.single, call.mapped = single, mapped  # (Their compile caches, for tests.)
    return call


def _augmented_batch(state, order, images, labels, start, *, size, prep, sharding=None):
    return augment.train_batch(
        images, labels, order, start, state.rng, state.step, size=size, prep=prep, sharding=sharding
    )


def _scan_updates(state, order, images, labels, start, *, size, count, prep, sharding=None):
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
augmented_batches = over_runs(_augmented_batch, (0, 0, None, None, None), static_argnames=_STATIC)
# One update of every run on its batch (:func:`resnet_jax.training.train.update`); states donated.
update_runs = over_runs(train.update, (0, 0), donate_argnums=(0,))
# ``count`` updates of every run in one call, each on its own gathered batch; states donated.
scan_updates = over_runs(
    _scan_updates,
    (0, 0, None, None, None),
    static_argnames=(*_STATIC, 'count'),
    donate_argnums=(0,),
)
# Each run's metrics on one (shared) evaluation batch.
eval_steps = over_runs(train.eval_step.__wrapped__, (0, None))


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

    ``orders`` (indices into ``images``/``labels``, which all runs share) has a
    leading run axis; run r's i-th batch is ``orders[r, start + i*size:][:size]``.
    Steps run ``steps_per_call`` at a time (:func:`call_chunks`): a single step
    is :data:`augmented_batches` then :data:`update_runs`, several are one
    :data:`scan_updates`. ``states`` are donated. After each call,
    ``after_call(first batch of the call, batches done, running metrics)`` may
    return True to stop early. Returns the states, the running metrics (merged
    into ``total``) and the number of batches done.
    """
    start, done = sum(sizes[:first]), first
    for i, size, count in call_chunks(sizes, first, steps_per_call):
        at, batching = jnp.int32(start), {'size': size, 'prep': prep, 'sharding': sharding}
        if count == 1:
            batches = augmented_batches(states, orders, images, labels, at, **batching)
            states, metrics = update_runs(states, batches)
        else:
            states, metrics = scan_updates(
                states, orders, images, labels, at, count=count, **batching
            )
        total = metrics if total is None else train.merge_metrics(total, metrics)
        start += size * count
        done = i + count
        if after_call is not None and after_call(i, done, total):
            break
    return states, total, done


def evaluate(
    states: train.TrainState,
    test: tuple[jax.Array, jax.Array, jax.Array],
    batch_size: int,
    prep: augment.Preprocess,
    sharding: NamedSharding | None = None,
) -> list[dict[str, float]]:
    """Each run's loss and accuracy over every image of the padded ``test`` set once.

    ``states`` are stacked (:func:`resnet_jax.training.train.stack`); ``test`` is
    ``(images, labels, mask)`` from :func:`resnet_jax.datasets.augment.pad_test_set`.
    """
    images, labels, mask = test
    total: train.Metrics | None = None
    for start in range(0, len(labels), batch_size):
        batch = augment.eval_batch(
            images, labels, mask, jnp.int32(start), size=batch_size, prep=prep, sharding=sharding
        )
        metrics = eval_steps(states, batch)
        total = metrics if total is None else train.merge_metrics(total, metrics)
    return [
        {k: float(v) for k, v in train.unstack(total, r).compute().items()}
        for r in range(train.num_runs(states))
    ]
