"""The study's 18-run grid cut to what 2 CPU cores can train in under an hour.

    python -m resnet_jax.main --config cpu_sweep --workdir runs/cpu_sweep \
        --config.data.path=data/cifar10-jpeg

Every cell of configs/paper_sweep.py (batch size x learning rate x shuffle,
Adam, the study's schedule) for 3 epochs on a 5,000-image training subset,
twice (seeds 0 and 1), so each cell is reported as mean ± sd and the shuffle
effect as a paired comparison over seeds. It shows the study's early trends,
not its 50-epoch accuracies; ``results/cpu_sweep/`` holds its report.
"""

import ml_collections

from resnet_jax.configs import paper_sweep


def get_config() -> ml_collections.ConfigDict:
    config = paper_sweep.get_config()
    config.num_epochs = 3
    config.data.train_subset = 5000  # Seeded: each seed draws its own subset.
    config.sweep.repeats = 2
    return config
