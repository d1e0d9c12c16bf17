"""CIFAR-10 from disk (or TensorFlow Datasets) into host numpy arrays.

    from resnet_jax import datasets
    data = datasets.load_dataset(config.data, seed=config.seed)
    data.train_images   # (50000, 32, 32, 3) uint8, NHWC
    data.train_labels   # (50000,) int32
    data.class_names    # ('airplane', 'automobile', ...)

``config.data.source`` picks where the images come from:

* ``'cifar'``: the official CIFAR-10 python (``cifar-10-batches-py/``) or binary
  (``cifar-10-batches-bin/``) version. ``data.path`` is the batches folder, its
  parent (as torchvision and keras leave it) or the official ``.tar.gz`` archive,
  read without unpacking. Pickles are read with an unpickler that refuses
  anything but numpy arrays, so a tampered file cannot run code.
* ``'folder'``: ``path/{train,test}/<class>/*.{png,jpg,jpeg}``; classes are the
  sorted subfolder names. Images must be ``data.image_size`` pixels square and
  become 8-bit RGB (see ``_decode_image``). Large folders are decoded in spawned
  processes (a calling script needs the ``if __name__ == '__main__':`` guard),
  then cached as ``.npz`` under ``$RESNET_JAX_CACHE`` (default
  ``~/.cache/resnet_jax``), keyed on the folder's path and its files' names,
  sizes and modification times. Folders store images class by class, so the
  training set is put once into a fixed order drawn from ``seed``.
* ``'tfds'``: TensorFlow Datasets' ``cifar10`` through its ArrayRecord data
  source, without TensorFlow; ``data.path`` is the TFDS data dir ('' for the
  default). An unprepared dataset is downloaded only if ``data.download`` is on,
  the network answers and TensorFlow is installed (tfds needs it to prepare
  cifar10); otherwise a :class:`DataError` says how to point at a local copy.
* ``'auto'``: :func:`detect_source` picks one from ``data.path``.

The training set keeps its stored order (batches 1..5 for CIFAR files, the
seeded order for folders); ``data.train_subset > 0`` keeps a seeded subset in
that order. Every problem with the input raises :class:`DataError` with a
one-sentence message.
"""

from __future__ import annotations

import codecs
import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import io
import json
import logging
import multiprocessing
import os
import pickle
import socket
import tarfile
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import ml_collections
import numpy as np
from PIL import Image

from resnet_jax import validation
from resnet_jax.registry import Registry

try:
    from numpy._core.multiarray import _reconstruct  # numpy >= 2
except ImportError:
    from numpy.core.multiarray import _reconstruct  # numpy 1

logger = logging.getLogger('resnet_jax')

# Data sources by name: ``load(path, data_config, image_size, seed) -> Dataset``,
# registered beside each reader; 'auto' picks one (:func:`detect_source`).
SOURCES: Registry[Callable[[str, Any, int, int], Dataset]] = Registry('data source')
CIFAR_IMAGE_SIZE = 32

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
_IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg')
_DECODE_CHUNK = 1000  # Images per decoding task; fewer decode in-process.
_MAX_DECODE_PROCESSES = 32
_CACHE_FORMAT = 2  # Bump when the cached arrays change meaning.
_TFDS_NAME = 'cifar10'
_DOWNLOAD_HOST = ('www.cs.toronto.edu', 443)  # Where tfds fetches cifar10.
_NETWORK_TIMEOUT_S = 3.0
_EXPECTED_LAYOUTS = (
    'a CIFAR-10 copy (cifar-10-batches-py/ or cifar-10-batches-bin/, or their .tar.gz '
    'archives), an image folder with train/<class>/ and test/<class>/, or a TensorFlow '
    'Datasets data dir holding cifar10/'
)


