"""Image folders: ``path/{train,test}/<class>/*.{png,jpg,jpeg}``, decoded once and cached.

    dataset = image_folder.load_folder('/data/images', image_size=32)

Registered as the ``'folder'`` source of :data:`resnet_jax.datasets.loading.SOURCES`.
Classes are the sorted subfolder names. Images must be ``data.image_size``
pixels square and become 8-bit RGB (see :func:`_decode_image`). Large folders
are decoded in spawned processes (a calling script needs the
``if __name__ == '__main__':`` guard), then cached as ``.npz`` under
``$RESNET_JAX_CACHE`` (default ``~/.cache/resnet_jax``), keyed on the folder's
path and its files' names, sizes and modification times.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import hashlib
import logging
import multiprocessing
import os
import time
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from resnet_jax import validation
from resnet_jax.datasets.base import SOURCES, DataError, Dataset

logger = logging.getLogger('resnet_jax')

_IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg')
_DECODE_CHUNK = 1000  # Images per decoding task; fewer decode in-process.
_MAX_DECODE_PROCESSES = 32
_CACHE_FORMAT = 2  # Bump when the cached arrays change meaning.


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


def load_folder(path: str, image_size: int) -> Dataset:
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
    return load_folder(path, image_size)
