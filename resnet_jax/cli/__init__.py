"""The command line (``resnet-jax``, ``python -m resnet_jax``) and the benchmark.

Holds :mod:`~resnet_jax.cli.main` (the modes and exit codes),
:mod:`~resnet_jax.cli.flags` (the flags, their parsing and the ``--help`` text),
:mod:`~resnet_jax.cli.config_files` (``--config``: a file or a shipped config's
name) and :mod:`~resnet_jax.cli.bench` (``resnet-jax-bench``). The top layer: may
import every other part; nothing imports it but the entry points.
"""
