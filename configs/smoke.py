"""A tiny run for CPUs and tests: 2 epochs on 256 training images.

    python -m resnet_jax.main --config smoke --workdir runs/smoke \
        --config.data.path=data/cifar10-jpeg

Finishes in about a minute on 2 CPU cores (mostly compilation); accuracy is
near chance and only shows the whole pipeline works.
"""

import ml_collections

from resnet_jax.configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.num_epochs = 2
    config.batch_size = 32
    config.eval_batch_size = 100
    config.data.train_subset = 256
    config.progress_every_seconds = 10.0
    return config
