"""A true ResNet-18 (11.2M parameters) with the study's recipe.

    python -m resnet_jax.main --config resnet18 --workdir runs/resnet18 \
        --config.data.path=data/cifar10-jpeg

Same recipe as configs/default.py (Adam 0.01, batch 100, /3 every 20 epochs,
50 epochs); only the network changes. About 19x the FLOPs of the `paper` model
per image (1.11 vs 0.058 GFLOPs forward): use a GPU.
"""

import ml_collections

from resnet_jax.configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.model = 'resnet18'
    return config
