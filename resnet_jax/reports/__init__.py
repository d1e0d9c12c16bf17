"""Reports written from what runs and studies left on disk: tables, plots, statistics.

Holds :mod:`~resnet_jax.reports.sweep_report` (a grid's results tables, the
comparison with the paper, seed statistics, plots; and one run's curves),
:mod:`~resnet_jax.reports.study_report` (an Optuna study's trials, history and
importances) and their parts (:mod:`~resnet_jax.reports.load`,
:mod:`~resnet_jax.reports.stats`, :mod:`~resnet_jax.reports.tables`,
:mod:`~resnet_jax.reports.markdown`, :mod:`~resnet_jax.reports.plots`). May
import the base modules, :mod:`resnet_jax.rundir` and :mod:`resnet_jax.studies`;
never training (reports need no JAX) or the command line.
"""
