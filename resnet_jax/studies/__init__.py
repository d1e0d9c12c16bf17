"""Studies: grids (``sweep`` sections) and Optuna searches whose trials are ordinary runs.

Holds :mod:`~resnet_jax.studies.sweep` (a grid's axes and points),
:mod:`~resnet_jax.studies.search_space` (search spaces and the study's spec,
no Optuna), :mod:`~resnet_jax.studies.search` (``run_study``: one worker of a
study), :mod:`~resnet_jax.studies.optuna_study` (the Optuna study: storage,
opening, claiming trials, heartbeats), :mod:`~resnet_jax.studies.trials`
(training claimed trials), :mod:`~resnet_jax.studies.run_folders` (a trial's
run folder), :mod:`~resnet_jax.studies.preflight` (the data every trial
shares, checked before the first), :mod:`~resnet_jax.studies.objective` (a run as the
objective of an Optuna loop of one's own) and :mod:`~resnet_jax.studies.workers` (starting N
worker processes). May import the base modules, :mod:`resnet_jax.datasets`,
:mod:`resnet_jax.training` and :mod:`resnet_jax.rundir`; never reports or the
command line.
"""
