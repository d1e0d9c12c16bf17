"""The command line, as ``python -m resnet_jax.main`` (also ``python -m resnet_jax``
and the ``resnet-jax`` script): see :mod:`resnet_jax.cli.main`."""

import sys

from resnet_jax.cli.main import main

if __name__ == '__main__':
    sys.exit(main())
