"""PyTorch references of the study's ResNet and recipe, for speed comparisons only.

Two implementations of the same network (:mod:`resnet_jax.models.resnet`) and training
recipe (``configs/default.py``: inputs scaled to [0, 1], pad-4 random crop and
horizontal flip, Adam, learning rate divided by 3 every 20 epochs,
cross-entropy), selected by ``impl``:

* ``'study'``: as the study ran it: a ``Dataset`` over the uint8 arrays that
  turns each image into a PIL image and applies per-image CPU transforms (the
  equivalents of torchvision's ``RandomCrop(32, padding=4)``,
  ``RandomHorizontalFlip()`` and ``ToTensor()``), a ``DataLoader`` with
  ``num_workers`` processes, eager mode, float32, NCHW, ``loss.item()`` per step.
* ``'tuned'``: what a PyTorch expert would write: the uint8 dataset as one tensor
  on the device, a per-epoch permutation and batched augmentation (one gather)
  on the device, ``channels_last``, bfloat16 autocast when asked,
  ``torch.compile`` (by default on CUDA only), fused Adam and
  ``cudnn.benchmark`` on CUDA.

Usage (from the repository root; torch is not a dependency of ``resnet_jax``)::

    python benchmarks/torch_reference.py --impl tuned --steps 50          # timing mode
    python benchmarks/torch_reference.py --impl study --epochs 2 --data data  # training mode

or from Python: ``run('tuned', model='paper', steps=50)`` returns a JSON-ready dict.
Without data arrays (or ``--data``) the images are random uint8 (50,000 train,
10,000 test, 10 classes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

IMPLS = ('study', 'tuned')
MODELS = ('paper', 'resnet18')
DTYPES = ('float32', 'bfloat16')
COMPILE_CHOICES = ('auto', 'on', 'off')
DEVICE_CHOICES = ('auto', 'cpu', 'cuda')

NUM_CLASSES = 10
IMAGE_SIZE = 32
SYNTHETIC_TRAIN_IMAGES = 50_000
SYNTHETIC_TEST_IMAGES = 10_000
DEFAULT_STEPS = 20  # Timing mode when neither steps nor epochs is given.
EVAL_BATCH_SIZE = 1000

# Per model: stage widths, blocks per stage, stem width, projection-shortcut kernel
# (as resnet_jax.models.resnet.PaperResNet / ResNet18).
ARCHITECTURES = {
    'paper': ((16, 32, 64), (2, 2, 2), 16, 3),
    'resnet18': ((64, 128, 256, 512), (2, 2, 2, 2), 64, 1),
}


# --------------------------------------------------------------------------- model


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU, conv3x3-BN, plus a (projected) shortcut, then ReLU."""

    def __init__(self, in_channels: int, channels: int, stride: int, shortcut_kernel: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut_conv: nn.Conv2d | None = None
        self.shortcut_bn: nn.BatchNorm2d | None = None
        if stride != 1 or in_channels != channels:
            k = shortcut_kernel
            self.shortcut_conv = nn.Conv2d(
                in_channels, channels, k, stride, padding=k // 2, bias=False
            )
            self.shortcut_bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        residual = x
        if self.shortcut_conv is not None:
            residual = self.shortcut_bn(self.shortcut_conv(x))
        return F.relu(y + residual)


class ResNet(nn.Module):
    """3x3 stem conv-BN-ReLU, stages of basic blocks, global average pool, linear."""

    def __init__(
        self,
        stage_widths: Sequence[int],
        stage_sizes: Sequence[int],
        stem_width: int,
        shortcut_kernel: int,
        num_classes: int = NUM_CLASSES,
    ):
        super().__init__()
        self.stem_conv = nn.Conv2d(3, stem_width, 3, 1, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(stem_width)
        blocks = []
        channels = stem_width
        for i, (width, size) in enumerate(zip(stage_widths, stage_sizes, strict=True)):
            for j in range(size):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(channels, width, stride, shortcut_kernel))
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_bn(self.stem_conv(x)))
        x = self.blocks(x)
        return self.head(x.mean(dim=(2, 3)))


