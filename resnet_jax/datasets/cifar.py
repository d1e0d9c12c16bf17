"""The official CIFAR-10 python and binary versions, from folders or their archives.

    dataset = cifar.load_cifar('/data/cifar-10-batches-py')   # or its parent, or the .tar.gz

Registered as the ``'cifar'`` source of :data:`resnet_jax.datasets.loading.SOURCES`.
``path`` is the batches folder, its parent (as torchvision and keras leave it)
or the official ``.tar.gz`` archive, read without unpacking. Pickles are read
with an unpickler that refuses anything but numpy arrays, so a tampered file
cannot run code. Every problem raises :class:`resnet_jax.datasets.loading.DataError`.
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
import tarfile
import zlib
from typing import Any, NamedTuple

import numpy as np

from resnet_jax import validation
from resnet_jax.datasets.base import CIFAR_IMAGE_SIZE, SOURCES, DataError, Dataset

try:
    from numpy._core.multiarray import _reconstruct  # numpy >= 2
except ImportError:
    from numpy.core.multiarray import _reconstruct  # numpy 1

_PIXELS_PER_IMAGE = 3 * CIFAR_IMAGE_SIZE * CIFAR_IMAGE_SIZE  # 3072
_BIN_RECORD_BYTES = 1 + _PIXELS_PER_IMAGE
_TRAIN_BATCHES = tuple(f'data_batch_{i}' for i in range(1, 6))
# Per version: folder in the official archive; its 5 train batches, test batch, class names.
_CIFAR_VERSIONS = {
    'py': ('cifar-10-batches-py', (*_TRAIN_BATCHES, 'test_batch', 'batches.meta')),
    'bin': (
        'cifar-10-batches-bin',
        (*(f'{b}.bin' for b in _TRAIN_BATCHES), 'test_batch.bin', 'batches.meta.txt'),
    ),
}
_CIFAR_ARCHIVES = ('cifar-10-python.tar.gz', 'cifar-10-binary.tar.gz')
_ARCHIVE_SUFFIXES = ('.tar.gz', '.tgz', '.tar')


class _File(NamedTuple):
    """One file of a CIFAR-10 copy: a name for messages, and its bytes."""

    name: str
    data: bytes


def _cifar_dir_version(folder: str) -> str | None:
    """'py' or 'bin' if ``folder`` holds CIFAR-10 batch files, else None."""
    for version, (_, names) in _CIFAR_VERSIONS.items():
        # The first train batch, the test batch or the class names.
        if any(os.path.isfile(os.path.join(folder, n)) for n in (names[0], *names[5:])):
            return version
    return None


def find_cifar(path: str) -> str | None:
    """The CIFAR-10 batches folder or archive at or directly under ``path``."""
    if os.path.isfile(path):
        return path if path.endswith(_ARCHIVE_SUFFIXES) else None
    for folder in [path] + [os.path.join(path, folder) for folder, _ in _CIFAR_VERSIONS.values()]:
        if _cifar_dir_version(folder):
            return folder
    archives = (os.path.join(path, name) for name in _CIFAR_ARCHIVES)
    return next((archive for archive in archives if os.path.isfile(archive)), None)


def _read_cifar(location: str) -> tuple[str, dict[str, _File]]:
    """(version, {base name: file}) of a batches folder, or of an archive read in one pass."""
    files: dict[str, _File] = {}
    if os.path.isdir(location):
        version, where = _cifar_dir_version(location), f'CIFAR-10 folder {location}'
    else:
        where = f'archive {location}'
        folder_versions = {folder: version for version, (folder, _) in _CIFAR_VERSIONS.items()}
        found: dict[str, dict[str, _File]] = {}
        try:
            with tarfile.open(location, 'r|*') as tar:
                for member in tar:
                    folder, name = os.path.split(member.name)
                    version = folder_versions.get(os.path.basename(folder))
                    if member.isfile() and version and name in _CIFAR_VERSIONS[version][1]:
                        file = _File(f'{location}:{member.name}', tar.extractfile(member).read())
                        found.setdefault(version, {})[name] = file
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise DataError(f'cannot read the archive {location}: {e}') from e
        if not found:
            raise DataError(
                f'archive {location} holds no CIFAR-10 batches (expected '
                'members under cifar-10-batches-py/ or cifar-10-batches-bin/)'
            )
        version, files = next(iter(found.items()))
    paths = {n: os.path.join(location, n) for n in _CIFAR_VERSIONS[version][1] if n not in files}
    missing = [n for n, p in paths.items() if not os.path.isfile(p)]
    if missing:
        raise DataError(f'{where} lacks {", ".join(missing)}')
    for name, path in paths.items():  # Only a folder's files are still to read.
        with open(path, 'rb') as f:
            files[name] = _File(path, f.read())
    return version, files


# The only globals a CIFAR-10 pickle needs: those that rebuild numpy arrays.
_PICKLE_GLOBALS = {
    ('numpy.core.multiarray', '_reconstruct'): _reconstruct,  # numpy 1 names.
    ('numpy._core.multiarray', '_reconstruct'): _reconstruct,  # numpy >= 2.
    ('numpy', 'ndarray'): np.ndarray,
    ('numpy', 'dtype'): np.dtype,
    ('_codecs', 'encode'): codecs.encode,  # Python 3 protocol-2 bytes.
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, lists, dicts and scalars, and nothing else."""

    def __init__(self, file: _File):
        super().__init__(io.BytesIO(file.data), encoding='latin1')
        self._name = file.name

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_GLOBALS:
            raise DataError(
                f'refusing to load {self._name}: the pickle references '
                f'{module}.{name}, which CIFAR files never contain'
            )
        return _PICKLE_GLOBALS[module, name]


