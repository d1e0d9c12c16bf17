#!/usr/bin/env bash
# Downloads the pure-Python wheels that a GPU machine without network access may
# lack (clu, ml_collections, tensorboardX) into .whl/ (git-ignored through
# .git/info/exclude), where benchmarks/gpu_check.sh installs them from; copy .whl/
# and data/cifar10-jpeg.tar.gz to that machine with the repository.
# Run on a machine with access to the package registry, from the repo root.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 -d .whl \
    clu==0.0.12 ml_collections==1.1.0 tensorboardX==2.6.5
ls -la .whl
