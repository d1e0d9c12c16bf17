"""Writers of small fake CIFAR-10 datasets in the exact on-disk formats.

Every writer returns a :class:`FakeCifar` holding the arrays a correct loader
must produce, in stored order, so tests can assert pixel equality::

    from tests.fake_data import write_cifar_py, write_image_folder
    fake = write_cifar_py(tmp_path, n_train_per_batch=20, n_test=50)
    # tmp_path/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    fake = write_image_folder(tmp_path / 'images', n_train_per_class=10)
    # tmp_path/images/{train,test}/<class>/NNNN.png

Training image 0 is always :func:`probe_image`, whose R, G and B planes
differ, so a wrong planar-to-NHWC conversion cannot go unnoticed.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import tarfile

import numpy as np
from PIL import Image

CLASS_NAMES = (
    'airplane',
    'automobile',
    'bird',
    'cat',
    'deer',
    'dog',
    'frog',
    'horse',
    'ship',
    'truck',
)
NUM_TRAIN_BATCHES = 5
PY_DIR = 'cifar-10-batches-py'
BIN_DIR = 'cifar-10-batches-bin'


@dataclasses.dataclass(frozen=True)
class FakeCifar:
    """What a loader must return for a fake dataset (stored order, NHWC)."""

    path: str  # The batches folder or image folder that was written.
    train_images: np.ndarray  # (N, S, S, 3) uint8
    train_labels: np.ndarray  # (N,) int32
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...] = CLASS_NAMES


def probe_image(size: int = 32) -> np.ndarray:
    """A (size, size, 3) uint8 image: R = 8y, G = 8x, B = 255 - 4(x + y)."""
    y, x = np.mgrid[:size, :size]
    planes = (8 * y, 8 * x, 255 - 4 * (x + y))
    return np.stack([p % 256 for p in planes], axis=-1).astype(np.uint8)


def to_planar(images: np.ndarray) -> np.ndarray:
    """NHWC uint8 -> (N, 3072) rows of 1024 R, then 1024 G, then 1024 B."""
    planar = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    return planar.reshape(len(images), -1)


def _fake_arrays(
    n_train: int, n_test: int, seed: int, learnable: bool = False
) -> tuple[np.ndarray, ...]:
    """Random CIFAR-shaped train and test sets; training image 0 is the probe.

    ``learnable``: an image's brightness tells its class (noise on top), so a
    model learns it in an epoch or two and the learning rate matters.
    """
    rng = np.random.default_rng(seed)
    arrays = []
    for n in (n_train, n_test):
        if learnable:
            labels = rng.integers(0, len(CLASS_NAMES), n).astype(np.int32)
            noise = rng.integers(0, 20, (n, 32, 32, 3))
            arrays += [(labels[:, None, None, None] * 25 + noise).astype(np.uint8), labels]
        else:
            arrays.append(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))
            arrays.append(rng.integers(0, len(CLASS_NAMES), n).astype(np.int32))
    if not learnable:
        arrays[0][0] = probe_image()
    return tuple(arrays)


class _Python2Pickler(pickle._Pickler):  # pylint: disable=protected-access
    """Writes protocol-2 pickles the way Python 2's cPickle wrote CIFAR-10.

    Python 2 had one 8-bit ``str`` type, pickled as (SHORT_)BINSTRING opcodes
    that load as ``str`` under ``encoding='latin1'``, and numpy's reconstructor
    lived in ``numpy.core.multiarray``.
    """

    dispatch = dict(pickle._Pickler.dispatch)  # pylint: disable=protected-access

    def save_py2_str(self, obj: str | bytes) -> None:
        data = obj.encode('latin1') if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + len(data).to_bytes(4, 'little') + data)
        self.memoize(obj)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None):
        module = obj.__module__.replace('numpy._core', 'numpy.core')
        name = name or obj.__qualname__
        self.write(pickle.GLOBAL + f'{module}\n{name}\n'.encode('ascii'))
        self.memoize(obj)


def _dump_pickle(obj: dict, path: str, style: str) -> None:
    """Writes a CIFAR pickle; style is 'py2', 'bytes_keys' or 'str_keys'."""
    if style == 'bytes_keys':
        obj = {key.encode('ascii'): value for key, value in obj.items()}
    elif style not in ('py2', 'str_keys'):
        raise ValueError(f'unknown pickle style {style!r}')
    with open(path, 'wb') as f:
        if style == 'py2':
            _Python2Pickler(f, protocol=2).dump(obj)
        else:
            pickle.dump(obj, f, protocol=2)


def _batch_dict(batch_label: str, images: np.ndarray, labels: np.ndarray, first_index: int) -> dict:
    return {
        'batch_label': batch_label,
        'labels': [int(y) for y in labels],
        'data': to_planar(images),
        'filenames': [f'fake_s_{first_index + i:06d}.png' for i in range(len(images))],
    }


def _batch_slices(n_per_batch: int) -> list[slice]:
    return [slice(i * n_per_batch, (i + 1) * n_per_batch) for i in range(NUM_TRAIN_BATCHES)]


def write_cifar_py(
    root: str | os.PathLike,
    n_train_per_batch: int = 20,
    n_test: int = 50,
    seed: int = 0,
    style: str = 'py2',
    learnable: bool = False,
) -> FakeCifar:
    """Writes root/cifar-10-batches-py/ like the official python version.

    Args:
      root: parent folder (created if needed).
      n_train_per_batch: images in each of data_batch_1..5.
      n_test: images in test_batch.
      seed: seed of the random pixels and labels.
      style: 'py2' (Python 2 cPickle opcodes, like the real files),
        'bytes_keys' or 'str_keys' (Python 3 ``pickle.dump``, protocol 2).
      learnable: images whose brightness tells the class (see ``_fake_arrays``).
    """
    out = os.path.join(root, PY_DIR)
    os.makedirs(out, exist_ok=True)
    arrays = _fake_arrays(NUM_TRAIN_BATCHES * n_train_per_batch, n_test, seed, learnable)
    train_images, train_labels, test_images, test_labels = arrays
    for i, part in enumerate(_batch_slices(n_train_per_batch), start=1):
        batch = _batch_dict(
            f'training batch {i} of 5', train_images[part], train_labels[part], part.start
        )
        _dump_pickle(batch, os.path.join(out, f'data_batch_{i}'), style)
    batch = _batch_dict('testing batch 1 of 1', test_images, test_labels, 0)
    _dump_pickle(batch, os.path.join(out, 'test_batch'), style)
    meta = {
        'num_cases_per_batch': n_train_per_batch,
        'label_names': list(CLASS_NAMES),
        'num_vis': 3072,
    }
    _dump_pickle(meta, os.path.join(out, 'batches.meta'), style)
    return FakeCifar(out, *arrays)


def bin_records(images: np.ndarray, labels: np.ndarray) -> bytes:
    """CIFAR-10 binary records: 1 label byte + 3072 planar image bytes each."""
    label_bytes = labels.astype(np.uint8)[:, None]
    return np.concatenate([label_bytes, to_planar(images)], axis=1).tobytes()


def write_cifar_bin(
    root: str | os.PathLike, n_train_per_batch: int = 20, n_test: int = 50, seed: int = 0
) -> FakeCifar:
    """Writes root/cifar-10-batches-bin/ like the official binary version."""
    out = os.path.join(root, BIN_DIR)
    os.makedirs(out, exist_ok=True)
    arrays = _fake_arrays(NUM_TRAIN_BATCHES * n_train_per_batch, n_test, seed)
    train_images, train_labels, test_images, test_labels = arrays
    for i, part in enumerate(_batch_slices(n_train_per_batch), start=1):
        with open(os.path.join(out, f'data_batch_{i}.bin'), 'wb') as f:
            f.write(bin_records(train_images[part], train_labels[part]))
    with open(os.path.join(out, 'test_batch.bin'), 'wb') as f:
        f.write(bin_records(test_images, test_labels))
    with open(os.path.join(out, 'batches.meta.txt'), 'w') as f:
        f.write('\n'.join(CLASS_NAMES) + '\n\n')
    return FakeCifar(out, *arrays)


def write_cifar_archive(
    root: str | os.PathLike, version: str = 'py', **kwargs
) -> tuple[str, FakeCifar]:
    """Writes root/cifar-10-python.tar.gz (or cifar-10-binary.tar.gz for 'bin').

    The batches folder is written under root/src/ and packed with its own name
    as the archive's top level, as in the official archives. Keyword arguments
    go to the writer of that version.

    Returns:
      (path of the archive, expected arrays).
    """
    writer, name = {
        'py': (write_cifar_py, 'cifar-10-python.tar.gz'),
        'bin': (write_cifar_bin, 'cifar-10-binary.tar.gz'),
    }[version]
    fake = writer(os.path.join(root, 'src'), **kwargs)
    archive = os.path.join(root, name)
    with tarfile.open(archive, 'w:gz', compresslevel=1) as tar:
        tar.add(fake.path, arcname=os.path.basename(fake.path))
    return archive, fake


def write_image_folder(
    root: str | os.PathLike,
    n_train_per_class: int = 10,
    n_test_per_class: int = 5,
    seed: int = 0,
    class_names: tuple[str, ...] = CLASS_NAMES,
    size: int = 32,
) -> FakeCifar:
    """Writes root/{train,test}/<class>/NNNN.png as lossless PNG images.

    The expected arrays are in stored order: class by class (classes sorted by
    name), files sorted by name within a class; training image 0 is
    :func:`probe_image`. 10 classes x (10 + 5) images take about 0.1 s.
    """
    classes = tuple(sorted(class_names))
    rng = np.random.default_rng(seed)
    arrays = []
    for split, per_class in (('train', n_train_per_class), ('test', n_test_per_class)):
        images = rng.integers(0, 256, (per_class * len(classes), size, size, 3), dtype=np.uint8)
        if split == 'train':
            images[0] = probe_image(size)
        labels = np.repeat(np.arange(len(classes), dtype=np.int32), per_class)
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            class_dir = os.path.join(root, split, classes[label])
            os.makedirs(class_dir, exist_ok=True)
            Image.fromarray(image).save(
                os.path.join(class_dir, f'{i % per_class:04d}.png'), compress_level=1
            )
        arrays += [images, labels]
    return FakeCifar(os.fspath(root), *arrays, class_names=classes)
