"""Dataset loading: every source and layout, pixel-exact; every DataError."""

import logging
import os
import pickle
import tarfile
import time

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from resnet_jax import datasets
from resnet_jax.datasets import DataError, image_folder, tfds_source
from tests import fake_data


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Decoded-image caches go to this test's tmp_path, never ~/.cache."""
    monkeypatch.setenv('RESNET_JAX_CACHE', str(tmp_path / 'cache'))


def _config(path='', source='auto', train_subset=0, **extra):
    config = ml_collections.ConfigDict(
        dict(source=source, path=str(path), train_subset=train_subset, download=False)
    )
    config.update(extra)
    return config


def _load(path='', seed=0, **kwargs):
    return datasets.load_dataset(_config(path, **kwargs), seed)


def _assert_same(dataset, fake):
    np.testing.assert_array_equal(dataset.train_images, fake.train_images)
    np.testing.assert_array_equal(dataset.train_labels, fake.train_labels)
    np.testing.assert_array_equal(dataset.test_images, fake.test_images)
    np.testing.assert_array_equal(dataset.test_labels, fake.test_labels)
    assert dataset.class_names == fake.class_names
    assert dataset.train_images.dtype == np.uint8
    assert dataset.train_labels.dtype == dataset.test_labels.dtype == np.int32


# ------------------------------------------------------------ CIFAR files ----


def test_fake_binary_records_follow_the_official_layout(tmp_path):
    """Checks the writer by hand: 1 label byte, then R, G, B planes row-major."""
    fake = fake_data.write_cifar_bin(tmp_path, n_train_per_batch=3, n_test=2)
    with open(os.path.join(fake.path, 'data_batch_1.bin'), 'rb') as f:
        record = f.read(3073)
    y, x = 1, 2  # Probe image: R = 8y, G = 8x, B = 255 - 4(x + y).
    assert record[0] == fake.train_labels[0]
    assert record[1 + y * 32 + x] == 8
    assert record[1 + 1024 + y * 32 + x] == 16
    assert record[1 + 2048 + y * 32 + x] == 243


@pytest.mark.parametrize('style', ['py2', 'bytes_keys', 'str_keys'])
def test_cifar_python_round_trip(tmp_path, style):
    fake = fake_data.write_cifar_py(tmp_path, style=style)
    dataset = _load(fake.path, source='cifar')
    _assert_same(dataset, fake)
    # Planar rows became NHWC: pixel (y=1, x=2) of the probe image.
    np.testing.assert_array_equal(dataset.train_images[0, 1, 2], [8, 16, 243])
    assert (dataset.source, dataset.path) == ('cifar', fake.path)
    assert dataset.num_classes == 10 and dataset.class_names[0] == 'airplane'
    assert dataset.train_images.flags.c_contiguous


def test_cifar_binary_round_trip(tmp_path):
    fake = fake_data.write_cifar_bin(tmp_path)
    dataset = _load(fake.path, source='cifar')
    _assert_same(dataset, fake)
    np.testing.assert_array_equal(dataset.train_images[0, 1, 2], [8, 16, 243])


@pytest.mark.parametrize('version', ['py', 'bin'])
def test_official_archive_is_read_without_unpacking(tmp_path, version):
    archive, fake = fake_data.write_cifar_archive(tmp_path / 'a', version)
    dataset = _load(archive)
    _assert_same(dataset, fake)
    assert dataset.path == archive
    # The folder holding only the archive (as torchvision leaves it) works too.
    os.rename(archive, tmp_path / os.path.basename(archive))
    _assert_same(_load(tmp_path), fake)


