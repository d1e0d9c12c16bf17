"""``python -m resnet_jax``: the command line (:mod:`resnet_jax.cli.main`)."""

import sys

from resnet_jax.cli.main import main

if __name__ == '__main__':
    sys.exit(main())