def _unpickle(file: _File) -> dict[str, Any]:
    """Loads a CIFAR-10 pickle; keys are str whether stored as bytes or str."""
    try:
        obj = _CifarUnpickler(file).load()
    except DataError:
        raise
    except Exception as e:  # Corrupt pickles raise almost any exception type.
        raise DataError(
            f'{file.name} is not a readable CIFAR-10 pickle ({type(e).__name__}: {e})'
        ) from e
    if not isinstance(obj, dict):
        raise DataError(
            f'{file.name} holds a {type(obj).__name__}, not the dict of a CIFAR-10 pickle'
        )
    return {_text(k): v for k, v in obj.items()}


def _text(value: str | bytes) -> str:
    return value.decode('latin1') if isinstance(value, bytes) else value


def _parse_batch(file: _File, version: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(NHWC images, int32 labels) of one batch file of either version."""
    if version == 'py':
        batch = _unpickle(file)
        rows, labels = batch.get('data'), batch.get('labels')
        is_array = isinstance(rows, np.ndarray) and rows.dtype == np.uint8
        if not is_array or rows.shape[1:] != (_PIXELS_PER_IMAGE,):
            raise DataError(
                f'{file.name} has no CIFAR-10 images: its "data" should '
                f'be a uint8 array of shape (n, {_PIXELS_PER_IMAGE})'
            )
        try:  # Ragged or nested lists are not labels.
            labels = np.asarray(labels if isinstance(labels, (list, np.ndarray)) else [])
        except (ValueError, TypeError):
            labels = np.asarray([])
        if (
            labels.ndim != 1
            or len(labels) != len(rows)
            or not np.issubdtype(labels.dtype, np.integer)
        ):
            raise DataError(
                f'{file.name} should have a list of {len(rows)} integer labels, one per image'
            )
    else:
        if not file.data or len(file.data) % _BIN_RECORD_BYTES:
            raise DataError(
                f'{file.name} has {len(file.data)} bytes, not a positive multiple of the '
                f'{_BIN_RECORD_BYTES}-byte CIFAR-10 record (1 label byte + 3072 pixel bytes): '
                'it is truncated or not a CIFAR-10 batch'
            )
        records = np.frombuffer(file.data, np.uint8).reshape(-1, _BIN_RECORD_BYTES)
        rows, labels = records[:, 1:], records[:, 0]
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f'{file.name} has labels in [{labels.min()}, '
            f'{labels.max()}], outside the {num_classes} classes'
        )
    # Rows of R, G, B planes -> NHWC.
    images = rows.reshape(-1, 3, CIFAR_IMAGE_SIZE, CIFAR_IMAGE_SIZE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int32)


def _parse_meta(file: _File, version: str) -> tuple[str, ...]:
    """The class names in a batches.meta (python) or batches.meta.txt (binary)."""
    if version == 'py':
        names = _unpickle(file).get('label_names')
        if not isinstance(names, list) or not names:
            raise DataError(f'{file.name} has no list of label_names')
        return tuple(_text(name) for name in names)
    try:
        lines = file.data.decode('utf-8').splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f'{file.name} is not a text file of class names') from e
    names = tuple(line.strip() for line in lines if line.strip())
    if not names:
        raise DataError(f'{file.name} names no classes')
    return names


def load_cifar(path: str) -> Dataset:
    """Reads the official CIFAR-10 python or binary version at ``path``."""
    location = find_cifar(path)
    if location is None:
        raise DataError(
            f'no CIFAR-10 copy at {path}: expected cifar-10-batches-py/ or '
            'cifar-10-batches-bin/ (or the folder holding one), or its .tar.gz archive'
        )
    version, files = _read_cifar(location)
    *batch_names, meta_name = _CIFAR_VERSIONS[version][1]
    class_names = _parse_meta(files[meta_name], version)
    *train, (test_images, test_labels) = [
        _parse_batch(files[name], version, len(class_names)) for name in batch_names
    ]
    train_images, train_labels = (np.concatenate(arrays) for arrays in zip(*train, strict=True))
    return Dataset(
        train_images, train_labels, test_images, test_labels, class_names, 'cifar', location
    )


@SOURCES.register('cifar', fields={'data.path': validation.PATH_GIVEN})
def _cifar_source(path: str, data_config: Any, image_size: int, seed: int) -> Dataset:
    del data_config, image_size, seed
    return load_cifar(path)