@pytest.mark.parametrize(
    'layout,expected',
    [
        ('py_parent', 'cifar'),
        ('py_batches', 'cifar'),
        ('bin_parent', 'cifar'),
        ('bin_batches', 'cifar'),
        ('archive', 'cifar'),
        ('folder', 'folder'),
        ('tfds_dir', 'tfds'),
    ],
)
def test_detect_source(tmp_path, layout, expected):
    if layout.startswith('py'):
        path = fake_data.write_cifar_py(tmp_path, 1, 1).path
    elif layout.startswith('bin'):
        path = fake_data.write_cifar_bin(tmp_path, 1, 1).path
    elif layout == 'archive':
        path, _ = fake_data.write_cifar_archive(tmp_path, n_train_per_batch=1, n_test=1)
    elif layout == 'folder':
        path = fake_data.write_image_folder(tmp_path, 1, 1).path
    else:
        path = tmp_path
        os.makedirs(tmp_path / 'cifar10' / '3.0.2')
    if layout.endswith('parent'):
        path = os.path.dirname(path)
    assert datasets.detect_source(str(path)) == expected
    assert datasets.detect_source('') == 'tfds'


def test_missing_empty_and_unrecognised_paths(tmp_path):
    with pytest.raises(DataError, match='does not exist: .*nowhere'):
        _load(tmp_path / 'nowhere')
    with pytest.raises(DataError, match='empty folder.*cifar-10-batches-py'):
        _load(tmp_path)
    (tmp_path / 'notes.txt').write_text('hello')
    with pytest.raises(DataError, match='holds no dataset.*train/<class>/'):
        _load(tmp_path)
    with pytest.raises(DataError, match='holds no dataset'):
        _load(tmp_path / 'notes.txt')
    with pytest.raises(DataError, match='needs data.path'):
        _load('', source='cifar')
    with pytest.raises(DataError, match='no CIFAR-10 copy'):
        _load(tmp_path, source='cifar')
    with pytest.raises(DataError, match="'hdf5'"):
        _load(tmp_path, source='hdf5')


def test_unreadable_folder_is_a_data_error(tmp_path, monkeypatch):
    def denied(path):
        raise PermissionError(13, 'Permission denied', path)

    monkeypatch.setattr(os, 'listdir', denied)
    with pytest.raises(DataError, match=f'cannot read {tmp_path}: Permission'):
        _load(tmp_path)


def test_truncated_pickle_names_the_file(tmp_path):
    fake = fake_data.write_cifar_py(tmp_path)
    path = os.path.join(fake.path, 'data_batch_3')
    with open(path, 'rb') as f:
        data = f.read()
    with open(path, 'wb') as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(DataError, match='data_batch_3 is not a readable'):
        _load(fake.path)


def test_binary_batch_of_wrong_size_names_the_file(tmp_path):
    fake = fake_data.write_cifar_bin(tmp_path)
    with open(os.path.join(fake.path, 'test_batch.bin'), 'ab') as f:
        f.write(b'12345')
    with pytest.raises(DataError, match='test_batch.bin has .* bytes, not a'):
        _load(fake.path)


def test_missing_batch_and_bad_labels(tmp_path):
    fake = fake_data.write_cifar_bin(tmp_path / 'bin')
    with open(os.path.join(fake.path, 'data_batch_2.bin'), 'r+b') as f:
        f.write(bytes([10]))  # Label byte of the first record: no class 10.
    with pytest.raises(DataError, match='data_batch_2.bin has labels in'):
        _load(fake.path)
    fake = fake_data.write_cifar_py(tmp_path / 'py')
    os.remove(os.path.join(fake.path, 'test_batch'))
    with pytest.raises(DataError, match='lacks test_batch'):
        _load(fake.path)


def test_damaged_archive(tmp_path):
    archive = tmp_path / 'cifar-10-python.tar.gz'
    archive.write_bytes(b'\x1f\x8b\x08\x00 not really gzip')
    with pytest.raises(DataError, match='cannot read the archive'):
        _load(archive)
    with tarfile.open(archive, 'w:gz') as tar:
        tar.add(__file__, arcname='something/else.py')
    with pytest.raises(DataError, match='holds no CIFAR-10 batches'):
        _load(archive)


