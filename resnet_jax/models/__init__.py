"""The networks: one generic ResNet, its named variants, and the convolution they use.

    from resnet_jax import models
    model = models.create_model('paper')        # or 'resnet18', 'resnet34', or your own
    models.count_params(variables['params'])     # 195,738 for 'paper'

Holds :mod:`~resnet_jax.models.resnet` (the ResNet, the :data:`MODELS`
registry) and :mod:`~resnet_jax.models.conv` (PyTorch-padded convolutions).
Imports only the base modules (:mod:`resnet_jax.registry`).
"""

from resnet_jax.models.resnet import (
    DTYPES,
    MODELS,
    ResNet,
    count_params,
    create_model,
    flops_per_image,
    init_variables,
)

__all__ = [
    'DTYPES',
    'MODELS',
    'ResNet',
    'count_params',
    'create_model',
    'flops_per_image',
    'init_variables',
]
