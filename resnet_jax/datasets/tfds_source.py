"""TensorFlow Datasets' ``cifar10``, read through its ArrayRecord data source.

    dataset = tfds_source.load_tfds('', download=True)   # '' = the default data dir

Registered as the ``'tfds'`` source of :data:`resnet_jax.datasets.loading.SOURCES`.
Read without TensorFlow; an unprepared dataset is downloaded only if
``data.download`` is on, the network answers (through ``HTTPS_PROXY`` when set:
the proxy is what is probed) and TensorFlow is installed (tfds needs it to
prepare cifar10: ``pip install -e '.[tf]'``); otherwise a
:class:`resnet_jax.datasets.loading.DataError` says how to point at a local copy.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import urllib.parse
import urllib.request
from typing import Any

import numpy as np

from resnet_jax.datasets.base import CIFAR_IMAGE_SIZE, SOURCES, DataError, Dataset

logger = logging.getLogger('resnet_jax')

TFDS_NAME = 'cifar10'
_DOWNLOAD_HOST = ('www.cs.toronto.edu', 443)  # Where tfds fetches cifar10.
_NETWORK_TIMEOUT_S = 3.0
_PROXY_VARIABLES = ('HTTPS_PROXY', 'https_proxy')  # What tfds' downloads go through.
_PROXY_PORTS = {'http': 80, 'https': 443, 'socks5': 1080, 'socks5h': 1080, 'socks4': 1080}
_TF_INSTALL = "pip install -e '.[tf]'"


def probe_address(environ: Any = None) -> tuple[str, int] | None:
    """Where to probe the network: the HTTPS proxy's host and port when one is set
    (and the download host is not in ``NO_PROXY``), else the download host; None
    when the proxy setting names no host (nothing to probe)."""
    environ = os.environ if environ is None else environ
    proxy = next((environ[v] for v in _PROXY_VARIABLES if environ.get(v)), '')
    if not proxy or _bypasses_proxy(environ):
        return _DOWNLOAD_HOST
    parts = urllib.parse.urlsplit(proxy if '://' in proxy else f'http://{proxy}')
    try:
        port = parts.port or _PROXY_PORTS.get(parts.scheme, 80)
    except ValueError:  # A port that is not a number.
        return None
    return (parts.hostname, port) if parts.hostname else None


def _bypasses_proxy(environ: Any) -> bool:
    no_proxy = environ.get('NO_PROXY') or environ.get('no_proxy') or ''
    hosts = [h.strip().lstrip('.') for h in no_proxy.split(',') if h.strip()]
    host = _DOWNLOAD_HOST[0]
    return any(h == '*' or host == h or host.endswith('.' + h) for h in hosts)


def _network_available() -> bool:
    """Whether the CIFAR-10 download host (or the HTTPS proxy in between) answers
    within a few seconds; a proxy setting without a host is not probed (True)."""
    address = probe_address()
    if address is None:
        logger.info('HTTPS_PROXY names no host: the network is not probed.')
        return True
    try:
        with socket.create_connection(address, timeout=_NETWORK_TIMEOUT_S):
            return True
    except OSError:
        return False


def _offline_problem() -> str:
    """Why an unprepared cifar10 cannot be downloaded: no network (through the proxy
    if one is set), and what else preparing it needs."""
    problem = 'there is no network to download it'
    address = probe_address()
    if address not in (None, _DOWNLOAD_HOST):
        problem += f' (the proxy {address[0]}:{address[1]} of HTTPS_PROXY did not answer)'
    if not _tensorflow_available():
        problem += f', and preparing it also needs TensorFlow ({_TF_INSTALL})'
    return problem


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
    """:func:`load_tfds`, with whatever a damaged data dir raises (garbage
    ``dataset_info.json`` or shards) as a :class:`DataError` naming it."""
    try:
        return load_tfds(data_dir, download)
    except DataError:
        raise
    except Exception as e:  # pylint: disable=broad-except  # tfds and its readers raise many.
        where = data_dir or 'the default TFDS data dir'
        reason = ' '.join(str(e).split())
        raise DataError(
            f'cannot read TFDS cifar10 at {where}: {type(e).__name__}: {reason[:300]}'
        ) from e


def load_tfds(data_dir: str, download: bool) -> Dataset:
    """Reads TFDS cifar10 from ``data_dir`` ('' = default), TensorFlow-free.

    Reading comes first, so a prepared (or mocked) dataset never touches the
    network; only when nothing is prepared is a download considered.
    """
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    builder = tfds.builder(TFDS_NAME, data_dir=data_dir or None)
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
                else _offline_problem()
                if not _network_available()
                else f'preparing it needs TensorFlow ({_TF_INSTALL})'
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
                TFDS_NAME, data_dir=builder.data_dir_root, file_format='array_record'
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