def test_incomplete_archive_and_malformed_python_batch(tmp_path):
    archive, _ = fake_data.write_cifar_archive(tmp_path / 'a', 'bin')
    partial = str(tmp_path / 'partial.tar')
    with tarfile.open(archive) as src, tarfile.open(partial, 'w') as dst:
        for member in src.getmembers():
            if not member.name.endswith(('data_batch_2.bin', 'test_batch.bin')):
                dst.addfile(member, src.extractfile(member) if member.isfile() else None)
    with pytest.raises(DataError, match=r'partial.tar lacks data_batch_2.bin, test_batch.bin$'):
        _load(partial)
    fake = fake_data.write_cifar_py(tmp_path / 'py')
    for data in (np.zeros(3072, np.uint8), np.zeros((1, 3072, 1), np.uint8), [0] * 3072):
        with open(os.path.join(fake.path, 'data_batch_1'), 'wb') as f:
            pickle.dump({'data': data, 'labels': [0]}, f, protocol=2)
        with pytest.raises(DataError, match=r'data_batch_1 has no CIFAR-10 images'):
            _load(fake.path)


class _Exploit:
    def __init__(self, call, arg):
        self.call, self.arg = call, arg

    def __reduce__(self):
        return self.call, (self.arg,)


@pytest.mark.parametrize('attack', ['os.system', 'builtins.eval'])
def test_malicious_pickle_is_refused_without_running(tmp_path, attack):
    fake = fake_data.write_cifar_py(tmp_path)
    marker = tmp_path / 'pwned'
    payload = (
        _Exploit(os.system, f'touch {marker}')
        if attack == 'os.system'
        else _Exploit(eval, f'open({str(marker)!r}, "w")')
    )
    with open(os.path.join(fake.path, 'data_batch_2'), 'wb') as f:
        pickle.dump({'data': payload, 'labels': []}, f, protocol=2)
    with pytest.raises(
        DataError, match='refusing to load .*data_batch_2: the pickle references .*(system|eval)'
    ):
        _load(fake.path)
    assert not marker.exists()


# ----------------------------------------------------------- train_subset ----


def test_train_subset_is_seeded_sorted_and_bounded(tmp_path):
    fake = fake_data.write_cifar_bin(tmp_path)
    a = _load(fake.path, train_subset=30, seed=1)
    b = _load(fake.path, train_subset=30, seed=1)
    c = _load(fake.path, train_subset=30, seed=2)
    assert a.train_images.shape == (30, 32, 32, 3) and len(a.train_labels) == 30
    np.testing.assert_array_equal(a.train_images, b.train_images)
    assert not np.array_equal(a.train_images, c.train_images)
    keep = np.sort(np.random.default_rng(1).choice(100, 30, replace=False))
    np.testing.assert_array_equal(a.train_images, fake.train_images[keep])
    np.testing.assert_array_equal(a.train_labels, fake.train_labels[keep])
    np.testing.assert_array_equal(a.test_images, fake.test_images)
    with pytest.raises(DataError, match='train_subset=101 must lie in'):
        _load(fake.path, train_subset=101)


# ---------------------------------------------------------- image folders ----


def test_image_folder_uses_one_seeded_order(tmp_path):
    fake = fake_data.write_image_folder(tmp_path)
    dataset = _load(fake.path, seed=3)
    order = np.random.default_rng(3).permutation(100)
    np.testing.assert_array_equal(dataset.train_images, fake.train_images[order])
    np.testing.assert_array_equal(dataset.train_labels, fake.train_labels[order])
    np.testing.assert_array_equal(dataset.test_images, fake.test_images)
    np.testing.assert_array_equal(dataset.test_labels, fake.test_labels)
    assert dataset.class_names == fake_data.CLASS_NAMES
    assert (dataset.source, dataset.path) == ('folder', fake.path)
    assert np.any(np.diff(dataset.train_labels) < 0)  # Not class by class.
    again = _load(fake.path, seed=3)
    np.testing.assert_array_equal(again.train_labels, dataset.train_labels)
    other = _load(fake.path, seed=4)
    assert not np.array_equal(other.train_labels, dataset.train_labels)