def build_model(name: str, num_classes: int = NUM_CLASSES) -> nn.Module:
    """The torch twin of ``resnet_jax.models.create_model(name)`` ('paper' or 'resnet18').

    PyTorch's default initialisation and BatchNorm (momentum 0.1, eps 1e-5), which
    the Flax models reproduce.
    """
    if name not in ARCHITECTURES:
        raise ValueError(f'unknown model {name!r}; choose one of {sorted(ARCHITECTURES)}')
    widths, sizes, stem, shortcut_kernel = ARCHITECTURES[name]
    return ResNet(widths, sizes, stem, shortcut_kernel, num_classes)


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _flax_layers(model: ResNet) -> dict[tuple[str, ...], nn.Module]:
    """Flax module path (as in ``variables['params']``) -> the matching torch layer."""
    layers: dict[tuple[str, ...], nn.Module] = {
        ('stem_conv',): model.stem_conv,
        ('stem_bn',): model.stem_bn,
        ('head',): model.head,
    }
    for i, block in enumerate(model.blocks):
        name = f'BasicBlock_{i}'
        layers[(name, 'Conv_0')] = block.conv1
        layers[(name, 'BatchNorm_0')] = block.bn1
        layers[(name, 'Conv_1')] = block.conv2
        layers[(name, 'BatchNorm_1')] = block.bn2
        if block.shortcut_conv is not None:
            layers[(name, 'shortcut_conv')] = block.shortcut_conv
            layers[(name, 'shortcut_bn')] = block.shortcut_bn
    return layers


