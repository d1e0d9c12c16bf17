"""The study's recipe: the `paper` ResNet, Adam 0.01, batch 100, 50 epochs.

    python -m resnet_jax.main --config default --workdir runs/default \
        --config.data.path=data/cifar10-jpeg

The study ("ResNet with Hyper Parameters Tuning") reports 95.5% train / 88.3% test
accuracy for this configuration on the original CIFAR-10 (the JPEG copy used on
machines without internet scores a few points lower on test).

The fields and what they mean: resnet_jax/config.py.
"""

from resnet_jax.config import get_config

__all__ = ['get_config']
