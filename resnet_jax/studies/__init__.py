"""Studies: grids (``sweep`` sections) and Optuna searches whose trials are ordinary runs.

Holds :mod:`~resnet_jax.studies.sweep` (a grid's axes and points),
:mod:`~resnet_jax.studies.search_space` (search spaces and the study's spec,
no Optuna), :mod:`~resnet_jax.studies.search` (the Optuna study and the worker
that trains its trials) and :mod:`~resnet_jax.studies.workers` (starting N
worker processes). May import the base modules, :mod:`resnet_jax.datasets`,
:mod:`resnet_jax.training` and :mod:`resnet_jax.rundir`; never reports or the
command line.
"""