def _leaf_paths(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Paths of every array in a nested mapping."""
    paths = set()
    for key, value in tree.items():
        if isinstance(value, Mapping):
            paths |= _leaf_paths(value, (*prefix, key))
        else:
            paths.add((*prefix, key))
    return paths


def _subtree(tree: Mapping[str, Any], path: tuple[str, ...]) -> Mapping[str, Any]:
    """``tree[path[0]][path[1]]...``; ValueError names a missing path."""
    for key in path:
        if key not in tree:
            raise ValueError(f'Flax variables have no {"/".join(path)} (a different network?)')
        tree = tree[key]
    return tree


def _copy(target: torch.Tensor, value: Any, what: str) -> None:
    """Copies an array into a torch tensor in place, checking the shape."""
    array = torch.from_numpy(np.ascontiguousarray(np.asarray(value, np.float32)))
    if tuple(array.shape) != tuple(target.shape):
        raise ValueError(f'{what}: Flax shape {tuple(array.shape)} != torch {tuple(target.shape)}')
    target.copy_(array.to(target.device, target.dtype))


def load_flax_variables(torch_model: nn.Module, variables: Mapping[str, Any]) -> None:
    """Copies Flax ``{'params', 'batch_stats'}`` of the same model into ``torch_model``.

    Conv kernels HWIO -> OIHW, dense kernel (in, out) -> (out, in), BatchNorm
    scale/bias/mean/var -> weight/bias/running_mean/running_var. Raises ValueError
    on a shape mismatch or when some Flax array is left unused (different networks).
    """
    params, stats = variables['params'], variables.get('batch_stats', {})
    used: set[tuple[str, ...]] = set()
    with torch.no_grad():
        for path, layer in _flax_layers(torch_model).items():
            p = _subtree(params, path)
            what = '/'.join(path)
            if isinstance(layer, nn.Conv2d):
                _copy(layer.weight, np.asarray(p['kernel']).transpose(3, 2, 0, 1), what)
                used.add((*path, 'kernel'))
            elif isinstance(layer, nn.Linear):
                _copy(layer.weight, np.asarray(p['kernel']).T, what)
                _copy(layer.bias, p['bias'], what)
                used |= {(*path, 'kernel'), (*path, 'bias')}
            else:
                s = _subtree(stats, path)
                _copy(layer.weight, p['scale'], what)
                _copy(layer.bias, p['bias'], what)
                _copy(layer.running_mean, s['mean'], what)
                _copy(layer.running_var, s['var'], what)
                used |= {(*path, 'scale'), (*path, 'bias')}
    unused = _leaf_paths(params) - used
    if unused:
        names = sorted('/'.join(u) for u in unused)
        raise ValueError(f'Flax params without a torch counterpart: {names}')


# --------------------------------------------------------------- study transforms


def pil_random_crop(image: Image.Image, size: int, padding: int) -> Image.Image:
    """torchvision's ``RandomCrop(size, padding)``: zero-pad, crop at a uniform offset."""
    image = ImageOps.expand(image, border=padding, fill=0)
    width, height = image.size
    top = int(torch.randint(0, height - size + 1, size=(1,)).item())
    left = int(torch.randint(0, width - size + 1, size=(1,)).item())
    return image.crop((left, top, left + size, top + size))


def pil_random_hflip(image: Image.Image, p: float = 0.5) -> Image.Image:
    """torchvision's ``RandomHorizontalFlip(p)``."""
    if torch.rand(1) < p:
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """torchvision's ``ToTensor()``: HWC uint8 -> CHW float32 in [0, 1]."""
    array = torch.from_numpy(np.array(image, np.uint8, copy=True))
    return array.permute(2, 0, 1).contiguous().to(torch.float32).div(255)


class StudyDataset(torch.utils.data.Dataset):
    """In-memory uint8 NHWC images through per-image PIL transforms (the study's way)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, train: bool, pad: int, flip: bool):
        self.images, self.labels = images, labels
        self.train, self.pad, self.flip = train, pad, flip

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = Image.fromarray(self.images[index])
        if self.train:
            if self.pad:
                image = pil_random_crop(image, image.size[1], self.pad)
            if self.flip:
                image = pil_random_hflip(image)
        return pil_to_tensor(image), int(self.labels[index])


# ---------------------------------------------------------------- tuned augmentation


def augment_batch(
    images: torch.Tensor, pad: int, flip: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random pad-``pad`` crop and horizontal flip of a uint8 NHWC batch, on its device.

    Each image gets its own offsets in ``[0, 2 * pad]`` over a zero-padded copy and
    its own flip coin; crop and flip are one gather (the flip reverses the column
    indices with ``torch.where``).
    """
    batch, height, width, _ = images.shape
    device = images.device
    padded = F.pad(images, (0, 0, pad, pad, pad, pad)) if pad else images
    offsets = torch.randint(0, 2 * pad + 1, (batch, 2), device=device, generator=generator)
    rows = offsets[:, :1] + torch.arange(height, device=device)
    cols = offsets[:, 1:] + torch.arange(width, device=device)
    if flip:
        coins = torch.rand(batch, device=device, generator=generator) < 0.5
        cols = torch.where(coins[:, None], cols.flip(1), cols)
    index = torch.arange(batch, device=device)[:, None, None]
    return padded[index, rows[:, :, None], cols[:, None, :]]


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW in [0, 1], channels_last in memory (no copy of layout)."""
    return (
        images.permute(0, 3, 1, 2).float().div_(255).contiguous(memory_format=torch.channels_last)
    )


# ---------------------------------------------------------------- implementations


def _recipe() -> Any:
    """The study's recipe: the config ``resnet_jax.configs.default`` ships
    (:func:`resnet_jax.config.get_config`), from the repository when not installed."""
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    from resnet_jax import config

    return config.get_config()


def _synchronize(device: torch.device) -> None:
    """Waits for queued device work, so clocks read after it are honest."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


class _Impl:
    """Shared state of one implementation: model, optimiser, schedule, epoch sums.

    Subclasses provide ``batches(train)`` and ``step(x, y)``.
    """

    def __init__(self, model: nn.Module, device: torch.device, batch_size: int, config: Any):
        self.model, self.device, self.batch_size = model, device, batch_size
        self.pad, self.flip = config.data.pad, config.data.flip
        self.optimizer = self.make_optimizer(config)
        self.scheduler = torch.optim.lr_scheduler.StepLR(
            self.optimizer, step_size=config.decay_every_epochs, gamma=1.0 / config.decay_factor
        )
        self.loss_sum: Any = 0.0
        self.correct: Any = 0
        self.seen = 0

    def make_optimizer(self, config: Any) -> torch.optim.Optimizer:
        """The study's Adam."""
        return torch.optim.Adam(self.model.parameters(), **self.adam_kwargs(config))

    @staticmethod
    def adam_kwargs(config: Any) -> dict[str, Any]:
        """Adam's hyperparameters from the recipe."""
        return dict(
            lr=config.learning_rate,
            betas=(config.adam_b1, config.adam_b2),
            eps=config.adam_eps,
            weight_decay=config.weight_decay,
        )

    def take_epoch_metrics(self) -> tuple[float, float]:
        """Mean training loss and accuracy since the last call; resets the sums."""
        seen = max(self.seen, 1)
        loss, correct = float(self.loss_sum), float(self.correct)
        self.loss_sum, self.correct, self.seen = 0.0, 0, 0
        return loss / seen, correct / seen

    def batches(self, train: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        raise NotImplementedError

    def forward_eval(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def evaluate(self) -> float:
        """Accuracy over the whole test set (running BatchNorm statistics)."""
        self.model.eval()
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        total = 0
        with torch.inference_mode():
            for x, y in self.batches(train=False):
                correct += (self.forward_eval(x).argmax(1) == y).sum()
                total += len(y)
        self.model.train()
        return int(correct.item()) / max(total, 1)


class StudyImpl(_Impl):
    """The study's loop: DataLoader + PIL transforms, eager float32 NCHW."""

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        batch_size: int,
        config: Any,
        data: dict[str, Any],
        num_workers: int,
        seed: int,
    ):
        super().__init__(model, device, batch_size, config)
        self.num_workers, self.seed = num_workers, seed
        self.train_set = StudyDataset(
            data['train_images'], data['train_labels'], True, self.pad, self.flip
        )
        self.test_set = None
        if data.get('test_images') is not None:
            self.test_set = StudyDataset(
                data['test_images'], data['test_labels'], False, self.pad, self.flip
            )
        self.shuffle = config.shuffle
        self.generator = torch.Generator().manual_seed(seed)

    def batches(self, train: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of the training (shuffled, augmented) or test loader."""
        loader = torch.utils.data.DataLoader(
            self.train_set if train else self.test_set,
            batch_size=self.batch_size if train else EVAL_BATCH_SIZE,
            shuffle=train and self.shuffle,
            num_workers=self.num_workers,
            generator=self.generator,
        )
        for x, y in loader:
            yield x.to(self.device), y.to(self.device)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """zero_grad, forward, cross-entropy, backward, Adam; loss and hits via .item()."""
        self.optimizer.zero_grad()
        outputs = self.model(x)
        loss = F.cross_entropy(outputs, y)
        loss.backward()
        self.optimizer.step()
        self.loss_sum += loss.item() * len(y)
        self.correct += (outputs.argmax(1) == y).sum().item()
        self.seen += len(y)


class TunedImpl(_Impl):
    """Data, permutation and augmentation on the device; channels_last, autocast, compile."""

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        batch_size: int,
        config: Any,
        data: dict[str, Any],
        dtype: str,
        compile_model: bool,
        seed: int,
    ):
        self.fused = False
        super().__init__(model, device, batch_size, config)
        self.shuffle = config.shuffle
        self.autocast_dtype = torch.bfloat16 if dtype == 'bfloat16' else None
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.arrays = {k: _to_device(v, device) for k, v in data.items() if v is not None}
        self.forward = torch.compile(model, dynamic=False) if compile_model else model
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)

    def make_optimizer(self, config: Any) -> torch.optim.Optimizer:
        """Adam, fused on CUDA (foreach elsewhere, PyTorch's default there)."""
        kwargs = self.adam_kwargs(config)
        if self.device.type == 'cuda':
            try:
                optimizer = torch.optim.Adam(self.model.parameters(), fused=True, **kwargs)
                self.fused = True
                return optimizer
            except (RuntimeError, TypeError):
                pass
        return torch.optim.Adam(self.model.parameters(), **kwargs)

    def take_epoch_metrics(self) -> tuple[float, float]:
        loss, accuracy = super().take_epoch_metrics()
        self.loss_sum = torch.zeros((), device=self.device)
        self.correct = torch.zeros((), dtype=torch.int64, device=self.device)
        return loss, accuracy

    def autocast(self) -> Any:
        """bfloat16 autocast when asked, else a no-op context."""
        enabled = self.autocast_dtype is not None
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def batches(self, train: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch: device permutation, gather, augmentation (train) and scaling."""
        split = 'train' if train else 'test'
        images, labels = self.arrays[f'{split}_images'], self.arrays[f'{split}_labels']
        n = len(labels)
        size = self.batch_size if train else EVAL_BATCH_SIZE
        order = None
        if train and self.shuffle:
            order = torch.randperm(n, device=self.device, generator=self.generator)
        for start in range(0, n, size):
            if order is None:
                x, y = images[start : start + size], labels[start : start + size]
            else:
                index = order[start : start + size]
                x, y = images[index], labels[index]
            if train:
                x = augment_batch(x, self.pad, self.flip, self.generator)
            yield to_model_input(x), y

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One Adam step; loss and hits summed on the device (no host sync)."""
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            outputs = self.forward(x)
            loss = F.cross_entropy(outputs.float(), y)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            self.loss_sum += loss.detach() * len(y)
            self.correct += (outputs.argmax(1) == y).sum()
        self.seen += len(y)

    def forward_eval(self, x: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.forward(x)


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array as one device tensor (labels as int64)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if tensor.dtype != torch.uint8:
        tensor = tensor.to(torch.int64)
    return tensor.to(device)


# ------------------------------------------------------------------------ driver


def resolve_device(device: str) -> torch.device:
    """'auto' -> CUDA when available, else the CPU."""
    if device not in DEVICE_CHOICES:
        raise ValueError(f'device must be one of {DEVICE_CHOICES}, not {device!r}')
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if device == 'cuda' and not torch.cuda.is_available():
        raise ValueError('device=cuda, but torch sees no CUDA device')
    return torch.device(device)


def resolve_compile(compile: str | bool, device: torch.device) -> bool:
    """'auto' -> compile on CUDA only; 'on'/'off' or a bool as given."""
    if isinstance(compile, bool):
        return compile
    if compile not in COMPILE_CHOICES:
        raise ValueError(f'compile must be one of {COMPILE_CHOICES}, not {compile!r}')
    return compile == 'on' or (compile == 'auto' and device.type == 'cuda')


def synthetic_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random uint8 32x32x3 images and int32 labels of 10 classes."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    return images, rng.integers(0, NUM_CLASSES, n, dtype=np.int32)


def _split(images: Any, labels: Any, n: int, seed: int, name: str) -> tuple[Any, Any]:
    """Given arrays checked for shape, or synthetic ones."""
    if (images is None) != (labels is None):
        raise ValueError(f'give both {name}_images and {name}_labels, or neither')
    if images is None:
        return synthetic_split(n, seed)
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f'{name}_images must be uint8 NHWC, not {images.dtype} {images.shape}')
    if labels.shape != images.shape[:1]:
        raise ValueError(f'{name}_labels shape {labels.shape} != ({len(images)},)')
    return images, labels


def peak_memory(device: torch.device) -> tuple[int, str]:
    """Peak bytes: CUDA max allocated, else this process's max RSS."""
    if device.type == 'cuda':
        return int(torch.cuda.max_memory_allocated(device)), 'cuda_max_memory_allocated'
    # VmHWM, unlike ru_maxrss, is not inherited from the parent across exec.
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) * 1024, 'vm_hwm'
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == 'darwin' else rss * 1024), 'max_rss'


def device_name(device: torch.device) -> str:
    """'cpu' or the CUDA device's name."""
    return torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'


def _forever(impl: _Impl) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Training batches, epoch after epoch (timing mode; no schedule steps)."""
    while True:
        yield from impl.batches(train=True)


def _time_steps(impl: _Impl, steps: int, warmup_steps: int) -> dict[str, Any]:
    """Timing mode: ``warmup_steps`` steps, then ``steps`` timed steps."""
    batches = _forever(impl)
    start = time.perf_counter()
    for _ in range(warmup_steps):
        impl.step(*next(batches))
    _synchronize(impl.device)
    warm = time.perf_counter()
    images = 0
    for _ in range(steps):
        x, y = next(batches)
        impl.step(x, y)
        images += len(y)
    _synchronize(impl.device)
    seconds = time.perf_counter() - warm
    batches.close()  # Shuts down DataLoader workers now.
    return {
        'compile_seconds': warm - start,
        'timed_steps': steps,
        'timed_images': images,
        'timed_seconds': seconds,
        'images_per_second': images / seconds,
        'step_seconds': seconds / steps,
    }


def _train_epoch(impl: _Impl, warmup_steps: int, first: bool) -> dict[str, float]:
    """One training epoch; in the first, also the time and images of the warm-up steps."""
    _synchronize(impl.device)
    start = time.perf_counter()
    warm, warm_images, warm_steps, images, steps = start, 0, 0, 0, 0
    for x, y in impl.batches(train=True):
        impl.step(x, y)
        images += len(y)
        steps += 1
        if first and steps == warmup_steps:
            _synchronize(impl.device)
            warm, warm_images, warm_steps = time.perf_counter(), images, steps
    _synchronize(impl.device)
    end = time.perf_counter()
    if first and steps < warmup_steps:  # The whole epoch was warm-up.
        warm, warm_images, warm_steps = end, images, steps
    return {
        'seconds': end - start,
        'warmup_seconds': warm - start,
        'steady_seconds': end - warm,
        'steady_images': images - warm_images,
        'steady_steps': steps - warm_steps,
        'images': images,
    }


def _train_epochs(impl: _Impl, epochs: int, warmup_steps: int) -> dict[str, Any]:
    """Training mode: ``epochs`` epochs, each followed by a test-set evaluation."""
    records, timings = [], []
    for epoch in range(epochs):
        timing = _train_epoch(impl, warmup_steps, first=epoch == 0)
        impl.scheduler.step()
        train_loss, train_accuracy = impl.take_epoch_metrics()
        eval_start = time.perf_counter()
        test_accuracy = impl.evaluate()
        record = {
            'epoch': epoch + 1,
            'train_loss': train_loss,
            'train_accuracy': train_accuracy,
            'test_accuracy': test_accuracy,
            'epoch_seconds': timing['seconds'],
            'eval_seconds': time.perf_counter() - eval_start,
        }
        print(json.dumps(record), file=sys.stderr, flush=True)
        records.append(record)
        timings.append(timing)
    return _training_summary(records, timings)


def _training_summary(records: list[dict], timings: list[dict]) -> dict[str, Any]:
    """Throughput without the warm-up steps; epoch time without the first epoch if possible."""
    steady_images = sum(t['steady_images'] for t in timings)
    steady_seconds = sum(t['steady_seconds'] for t in timings)
    steady_steps = sum(t['steady_steps'] for t in timings)
    includes_warmup = steady_images == 0
    if includes_warmup:  # Every step was a warm-up step: report the overall rate.
        steady_images = sum(t['images'] for t in timings)
        steady_seconds = sum(t['seconds'] for t in timings)
        steady_steps = max(1, math.ceil(steady_images / max(1, timings[0]['images'])))
    later = [r['epoch_seconds'] for r in records[1:]] or [records[0]['epoch_seconds']]
    return {
        'compile_seconds': timings[0]['warmup_seconds'],
        'images_per_second': steady_images / steady_seconds,
        'images_per_second_includes_warmup': includes_warmup,
        'step_seconds': steady_seconds / steady_steps,
        'epoch_seconds': sum(later) / len(later),
        'epoch_seconds_estimated': False,
        'history': records,
        'test_accuracy': records[-1]['test_accuracy'],
        'train_accuracy': records[-1]['train_accuracy'],
        'train_loss': records[-1]['train_loss'],
    }


def _check_args(
    impl: str,
    model: str,
    batch_size: int,
    dtype: str,
    steps: int | None,
    epochs: int | None,
    warmup_steps: int,
    num_workers: int,
) -> None:
    """ValueError for arguments run() cannot honour."""
    if impl not in IMPLS:
        raise ValueError(f'impl must be one of {IMPLS}, not {impl!r}')
    if model not in MODELS:
        raise ValueError(f'model must be one of {MODELS}, not {model!r}')
    if dtype not in DTYPES:
        raise ValueError(f'dtype must be one of {DTYPES}, not {dtype!r}')
    if impl == 'study' and dtype != 'float32':
        raise ValueError("impl='study' runs in float32 only, as the study did")
    if steps is not None and epochs is not None:
        raise ValueError('give steps (timing mode) or epochs (training mode), not both')
    for name, value, low in (
        ('batch_size', batch_size, 1),
        ('steps', steps, 1),
        ('epochs', epochs, 1),
        ('warmup_steps', warmup_steps, 0),
        ('num_workers', num_workers, 0),
    ):
        if value is not None and (not isinstance(value, int) or value < low):
            raise ValueError(f'{name} must be an integer >= {low}, not {value!r}')


def run(
    impl: str,
    model: str = 'paper',
    batch_size: int = 100,
    dtype: str = 'float32',
    train_images: np.ndarray | None = None,
    train_labels: np.ndarray | None = None,
    test_images: np.ndarray | None = None,
    test_labels: np.ndarray | None = None,
    steps: int | None = None,
    epochs: int | None = None,
    warmup_steps: int = 3,
    num_workers: int = 2,
    compile: str | bool = 'auto',
    device: str = 'auto',
    seed: int = 0,
) -> dict[str, Any]:
    """Times (``steps``) or trains (``epochs``) one implementation; returns a JSON-ready dict.

    Timing mode (``steps``, the default with ``DEFAULT_STEPS``): ``warmup_steps``
    untimed steps, then ``steps`` timed ones; ``epoch_seconds`` is extrapolated.
    Training mode (``epochs``): full epochs, each followed by a test evaluation;
    throughput leaves out the first ``warmup_steps`` steps of epoch 1, and
    ``epoch_seconds`` is the mean of epochs 2.. (epoch 1 when there is one).
    Missing arrays are random (50,000 train / 10,000 test images). ``compile`` and
    ``num_workers`` concern 'tuned' and 'study' respectively.

    The result holds the arguments (``impl``, ``model``, ``batch_size``, ``dtype``,
    ``steps``, ``epochs``, ``warmup_steps``, ``num_workers``, ``seed``), the setting
    (``mode`` 'timing' | 'training', ``device`` 'cpu' or the CUDA device name,
    ``device_type``, ``torch_version``, ``python_version``, ``num_threads``,
    ``compile``, ``channels_last``, ``fused_adam``, ``num_params``,
    ``num_train_images``), the measurements (``images_per_second``,
    ``step_seconds``, ``epoch_seconds``, ``epoch_seconds_estimated``,
    ``compile_seconds``: the warm-up steps, torch.compile included;
    ``setup_seconds``: optimiser and data placement; ``peak_memory_bytes`` with
    ``peak_memory_kind``), in timing mode ``timed_steps``, ``timed_images``,
    ``timed_seconds``, and in training mode ``history`` (per epoch: ``epoch``,
    ``train_loss``, ``train_accuracy``, ``test_accuracy``, ``epoch_seconds``,
    ``eval_seconds``), the last epoch's ``train_loss``, ``train_accuracy`` and
    ``test_accuracy``, and ``images_per_second_includes_warmup``.
    """
    _check_args(impl, model, batch_size, dtype, steps, epochs, warmup_steps, num_workers)
    if steps is None and epochs is None:
        steps = DEFAULT_STEPS
    torch_device = resolve_device(device)
    compile_model = impl == 'tuned' and resolve_compile(compile, torch_device)
    torch.manual_seed(seed)
    train = _split(train_images, train_labels, SYNTHETIC_TRAIN_IMAGES, seed, 'train')
    test = (None, None)
    if epochs is not None:
        test = _split(test_images, test_labels, SYNTHETIC_TEST_IMAGES, seed + 1, 'test')
    data = dict(
        zip(
            ('train_images', 'train_labels', 'test_images', 'test_labels'),
            train + test,
            strict=True,
        )
    )
    config = _recipe()
    if torch_device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(torch_device)
        if impl == 'tuned':
            torch.backends.cudnn.benchmark = True

    net = build_model(model).to(torch_device)
    setup_start = time.perf_counter()
    if impl == 'study':
        runner: _Impl = StudyImpl(net, torch_device, batch_size, config, data, num_workers, seed)
    else:
        net = net.to(memory_format=torch.channels_last)
        runner = TunedImpl(net, torch_device, batch_size, config, data, dtype, compile_model, seed)
    _synchronize(torch_device)
    setup_seconds = time.perf_counter() - setup_start
    net.train()

    if epochs is None:
        result = _time_steps(runner, steps, warmup_steps)
        result['epoch_seconds'] = len(data['train_labels']) / result['images_per_second']
        result['epoch_seconds_estimated'] = True
    else:
        result = _train_epochs(runner, epochs, warmup_steps)
    memory, memory_kind = peak_memory(torch_device)
    return {
        'impl': impl,
        'model': model,
        'batch_size': batch_size,
        'dtype': dtype,
        'mode': 'timing' if epochs is None else 'training',
        'steps': steps,
        'epochs': epochs,
        'warmup_steps': warmup_steps,
        'device': device_name(torch_device),
        'device_type': torch_device.type,
        'torch_version': torch.__version__,
        'python_version': platform.python_version(),
        'num_threads': torch.get_num_threads(),
        'num_workers': num_workers if impl == 'study' else 0,
        'compile': compile_model,
        'channels_last': impl == 'tuned',
        'fused_adam': getattr(runner, 'fused', False),
        'seed': seed,
        'num_params': count_params(net),
        'num_train_images': len(data['train_labels']),
        'setup_seconds': setup_seconds,
        'peak_memory_bytes': memory,
        'peak_memory_kind': memory_kind,
        **result,
    }


# --------------------------------------------------------------------------- CLI


def _positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be >= 1, not {value}')
    return value


def _non_negative(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f'must be >= 0, not {value}')
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--impl', required=True, choices=IMPLS)
    parser.add_argument('--model', default='paper', choices=MODELS)
    parser.add_argument('--batch_size', type=_positive, default=100)
    parser.add_argument('--dtype', default='float32', choices=DTYPES)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument('--steps', type=_positive, help=f'timing mode (default {DEFAULT_STEPS})')
    mode.add_argument('--epochs', type=_positive, help='training mode')
    parser.add_argument('--warmup_steps', type=_non_negative, default=3)
    parser.add_argument('--data', help='a CIFAR-10 path resnet_jax reads (default: random data)')
    parser.add_argument('--train_subset', type=_non_negative, default=0)
    parser.add_argument('--num_workers', type=_non_negative, default=2)
    parser.add_argument('--compile', default='auto', choices=COMPILE_CHOICES)
    parser.add_argument('--device', default='auto', choices=DEVICE_CHOICES)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--json', help='also write the result to this file')
    args = parser.parse_args(argv)
    if args.impl == 'study' and args.dtype != 'float32':
        parser.error('--impl study runs in float32 only, as the study did')
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda, but torch sees no CUDA device')
    if args.train_subset and not args.data:
        parser.error('--train_subset needs --data')
    return args


def load_arrays(path: str, train_subset: int, seed: int) -> dict[str, np.ndarray]:
    """CIFAR-10 at ``path`` through ``resnet_jax.datasets.load_dataset``."""
    config = _recipe()
    from resnet_jax import datasets

    data_config = config.data
    data_config.path = path
    data_config.source = 'auto'
    data_config.train_subset = train_subset
    dataset = datasets.load_dataset(data_config, seed)
    names = ('train_images', 'train_labels', 'test_images', 'test_labels')
    return {name: getattr(dataset, name) for name in names}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the command line; prints the result as one JSON line."""
    args = parse_args(argv)
    arrays = load_arrays(args.data, args.train_subset, args.seed) if args.data else {}
    result = run(
        args.impl,
        model=args.model,
        batch_size=args.batch_size,
        dtype=args.dtype,
        steps=args.steps,
        epochs=args.epochs,
        warmup_steps=args.warmup_steps,
        num_workers=args.num_workers,
        compile=args.compile,
        device=args.device,
        seed=args.seed,
        **arrays,
    )
    line = json.dumps(result)
    print(line, flush=True)
    if args.json:
        with open(args.json, 'w') as f:
            f.write(line + '\n')
    return result


if __name__ == '__main__':
    main()
