"""The command line (``resnet-jax``, ``python -m resnet_jax``) and the benchmark.

Holds :mod:`~resnet_jax.cli.main` (flags, modes, exit codes) and
:mod:`~resnet_jax.cli.bench`. The top layer: may import every other part;
nothing imports it but the entry points.
"""
