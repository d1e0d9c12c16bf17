"""One run (or several as one program): state, steps, optimisers, the loop, checkpoints.

    from resnet_jax.training import loop
    state, summary = loop.train_and_evaluate(config, 'runs/default')

Holds :mod:`~resnet_jax.training.train` (the train state, ``train_step``,
``eval_step``, metrics), :mod:`~resnet_jax.training.optim` (optimisers and
schedules, registered), :mod:`~resnet_jax.training.steps` (the compiled calls
over the run axis), :mod:`~resnet_jax.training.loop` (``train_and_evaluate``:
load, create or resume, then per epoch train, evaluate, log, checkpoint),
:mod:`~resnet_jax.training.epochs` (around an epoch's compiled calls: checks,
records, checkpoints), :mod:`~resnet_jax.training.runs` (one run's state, resume and summary),
:mod:`~resnet_jax.training.checkpoints`, :mod:`~resnet_jax.training.signals`,
:mod:`~resnet_jax.training.distributed` and :mod:`~resnet_jax.training.checks`
(a run config's checks). May import the base modules, :mod:`resnet_jax.models`,
:mod:`resnet_jax.datasets` and :mod:`resnet_jax.rundir`; never studies,
reports or the command line.
"""