def test_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    fake = fake_data.write_image_folder(tmp_path / 'images')
    first = _load(fake.path)
    assert len(os.listdir(tmp_path / 'cache')) == 1

    def no_decoding(*args):
        raise AssertionError('decoded although the cache is valid')

    real_decode = image_folder._decode_image
    monkeypatch.setattr(image_folder, '_decode_image', no_decoding)
    np.testing.assert_array_equal(_load(fake.path).train_images, first.train_images)
    # Replacing one image changes its size and mtime: the folder is decoded again.
    monkeypatch.setattr(image_folder, '_decode_image', real_decode)
    path = os.path.join(fake.path, 'test', 'cat', '0000.png')
    Image.new('RGB', (32, 32), (1, 2, 3)).save(path)
    os.utime(path, ns=(0, 0))
    cat = fake_data.CLASS_NAMES.index('cat') * 5
    np.testing.assert_array_equal(_load(fake.path).test_images[cat, 0, 0], [1, 2, 3])
    assert len(os.listdir(tmp_path / 'cache')) == 2


def test_unwritable_cache_only_warns(tmp_path, monkeypatch, caplog):
    fake = fake_data.write_image_folder(tmp_path / 'images', 2, 1)
    blocker = tmp_path / 'not_a_dir'
    blocker.write_text('')
    monkeypatch.setenv('RESNET_JAX_CACHE', str(blocker))
    with caplog.at_level(logging.WARNING, logger='resnet_jax'):
        dataset = _load(fake.path)
    assert len(dataset.train_labels) == 20
    assert 'Could not write the image cache' in caplog.text


def test_parallel_decoding_matches_and_reports_bad_files(tmp_path, monkeypatch):
    """Chunks of 40 images: 150 images decode in several spawned processes."""
    monkeypatch.setattr(image_folder, '_DECODE_CHUNK', 40)
    fake = fake_data.write_image_folder(tmp_path / 'images')
    dataset = _load(fake.path, seed=0)
    order = np.random.default_rng(0).permutation(100)
    np.testing.assert_array_equal(dataset.train_images, fake.train_images[order])
    np.testing.assert_array_equal(dataset.test_images, fake.test_images)
    bad = os.path.join(fake.path, 'train', 'ship', '0003.png')
    with open(bad, 'wb') as f:
        f.write(b'not a png')
    with pytest.raises(DataError, match=f'{bad} is not a readable image'):
        _load(fake.path)


def test_image_modes_and_sizes(tmp_path):
    fake = fake_data.write_image_folder(tmp_path / 'a', 2, 1, size=16)
    with pytest.raises(DataError, match=r'0000.png is 16x16 pixels, not 32x32'):
        _load(fake.path)
    dataset = _load(fake.path, image_size=16)
    assert dataset.train_images.shape == (20, 16, 16, 3)
    cifar = fake_data.write_cifar_bin(tmp_path / 'b', 1, 1).path
    with pytest.raises(DataError, match='image_size=16 needs an image folder'):
        _load(cifar, image_size=16)
    # Grayscale (and other modes) become RGB; hidden files are skipped.
    fake = fake_data.write_image_folder(tmp_path / 'c', 2, 1)
    gray = os.path.join(fake.path, 'test', 'airplane', '0000.png')
    Image.new('L', (32, 32), 77).save(gray)
    (tmp_path / 'c' / 'train' / 'dog' / '.DS_Store').write_bytes(b'\0')
    dataset = _load(fake.path)
    np.testing.assert_array_equal(dataset.test_images[0], np.full((32, 32, 3), 77))


def test_16_bit_grayscale_is_scaled_and_32_bit_pixels_are_refused(tmp_path):
    fake = fake_data.write_image_folder(tmp_path / 'a', 2, 1)
    path = os.path.join(fake.path, 'test', 'airplane', '0000.png')
    Image.fromarray(np.full((32, 32), 20000, np.uint16)).save(path)
    assert Image.open(path).mode == 'I;16'  # PIL's convert('RGB') makes it 255.
    dataset = _load(fake.path)
    np.testing.assert_array_equal(dataset.test_images[0], np.full((32, 32, 3), 78))  # 20000/257
    # A float TIFF under a .png name: PIL reads content, not names.
    Image.fromarray(np.full((32, 32), 0.5, np.float32)).save(path, format='TIFF')
    with pytest.raises(DataError, match=r'0000.png has 32-bit float pixels \(mode F\)'):
        _load(fake.path)


