"""The study's configs, shipped with the package as ``resnet_jax.configs``.

Each module's ``get_config()`` returns a config; run one by name
(``resnet-jax --config paper_sweep --workdir runs/paper``) or build on one in a
config file of your own (``from resnet_jax.configs import default``).
"""