class DataError(ValueError):
    """Bad or missing dataset input; the message is one sentence for the user."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A whole dataset in host memory (images NHWC uint8, labels int32).

    Images are 32x32 except from an image folder of another data.image_size.
    """

    train_images: np.ndarray  # (N, 32, 32, 3) uint8
    train_labels: np.ndarray  # (N,) int32
    test_images: np.ndarray  # (M, 32, 32, 3) uint8
    test_labels: np.ndarray  # (M,) int32
    class_names: tuple[str, ...]
    source: str  # 'tfds' | 'cifar' | 'folder'
    path: str  # Where it was read from ('' for tfds default dir).
    # Training images held out for model selection (config.data.validation_size).
    validation_images: np.ndarray | None = None  # (V, 32, 32, 3) uint8
    validation_labels: np.ndarray | None = None  # (V,) int32

    def __post_init__(self):
        n = self.num_classes
        if self.validation_images is None:
            shape = (0, *self.train_images.shape[1:])
            object.__setattr__(self, 'validation_images', np.zeros(shape, np.uint8))
            object.__setattr__(self, 'validation_labels', np.zeros((0,), np.int32))
        for split in ('train', 'test', 'validation'):
            images, labels = getattr(self, f'{split}_images'), getattr(self, f'{split}_labels')
            shape = images.shape
            if images.dtype != np.uint8 or len(shape) != 4 or shape[2:] != (shape[1], 3):
                raise DataError(
                    f'{split} images must be uint8 of shape (n, s, s, 3), '
                    f'not {images.dtype} {shape}'
                )
            if labels.dtype != np.int32 or labels.shape != shape[:1]:
                raise DataError(
                    f'{split} labels must be int32 of shape {shape[:1]}, '
                    f'not {labels.dtype} {labels.shape}'
                )
            if labels.size and (labels.min() < 0 or labels.max() >= n):
                raise DataError(
                    f'{split} labels must lie in [0, {n}) for {n} classes, but range over '
                    f'[{labels.min()}, {labels.max()}]'
                )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def detect_source(path: str) -> str:
    """Returns the source ('cifar' | 'folder' | 'tfds') of what lies at ``path``.

    '' is the default TFDS data dir. Raises DataError when ``path`` does not
    exist, cannot be read, or holds none of the known layouts.
    """
    if not path:
        return 'tfds'
    path = os.path.expanduser(path)
    with _os_errors_as_data_errors():
        if not os.path.exists(path):
            raise DataError(f'data path does not exist: {path}')
        if os.path.isdir(path) and not os.listdir(path):
            raise DataError(f'data path {path} is an empty folder; expected {_EXPECTED_LAYOUTS}')
        if _find_cifar(path):
            return 'cifar'
        if all(os.path.isdir(os.path.join(path, s)) for s in ('train', 'test')):
            return 'folder'
        if os.path.isdir(os.path.join(path, _TFDS_NAME)):
            return 'tfds'
    raise DataError(
        f'data path {path} holds no dataset this project reads; expected {_EXPECTED_LAYOUTS}'
    )


def load_dataset(data_config: Any, seed: int) -> Dataset:
    """Loads the dataset ``data_config`` (``config.data``) describes.

    ``data_config`` has ``source`` ('auto' | 'tfds' | 'cifar' | 'folder'),
    ``path`` ('' = default), ``train_subset`` (0 = all), ``image_size`` (image
    folders; default 32) and ``download`` (tfds; default True). ``seed`` seeds
    the image-folder training order and the training subset. Raises DataError
    when the input is missing, unreadable or malformed.
    """
    start = time.perf_counter()
    source = data_config.source
    path = os.path.expanduser(data_config.path)
    image_size = getattr(data_config, 'image_size', CIFAR_IMAGE_SIZE)
    with _os_errors_as_data_errors():
        if source == 'auto':
            source = detect_source(path)
        if source not in SOURCES:
            raise DataError(
                f"data.source must be 'auto' or one of {SOURCES.names()}, not {source!r}"
            )
        if source != 'folder' and image_size != CIFAR_IMAGE_SIZE:
            raise DataError(
                f'data.image_size={image_size} needs an image folder: '
                f'{source} images are {CIFAR_IMAGE_SIZE}x{CIFAR_IMAGE_SIZE}'
            )
        if 'data.path' in SOURCES.fields(source) and not path:
            raise DataError(f'data.source={source} needs data.path')
        dataset = SOURCES.get(source)(path, data_config, image_size, seed)
    dataset = hold_out_validation(
        dataset,
        getattr(data_config, 'validation_size', 0),
        getattr(data_config, 'validation_seed', 0),
    )
    if dataset.source == 'folder':  # Folders hold images class by class: a seeded order.
        order = np.random.default_rng(seed).permutation(len(dataset.train_labels))
        dataset = dataclasses.replace(
            dataset, train_images=dataset.train_images[order], train_labels=dataset.train_labels[order]
        )
    size, n = data_config.train_subset, len(dataset.train_labels)
    if size:  # A seeded subset, kept in stored order.
        if not 0 < size <= n:
            raise DataError(
                f'data.train_subset={size} must lie in [0, {n}], the size of the training set'
            )
        keep = np.sort(np.random.default_rng(seed).choice(n, size, replace=False))
        images, labels = dataset.train_images[keep], dataset.train_labels[keep]
        dataset = dataclasses.replace(dataset, train_images=images, train_labels=labels)
    if len(dataset.validation_labels):
        logger.info('Held out %d training images for validation.', len(dataset.validation_labels))
    logger.info(
        'Loaded %d train + %d test images of %d classes (%s: %s) in %.1f s.',
        len(dataset.train_labels),
        len(dataset.test_labels),
        dataset.num_classes,
        dataset.source,
        dataset.path or 'default TFDS data dir',
        time.perf_counter() - start,
    )
    return dataset


