#!/usr/bin/env bash
# Downloads the pure-Python wheels that the GPU machine's image lacks (clu,
# ml_collections, tensorboardX) into .whl/ (git-ignored through
# .git/info/exclude), for `run(..., carry=['.whl', 'data/cifar10-jpeg.tar.gz'])`.
# Run on a machine with access to the package registry, from the repo root.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 -d .whl \
    clu==0.0.12 ml_collections==1.1.0 tensorboardX==2.6.5
mkdir -p data
cp -n ../shared/data/cifar10-jpeg.tar.gz data/ 2>/dev/null || true
ls -la .whl data/cifar10-jpeg.tar.gz
