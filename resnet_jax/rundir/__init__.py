"""A run's folder: its files, records, TensorBoard events and the lock against two writers.

Holds :mod:`~resnet_jax.rundir.workdir` (what a run folder holds, atomic and
checked JSON, preparing a folder for a run), :mod:`~resnet_jax.rundir.writers`
(``metrics.jsonl`` and TensorBoard events, written and read back) and
:mod:`~resnet_jax.rundir.locks` (the lease lock). Imports only the base modules
(:mod:`resnet_jax.validation`): no JAX, so reports read runs without it.
"""
