"""The study's 18-run grid: batch size x learning rate x batch shuffle, Adam, 50 epochs.

    python -m resnet_jax.main --config paper_sweep --workdir runs/paper \
        --config.data.path=data/cifar10-jpeg

Each run trains configs/default.py with its overrides into
runs/paper/<batch_size=...,learning_rate=...,shuffle=...>/; the report
(results.md, results.csv, comparison with the study's table, curves.png,
heatmap.png) is written into runs/paper/ at the end. The study's best: 89.12%
test accuracy at batch 500, lr 0.01, no shuffle (on the original CIFAR-10).
"""

import ml_collections

from resnet_jax.configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.sweep = ml_collections.ConfigDict()
    config.sweep.batch_size = (100, 500, 1000)
    config.sweep.learning_rate = (0.1, 0.01, 0.001)
    config.sweep.shuffle = (True, False)
    # Seeds as statistics: --config.sweep.repeats=3 runs every point with seeds
    # 0, 1, 2 and reports each as mean ± sd with a 95% interval (README, "Seeds
    # as statistics"). None: one run per point, named without a seed.
    config.sweep.repeats = ml_collections.config_dict.placeholder(int)
    # True: the 6 runs of each batch size train together as one vmapped program
    # (resnet_jax/loop.py); meant for accelerators: slower than separate
    # runs on CPUs, whose grouped convolutions are slow (BENCHMARKS.md).
    config.sweep.vectorize = False
    return config
