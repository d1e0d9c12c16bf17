"""The study's 18-point grid as a grid study on a CPU budget, selecting on validation.

    python -m resnet_jax.main --config cpu_grid --workdir runs/cpu_grid \
        --config.data.path=data/cifar10-jpeg --workers=2

Batch size {100, 500, 1000} x learning rate {0.1, 0.01, 0.001} x shuffle, Adam,
the study's schedule, 6 epochs on a seeded 3,000-image training subset, with
1,000 other training images held out (balanced over the classes) for
selection. The baseline that configs/cpu_search.py is measured against
(results/search/).
"""

import ml_collections

from resnet_jax.configs import paper_sweep


def get_config() -> ml_collections.ConfigDict:
    config = paper_sweep.get_config()
    config.num_epochs = 6
    config.data.train_subset = 3000
    config.data.validation_size = 1000
    return config
