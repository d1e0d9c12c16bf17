"""The default config: every hyperparameter of a run, set to the study's recipe.

    from resnet_jax import config as config_lib
    config = config_lib.get_config()      # what configs/default.py gives

The `paper` ResNet, Adam 0.01, batch 100, shuffled, /3 every 20 epochs, 50
epochs. Every other config starts from this one and changes a few fields; the
command line overrides any field (``--config.learning_rate=0.001``). The
choices of model, optimiser, schedule and data source are the names in their
registries (see :mod:`resnet_jax.registry`).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Every hyperparameter of a run; other configs start from this one."""
    config = ml_collections.ConfigDict()
    _model(config)
    _training(config)
    _optimizer(config)
    _schedule(config)
    config.seed = 0
    _checkpoints(config)
    _distributed(config)
    _data(config)
    return config


def _model(config: ml_collections.ConfigDict) -> None:
    """The network and its computation dtype."""
    # Model: a name in the registry resnet_jax.models.resnet.MODELS ('paper': the
    # study's 3-stage net).
    config.model = 'paper'
    config.num_classes = 10
    config.image_size = 32
    # Computation dtype: 'float32' or 'bfloat16' (parameters stay float32).
    config.dtype = 'float32'


def _training(config: ml_collections.ConfigDict) -> None:
    """Training length, batching and the compiled calls."""
    # Training length and batching.
    config.num_epochs = 50
    config.batch_size = 100
    # True: a fresh permutation every epoch; False: the same fixed order each epoch.
    config.shuffle = True
    # Keep (False) or drop (True) the last partial training batch of an epoch.
    config.drop_remainder = False
    config.eval_batch_size = 1000
    # When the test set is evaluated: 'every_epoch' (the study's recipe: a test
    # curve), 'end' (once, after the last epoch, or when a study's pruner stops
    # the run), or 'auto': 'end' for the trials of a study that selects on a
    # validation metric, 'every_epoch' otherwise.
    config.eval_test = 'auto'
    # Training steps per compiled call (lax.scan on the device; 0: a whole
    # epoch, 1: step by step): fewer dispatches and host syncs. SIGINT/SIGTERM
    # and the NaN checks are seen between calls, so keep a call short enough to
    # wait for (seconds on CPUs, milliseconds on GPUs: BENCHMARKS.md).
    config.steps_per_call = 50


def _optimizer(config: ml_collections.ConfigDict) -> None:
    """The optimiser and the hyperparameters the registered optimisers read."""
    # Optimiser: a name in the registry resnet_jax.training.optim.OPTIMIZERS ('adam': the
    # study's). The fields below are those the registered optimisers read; each
    # optimiser declares its own, and validation checks the chosen one's.
    config.optimizer = 'adam'
    config.learning_rate = 0.01
    config.momentum = 0.9  # sgd
    config.nesterov = False  # sgd
    config.weight_decay = 0.0  # L2 on the gradient; decoupled for adamw
    config.adam_b1 = 0.9
    config.adam_b2 = 0.999
    config.adam_eps = 1e-8
    config.adagrad_initial_accumulator = 0.0  # PyTorch's default
    config.adagrad_eps = 1e-10  # PyTorch's default


def _schedule(config: ml_collections.ConfigDict) -> None:
    """The learning-rate schedule."""
    # Schedule: a name in the registry resnet_jax.training.optim.SCHEDULES ('piecewise':
    # the study's, divide by decay_factor every decay_every_epochs).
    config.schedule = 'piecewise'
    config.decay_every_epochs = 20
    config.decay_factor = 3.0


def _checkpoints(config: ml_collections.ConfigDict) -> None:
    """Checkpoints (orbax), logging and the NaN checks."""
    # Checkpoints (orbax) and logging.
    config.checkpoint_every_epochs = 1
    config.keep_checkpoints = 3
    config.progress_every_seconds = 30.0
    # Check the running loss for NaN/inf every this many steps (0: at epoch ends).
    config.check_finite_every_steps = 50


def _distributed(config: ml_collections.ConfigDict) -> None:
    """Multi-process training (jax.distributed)."""
    # Multi-process training (jax.distributed); see resnet_jax/distributed.py.
    config.distributed = ml_collections.ConfigDict()
    config.distributed.enabled = False
    config.distributed.coordinator_address = ''  # '' = detect (SLURM, ...)
    config.distributed.num_processes = 1
    config.distributed.process_id = 0
    config.distributed.cpu_collectives = 'gloo'  # For CPU devices.


def _data(config: ml_collections.ConfigDict) -> None:
    """Where the images come from, the held-out split and the augmentation."""
    config.data = ml_collections.ConfigDict()
    # 'auto' (detect from path) or a name in the registry
    # resnet_jax.datasets.SOURCES ('cifar': the official python/binary batches,
    # 'folder': split/class/*.png|jpg, 'tfds').
    config.data.source = 'auto'
    config.data.path = ''  # '' with tfds: the default TFDS data dir
    config.data.download = True  # tfds only: download when no local copy
    config.data.train_subset = 0  # >0: a fixed, seeded subset of training images
    # >0: hold out this many training images (balanced over the classes) for model
    # selection; every epoch's record gains val_loss and val_accuracy. They are drawn
    # with validation_seed, not with config.seed: every run of a sweep or search holds
    # out the same images. 0: the study's recipe (train on all, report test).
    config.data.validation_size = 0
    config.data.validation_seed = 0
    # Augmentation (training only): zero-pad then random crop, random flip.
    config.data.pad = 4
    config.data.flip = True
    # The study scales to [0, 1] without normalisation.
    config.data.normalize = False
    config.data.mean = (0.4914, 0.4822, 0.4465)
    config.data.std = (0.2470, 0.2435, 0.2616)
