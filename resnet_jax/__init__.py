"""resnet_jax: ResNets on CIFAR-10 in pure JAX (Flax, Optax, Orbax).

    import resnet_jax
    model = resnet_jax.create_model('paper')            # the study's network
    model, variables, config = resnet_jax.restore('runs/default')
    from resnet_jax.configs import paper_sweep           # the study's configs

The command line is ``resnet-jax`` (also ``python -m resnet_jax.main``), the
benchmark ``resnet-jax-bench``. Parts, by layer: ``config`` (the default
config), ``registry`` and ``validation``; ``models`` (the networks),
``datasets`` (CIFAR-10 from disk, batching and augmentation) and ``rundir`` (a
run's files); ``training`` (state, steps, optimisers, the loop, checkpoints);
``studies`` (grids and searches); ``reports``; ``cli`` (the command line); and
``configs``, the study's config files. Models, optimisers, schedules and data
sources are chosen by name from registries (``models.MODELS``,
``training.optim.OPTIMIZERS``, ``training.optim.SCHEDULES``,
``datasets.SOURCES``; see ``registry``).
"""

import importlib
from typing import Any

_EXPORTS = {
    'create_model': 'resnet_jax.models.resnet',
    'TrainState': 'resnet_jax.training.train',
    'create_train_state': 'resnet_jax.training.train',
    'train_step': 'resnet_jax.training.train',
    'eval_step': 'resnet_jax.training.train',
    'train_and_evaluate': 'resnet_jax.training.loop',
    'restore': 'resnet_jax.training.checkpoints',
}


def __getattr__(name: str) -> Any:
    """Imports the public API lazily: ``import resnet_jax`` stays light."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


__all__ = [
    'create_model',
    'TrainState',
    'create_train_state',
    'train_step',
    'eval_step',
    'train_and_evaluate',
    'restore',
]
__version__ = '0.1.0'
