"""The study's question answered by a search: TPE with successive halving, CPU budget.

    python -m resnet_jax.main --config cpu_search --workdir runs/cpu_search \
        --config.data.path=data/cifar10-jpeg --workers=2

The space of the study (batch size {100, 500, 1000}, shuffle on or off) with the
learning rate log-uniform in [1e-4, 0.1] instead of three values; the data,
epochs and validation split of configs/cpu_grid.py. 16 trials; successive
halving stops the weaker ones after 1 and 3 epochs (reduction factor 3), so the
search trains a fraction of what the grid trains (results/search/).
"""

import ml_collections

from resnet_jax.configs import default
from resnet_jax.studies import search_space


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.num_epochs = 6
    config.data.train_subset = 3000
    config.data.validation_size = 1000
    config.search = search_space.default_section()
    config.search.space.batch_size = search_space.categorical((100, 500, 1000))
    config.search.space.learning_rate = search_space.float_param(1e-4, 0.1, log=True)
    config.search.space.shuffle = search_space.categorical((True, False))
    config.search.num_trials = 16
    config.search.sampler = 'tpe'
    config.search.startup_trials = 5
    config.search.pruner = 'successive_halving'
    config.search.min_epochs = 1
    config.search.reduction_factor = 3
    config.search.metric = 'val_accuracy'
    return config