def validation_indices(labels: np.ndarray, size: int, seed: int, num_classes: int) -> np.ndarray:
    """Sorted indices of ``size`` images balanced over the classes, drawn with ``seed``.

    Every class gives ``size // num_classes`` images, the first ``size %
    num_classes`` classes one more. The draw depends only on the labels, the
    size and the seed: every run of a study (whatever its own seed) holds out
    the same images.
    """
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(num_classes):
        want = size // num_classes + (1 if c < size % num_classes else 0)
        members = np.flatnonzero(labels == c)
        if want > len(members):
            raise DataError(
                f'data.validation_size={size} needs {want} images of class {c}, but the '
                f'training set has {len(members)}'
            )
        chosen.append(rng.choice(members, want, replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros((0,), np.int64)


def hold_out_validation(dataset: Dataset, size: int, seed: int) -> Dataset:
    """``dataset`` with ``size`` training images moved to its validation split.

    Balanced over the classes and seeded by ``seed`` (``config.data.validation_seed``)
    alone (:func:`validation_indices`); the training images keep their order.
    """
    n = len(dataset.train_labels)
    if not size:
        return dataset
    if not 0 < size < n:
        raise DataError(
            f'data.validation_size={size} must lie in [0, {n}), below the size of the '
            'training set'
        )
    held = validation_indices(dataset.train_labels, size, seed, dataset.num_classes)
    keep = np.ones(n, bool)
    keep[held] = False
    return dataclasses.replace(
        dataset,
        train_images=dataset.train_images[keep],
        train_labels=dataset.train_labels[keep],
        validation_images=dataset.train_images[held],
        validation_labels=dataset.train_labels[held],
    )


def load_for_config(config: Any) -> Dataset:
    """A run config's dataset (``config.data``, ``image_size``, ``seed``).

    The last dataset loaded is kept and reused: the runs of a sweep load it once.
    """
    data = dict(json.loads(config.data.to_json()), image_size=config.image_size)
    return _load_cached(json.dumps(data, sort_keys=True), config.seed)


@functools.lru_cache(maxsize=1)
def _load_cached(data_json: str, seed: int) -> Dataset:
    return load_dataset(ml_collections.ConfigDict(json.loads(data_json)), seed)


@contextlib.contextmanager
def _os_errors_as_data_errors() -> Iterator[None]:
    """Turns file-system errors (permissions, vanished files) into DataError."""
    try:
        yield
    except OSError as e:
        where = f' {e.filename}' if e.filename else ''
        raise DataError(f'cannot read{where}: {e.strerror or e}') from e


# ------------------------------------------------------------------ cifar ----


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


def _find_cifar(path: str) -> str | None:
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


def _load_cifar(path: str) -> Dataset:
    """Reads the official CIFAR-10 python or binary version at ``path``."""
    location = _find_cifar(path)
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
    return _load_cifar(path)


# ----------------------------------------------------------------- folder ----


class _ImageFile(NamedTuple):
    """One image of an image folder, with what the cache key needs."""

    path: str
    label: int
    size: int
    mtime_ns: int


def _list_split(folder: str, class_names: list[str]) -> list[_ImageFile]:
    """The images of a split, class by class, sorted by name (hidden files skipped)."""
    files = []
    for label, name in enumerate(class_names):
        count = len(files)
        for entry in sorted(os.scandir(os.path.join(folder, name)), key=lambda e: e.name):
            if entry.name.startswith('.'):
                continue
            if not entry.name.lower().endswith(_IMAGE_SUFFIXES):
                raise DataError(
                    f'{entry.path} is not a .png, .jpg or .jpeg image; '
                    'class folders may hold only images'
                )
            stat = entry.stat()
            files.append(_ImageFile(entry.path, label, stat.st_size, stat.st_mtime_ns))
        if len(files) == count:
            raise DataError(f'class folder {os.path.join(folder, name)} holds no images')
    return files


def _list_image_folder(root: str) -> tuple[tuple[str, ...], dict[str, list[_ImageFile]]]:
    """(class names, {'train': files, 'test': files}) of an image folder."""
    classes = {}
    for split in ('train', 'test'):
        folder = os.path.join(root, split)
        if not os.path.isdir(folder):
            raise DataError(
                f'image folder {root} has no {split}/ subfolder '
                f'(expected {split}/<class>/<image>.png)'
            )
        classes[split] = sorted(
            e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith('.')
        )
        if not classes[split]:
            raise DataError(f'{folder} has no class subfolders')
    train, test = classes['train'], classes['test']
    if train != test:
        raise DataError(
            f'train/ and test/ of {root} hold different classes (only in train: '
            f'{sorted(set(train) - set(test))}, only in test: {sorted(set(test) - set(train))})'
        )
    return tuple(train), {split: _list_split(os.path.join(root, split), train) for split in classes}


def _decode_image(path: str, image_size: int) -> np.ndarray:
    """Decodes one image to (image_size, image_size, 3) uint8 RGB.

    Grayscale is repeated over the three channels, palette images are expanded,
    the alpha channel of RGBA/LA is dropped (not composited), and 16-bit
    grayscale is scaled to 8 bits (PIL's own conversion would clip it to nearly
    white). 32-bit integer and float images are refused: their range is unknown.
    """
    try:
        with Image.open(path) as image:
            if image.size != (image_size, image_size):
                raise DataError(
                    f'{path} is {image.size[0]}x{image.size[1]} pixels, '
                    f'not {image_size}x{image_size} (data.image_size)'
                )
            if image.mode.startswith('I;16'):
                wide = np.asarray(image).astype(np.uint32)
                gray = ((wide * 255 + 32767) // 65535).astype(np.uint8)
                return np.repeat(gray[..., None], 3, axis=-1)
            if image.mode in ('I', 'F'):
                raise DataError(
                    f'{path} has 32-bit {"float" if image.mode == "F" else "integer"} pixels '
                    f'(mode {image.mode}); convert it to 8-bit RGB or grayscale'
                )
            return np.asarray(image.convert('RGB'))
    except DataError:
        raise
    except Exception as e:  # PIL raises many types for broken files.
        raise DataError(f'{path} is not a readable image ({e})') from e


def _decode_chunk(paths: list[str], image_size: int) -> np.ndarray:
    return np.stack([_decode_image(path, image_size) for path in paths])


def _decode_images(files: list[_ImageFile], image_size: int) -> np.ndarray:
    """Decodes ``files``, in parallel processes when there are many.

    Processes, not threads: opening a small JPEG is mostly Python code that
    holds the GIL, and threads measured slower than a single one. They are
    spawned, not forked: forking a process that runs JAX can deadlock.
    """
    paths = [f.path for f in files]
    chunks = [paths[i : i + _DECODE_CHUNK] for i in range(0, len(paths), _DECODE_CHUNK)]
    decode = functools.partial(_decode_chunk, image_size=image_size)
    workers = min(len(chunks), os.cpu_count() or 1, _MAX_DECODE_PROCESSES)
    if workers <= 1:
        return np.concatenate([decode(chunk) for chunk in chunks])
    pool = concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context('spawn'), initializer=_die_with_parent
    )
    try:
        return np.concatenate(list(pool.map(decode, chunks)))
    except concurrent.futures.process.BrokenProcessPool as e:
        raise DataError(
            'the image-decoding processes died: out of memory, or load_dataset was called '
            "from a script without an if __name__ == '__main__': guard"
        ) from e
    except BaseException:  # A signal, an error: stop the workers now, not after their chunks.
        for process in list((getattr(pool, '_processes', None) or {}).values()):
            with contextlib.suppress(Exception):
                process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        pool.shutdown(cancel_futures=True)


def _die_with_parent() -> None:
    """Makes a decoding worker die with the process that started it (Linux), even
    when that one is killed outright."""
    with contextlib.suppress(Exception):
        import ctypes  # pylint: disable=g-import-not-at-top

        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, 9)  # SIGKILL


def _read_cache(path: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The cached images at ``path``, or {} if absent, unreadable or stale."""
    if not os.path.isfile(path):
        return {}
    try:
        with np.load(path, allow_pickle=False) as cached:
            arrays = {split: cached[split] for split in shapes}
    except Exception as e:  # A damaged .npz raises many types; decode again.
        logger.warning('Ignoring the unreadable image cache %s: %s', path, e)
        return {}
    if any(arrays[s].shape != shapes[s] or arrays[s].dtype != np.uint8 for s in shapes):
        logger.warning('Ignoring the image cache %s: unexpected arrays.', path)
        return {}
    return arrays


def _write_cache(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Saves decoded images atomically; failure only costs a warning."""
    tmp = f'{path}.{os.getpid()}.tmp'
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, 'wb') as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError as e:
        logger.warning(
            'Could not write the image cache %s (%s); the images will be decoded again next time.',
            path,
            e,
        )
        with contextlib.suppress(OSError):
            os.remove(tmp)


def _load_folder(path: str, image_size: int) -> Dataset:
    """Reads an image folder, through the decoded-image cache when it is valid."""
    root = os.path.abspath(path)
    if not os.path.isdir(root):
        raise DataError(f'no image folder at {root}')
    class_names, files = _list_image_folder(root)
    shapes = {split: (len(files[split]), image_size, image_size, 3) for split in files}
    # The cache is keyed on this exact folder content.
    key = hashlib.sha256(f'{_CACHE_FORMAT}\0{root}\0{image_size}\n'.encode())
    for split in ('train', 'test'):
        for f in files[split]:
            key.update(f'{split}\0{f.path}\0{f.size}\0{f.mtime_ns}\n'.encode())
    cache_dir = os.environ.get('RESNET_JAX_CACHE') or os.path.join(
        os.path.expanduser('~'), '.cache', 'resnet_jax'
    )
    cache = os.path.join(cache_dir, f'image-folder-{key.hexdigest()[:32]}.npz')
    images = _read_cache(cache, shapes)
    if images:
        logger.info('Read decoded images of %s from the cache %s.', root, cache)
    else:
        start = time.perf_counter()
        decoded = _decode_images(files['train'] + files['test'], image_size)
        num_train = len(files['train'])
        images = {'train': decoded[:num_train], 'test': decoded[num_train:]}
        logger.info(
            'Decoded %d images of %s in %.1f s; caching them in %s.',
            len(decoded),
            root,
            time.perf_counter() - start,
            cache,
        )
        _write_cache(cache, images)
    labels = {split: np.array([f.label for f in files[split]], np.int32) for split in files}
    # In the folder's own order (class by class): load_dataset orders it by the seed
    # after holding out the validation images, which must not depend on that seed.
    train = (images['train'], labels['train'])
    return Dataset(*train, images['test'], labels['test'], class_names, 'folder', path)


@SOURCES.register('folder', fields={'data.path': validation.PATH_GIVEN})
def _folder_source(path: str, data_config: Any, image_size: int, seed: int) -> Dataset:
    del data_config
    return _load_folder(path, image_size)


# ------------------------------------------------------------------- tfds ----


def _network_available() -> bool:
    """Whether the CIFAR-10 download host answers within a few seconds."""
    try:
        with socket.create_connection(_DOWNLOAD_HOST, timeout=_NETWORK_TIMEOUT_S):
            return True
    except OSError:
        return False


def _tensorflow_available() -> bool:
    return importlib.util.find_spec('tensorflow') is not None


def _read_data_source(source: Any) -> tuple[np.ndarray, np.ndarray]:
    """Reads every example of a tfds data source into (images, labels)."""
    images = np.empty((len(source), CIFAR_IMAGE_SIZE, CIFAR_IMAGE_SIZE, 3), np.uint8)
    labels = np.empty(len(source), np.int32)
    for i in range(len(source)):
        example = source[i]
        images[i], labels[i] = example['image'], example['label']
    return images, labels


def _load_tfds_checked(data_dir: str, download: bool) -> Dataset:
    """:func:`_load_tfds`, with whatever a damaged data dir raises (garbage
    ``dataset_info.json`` or shards) as a :class:`DataError` naming it."""
    try:
        return _load_tfds(data_dir, download)
    except DataError:
        raise
    except Exception as e:  # pylint: disable=broad-except  # tfds and its readers raise many.
        where = data_dir or 'the default TFDS data dir'
        reason = ' '.join(str(e).split())
        raise DataError(
            f'cannot read TFDS cifar10 at {where}: {type(e).__name__}: {reason[:300]}'
        ) from e


def _load_tfds(data_dir: str, download: bool) -> Dataset:
    """Reads TFDS cifar10 from ``data_dir`` ('' = default), TensorFlow-free.

    Reading comes first, so a prepared (or mocked) dataset never touches the
    network; only when nothing is prepared is a download considered.
    """
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    builder = tfds.builder(_TFDS_NAME, data_dir=data_dir or None)
    where = builder.data_dir
    try:
        sources = builder.as_data_source(split=['train', 'test'])
    except (NotImplementedError, ValueError):  # Not prepared, or prepared as TFRecord.
        sources = None
    if sources is None and builder.is_prepared():  # TFRecord: only TensorFlow reads it.
        if not _tensorflow_available():
            raise DataError(
                f'{where} holds cifar10 as TFRecord files, which need TensorFlow to read: pip '
                'install tensorflow-cpu, or prepare it again in ArrayRecord format (delete '
                'that folder and rerun with data.download on)'
            )
        splits = tfds.as_numpy(builder.as_dataset(split=['train', 'test'], batch_size=-1))
        splits = [(s['image'], s['label'].astype(np.int32)) for s in splits]
    else:
        if sources is None:  # Prepare it as ArrayRecord, if allowed and possible.
            problem = (
                'data.download is off'
                if not download
                else 'there is no network to download it'
                if not _network_available()
                else 'preparing it needs TensorFlow (pip install tensorflow-cpu)'
                if not _tensorflow_available()
                else None
            )
            if problem:
                raise DataError(
                    f'TFDS cifar10 is not prepared at {where} and {problem}; point at a local '
                    'copy instead: --config.data.source=cifar --config.data.path=/path/to/'
                    'cifar-10-batches-py, --config.data.path=/path/to/tfds_data_dir (holding '
                    'cifar10/), or --config.data.source=folder --config.data.path=/path/to/'
                    'images (train/<class>/*.png and test/<class>/*.png)'
                )
            logger.info('Downloading and preparing TFDS cifar10 at %s.', where)
            builder = tfds.builder(
                _TFDS_NAME, data_dir=builder.data_dir_root, file_format='array_record'
            )
            builder.download_and_prepare()
            sources = builder.as_data_source(split=['train', 'test'])
        try:
            splits = [_read_data_source(s) for s in sources]
        except Exception as e:  # Garbage shards raise whatever their reader raises.
            raise DataError(
                f'cannot read TFDS cifar10 at {where}: {type(e).__name__}: '
                f'{" ".join(str(e).split())[:200]}'
            ) from e
    (train, test), class_names = splits, tuple(builder.info.features['label'].names)
    return Dataset(*train, *test, class_names, 'tfds', data_dir)


@SOURCES.register('tfds')
def _tfds_source(path: str, data_config: Any, image_size: int, seed: int) -> Dataset:
    del image_size, seed
    return _load_tfds_checked(path, getattr(data_config, 'download', True))
