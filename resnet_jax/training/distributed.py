"""Multi-process training with JAX's own runtime (``jax.distributed``).

    from resnet_jax.training import distributed
    distributed.initialize(config.distributed)   # before any other JAX call
    if distributed.is_primary(): ...             # process 0 writes files

With ``config.distributed.enabled`` every process runs the same command; they
form one global mesh over all their devices (``train.make_mesh``), so a global
batch is sharded over every device of every process and BatchNorm statistics
are global. Each process computes only the shards of each batch that live on
its own devices. Orbax writes checkpoints collectively; only process 0 writes
metrics, summaries and reports.

Leave ``coordinator_address`` empty to let JAX detect the cluster (SLURM, Open
MPI, Kubernetes and others that ``jax.distributed.initialize()`` supports).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import jax

logger = logging.getLogger('resnet_jax')


def initialize(dist_config: Any) -> None:
    """Joins the processes of a multi-process run (no-op when disabled)."""
    if not dist_config.enabled:
        return
    if dist_config.cpu_collectives:
        # CPU devices need a collectives backend to talk across processes
        # (harmless on GPUs; asking for the platform here would start JAX too early).
        jax.config.update('jax_cpu_collectives_implementation', dist_config.cpu_collectives)
    kwargs = {}
    if dist_config.coordinator_address:
        kwargs = dict(
            coordinator_address=dist_config.coordinator_address,
            num_processes=dist_config.num_processes,
            process_id=dist_config.process_id,
        )
    jax.distributed.initialize(**kwargs)
    logger.info(
        'process %d of %d: %d local / %d global devices',
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def is_primary() -> bool:
    """Whether this process writes files (process 0)."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Waits until every process reaches this point (no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def primary_only(context: Any) -> Iterator[None]:
    """Enters ``context`` on process 0 only."""
    if is_primary():
        with context:
            yield
    else:
        yield
