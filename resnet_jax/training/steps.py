"""The compiled training calls: every run of a group, one seam for the run axis.

    states, total, done = steps.train_epoch(states, images, labels, orders, sizes, prep)

``states`` and ``orders`` carry a leading *run* axis (a single run is a group of
one); :func:`resnet_jax.training.train.over_runs` maps :func:`resnet_jax.training.train.update`
over it. One compiled call trains ``steps_per_call`` steps of every run, each
on its own data order, augmentation draws and learning rate: batches are
gathered from the uint8 images on the device, augmented there and sharded over
the ``data`` mesh axis.
"""

# No `from __future__ import annotations`: clu reads Metrics annotations at run time.
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from resnet_jax.datasets import augment
from resnet_jax.training import train


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
# One update of every run on its batch (:func:`resnet_jax.training.train.update`); states donated.
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