@pytest.mark.parametrize(
    'damage,message',
    [
        ('text_file', r'notes.txt is not a .png, .jpg or .jpeg image'),
        ('broken_jpeg', r'0001.jpg is not a readable image'),
        ('empty_class', r'class folder .*train/zebra holds no images'),
        (
            'class_mismatch',
            r'different classes \(only in train: \[\], only in '
            r"test: \['kitten'\]\)",
        ),
        ('no_test', r'has no test/ subfolder'),
    ],
)
def test_image_folder_errors(tmp_path, damage, message):
    fake = fake_data.write_image_folder(tmp_path, 2, 1, class_names=('cat', 'dog'))
    train, test = tmp_path / 'train', tmp_path / 'test'
    if damage == 'text_file':
        (train / 'dog' / 'notes.txt').write_text('hello')
    elif damage == 'broken_jpeg':
        (test / 'cat' / '0001.jpg').write_bytes(b'\xff\xd8\xff garbage')
    elif damage == 'empty_class':
        os.makedirs(train / 'zebra')
        os.makedirs(test / 'zebra')
    elif damage == 'class_mismatch':
        os.makedirs(test / 'kitten')
    else:
        os.rename(test, tmp_path / 'elsewhere')
    with pytest.raises(DataError, match=message):
        _load(fake.path, source='folder')


# ------------------------------------------------------------------- tfds ----


@pytest.fixture
def network_probe(monkeypatch):
    """Simulates an offline machine; records how often the network is probed."""
    calls = []

    def offline():
        calls.append(1)
        return False

    monkeypatch.setattr(tfds_source, '_network_available', offline)
    return calls


def test_tfds_under_mock_data(network_probe):
    with tfds.testing.mock_data(num_examples=12):
        dataset = _load('', download=True)
    assert dataset.source == 'tfds' and dataset.path == ''
    assert dataset.train_images.shape == dataset.test_images.shape == (12, 32, 32, 3)
    assert dataset.train_images.dtype == np.uint8
    assert dataset.train_labels.dtype == dataset.test_labels.dtype == np.int32
    assert dataset.num_classes == 10
    assert not network_probe


def test_tfds_not_prepared_and_download_off(tmp_path, network_probe):
    start = time.perf_counter()
    with pytest.raises(
        DataError,
        match=r'not prepared at .*data.download is '
        r'off; point at a local copy.*data.source=cifar',
    ):
        _load(tmp_path, source='tfds', download=False)
    assert time.perf_counter() - start < 10
    assert not network_probe


def test_tfds_not_prepared_and_offline(tmp_path, network_probe):
    with pytest.raises(DataError, match='there is no network to download it'):
        _load(tmp_path, source='tfds', download=True)
    assert len(network_probe) == 1


def test_tfds_not_prepared_and_no_tensorflow(tmp_path, monkeypatch):
    monkeypatch.setattr(tfds_source, '_network_available', lambda: True)
    monkeypatch.setattr(tfds_source, '_tensorflow_available', lambda: False)
    with pytest.raises(DataError, match='preparing it needs TensorFlow'):
        _load(tmp_path, source='tfds', download=True)


def test_dataset_checks_its_arrays():
    images = np.zeros((2, 32, 32, 3), np.uint8)
    labels = np.zeros(2, np.int32)
    kwargs = dict(
        test_images=images, test_labels=labels, class_names=('a',), source='cifar', path='x'
    )
    with pytest.raises(DataError, match='train images must be uint8'):
        datasets.Dataset(images.astype(np.float32), labels, **kwargs)
    with pytest.raises(DataError, match='train labels must be int32'):
        datasets.Dataset(images, labels[:1], **kwargs)
    with pytest.raises(DataError, match=r'labels must lie in \[0, 1\)'):
        datasets.Dataset(images, labels + 1, **kwargs)
