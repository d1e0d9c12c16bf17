"""ResNets for 32x32 images, in Flax linen.

One generic :class:`ResNet` (stage widths, blocks per stage, shortcut kind) and
named variants built by :func:`create_model`::

    model = create_model('paper', num_classes=10)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
    logits, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])

Variants:

* ``paper``: the network of the study "ResNet with Hyper Parameters Tuning" (its
  code calls it ResNet-18): 3x3 conv 3->16 + BN + ReLU, three stages of two basic
  blocks (16/32/64 channels, stride 2 entering stages 2 and 3), shortcuts that are
  a 3x3 conv (stride 2, padding 1) + BN where the shape changes, global average
  pool, dense 64->10. 195,738 trainable parameters.
* ``resnet18`` / ``resnet34``: the standard CIFAR ResNets (He et al. 2016 as
  adapted for CIFAR: 3x3 stem of 64, no max-pool, four stages 64..512, 1x1
  projection shortcuts). ResNet-18 has 11,173,962 trainable parameters.

Convolutions pad symmetrically like PyTorch's ``padding=k//2`` (Flax's ``'SAME'``
pads asymmetrically for stride 2). BatchNorm follows every convolution, before
the ReLU, with PyTorch's defaults expressed in Flax terms (momentum 0.9,
epsilon 1e-5). Weights start from PyTorch's default initialisation, as in the
study. Convolutions have no bias; there is no dropout.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_jax.models import conv as conv_lib
from resnet_jax.registry import Registry

ModuleDef = Any

# PyTorch's BatchNorm2d(momentum=0.1) is Flax's momentum=0.9.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


# PyTorch's default initialisation (the study's framework): kaiming_uniform with
# a=sqrt(5) for weights, i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)); the same bound
# for the dense bias. BatchNorm starts at scale 1, bias 0 in both libraries.
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def torch_bias_init(fan_in: int) -> Callable[..., jax.Array]:
    """``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, PyTorch's default Linear bias."""
    bound = 1.0 / fan_in**0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class Conv(nn.Module):
    """A bias-free ``nn.Conv`` (same ``kernel`` parameter, HWIO) computed by :func:`conv.conv2d`.

    Square kernels, equal strides, symmetric padding; on CPUs its gradients run
    as fast inside ``lax.scan`` as outside (see resnet_jax/conv.py).
    """

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
    use_bias: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable[..., jax.Array] = torch_kernel_init

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.use_bias or len(set(self.kernel_size)) > 1 or len(set(self.strides)) > 1:
            raise ValueError('Conv supports square kernels, equal strides and no bias')
        k = self.kernel_size[0]
        kernel = self.param(
            'kernel', self.kernel_init, (k, k, x.shape[-1], self.features), self.param_dtype
        )
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        return conv_lib.conv2d(x, kernel, self.strides[0], self.padding[0][0])


def _pad(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Symmetric padding equal to PyTorch's ``padding=kernel_size // 2``."""
    p = kernel_size // 2
    return ((p, p), (p, p))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection.

    ``shortcut_kernel`` is the kernel size of the projection used where the
    shape changes (3 in the study's network, 1 in the standard ResNets).
    """

    filters: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    shortcut_kernel: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        residual = x
        y = self.conv(self.filters, (3, 3), (self.strides, self.strides), padding=_pad(3))(x)
        y = nn.relu(self.norm()(y))
        y = self.conv(self.filters, (3, 3), padding=_pad(3))(y)
        y = self.norm()(y)
        if self.strides != 1 or x.shape[-1] != self.filters:
            k = self.shortcut_kernel
            residual = self.conv(
                self.filters,
                (k, k),
                (self.strides, self.strides),
                padding=_pad(k),
                name='shortcut_conv',
            )(x)
            residual = self.norm(name='shortcut_bn')(residual)
        return nn.relu(y + residual)


class ResNet(nn.Module):
    """A CIFAR-style ResNet: 3x3 stem, stages of basic blocks, average pool, dense.

    Attributes:
      stage_sizes: number of blocks in each stage.
      stage_widths: channels of each stage; stages after the first start with
        stride 2.
      stem_width: channels of the 3x3 stem convolution.
      shortcut_kernel: kernel size of projection shortcuts (3: the study, 1: He et al.).
      num_classes: output classes.
      dtype: computation dtype (parameters are always float32).
    """

    stage_sizes: Sequence[int]
    stage_widths: Sequence[int]
    stem_width: int
    shortcut_kernel: int = 1
    num_classes: int = 10
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        conv = functools.partial(
            Conv,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=torch_kernel_init,
        )
        norm = functools.partial(
            nn.BatchNorm,
            use_running_average=not train,
            momentum=BN_MOMENTUM,
            epsilon=BN_EPSILON,
            dtype=self.dtype,
            param_dtype=jnp.float32,
        )
        x = x.astype(self.dtype)
        x = conv(self.stem_width, (3, 3), padding=_pad(3), name='stem_conv')(x)
        x = nn.relu(norm(name='stem_bn')(x))
        for i, (blocks, width) in enumerate(zip(self.stage_sizes, self.stage_widths, strict=True)):
            for j in range(blocks):
                strides = 2 if i > 0 and j == 0 else 1
                x = BasicBlock(
                    width, strides, conv=conv, norm=norm, shortcut_kernel=self.shortcut_kernel
                )(x)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(
            self.num_classes,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=torch_kernel_init,
            bias_init=torch_bias_init(x.shape[-1]),
            name='head',
        )(x)
        return x.astype(jnp.float32)


# Models by name: ``make(num_classes=..., dtype=...)`` -> a flax module whose
# ``__call__(x, train)`` gives logits (BatchNorm statistics, if any, in
# ``batch_stats``). Register a new one with ``@MODELS.register('name')``.
MODELS: Registry[Callable[..., nn.Module]] = Registry('model')

PaperResNet = MODELS.register(
    'paper',
    functools.partial(
        ResNet, stage_sizes=(2, 2, 2), stage_widths=(16, 32, 64), stem_width=16, shortcut_kernel=3
    ),
)
ResNet18 = MODELS.register(
    'resnet18',
    functools.partial(
        ResNet, stage_sizes=(2, 2, 2, 2), stage_widths=(64, 128, 256, 512), stem_width=64
    ),
)
ResNet34 = MODELS.register(
    'resnet34',
    functools.partial(
        ResNet, stage_sizes=(3, 4, 6, 3), stage_widths=(64, 128, 256, 512), stem_width=64
    ),
)

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def create_model(name: str, num_classes: int = 10, dtype: str = 'float32') -> nn.Module:
    """Returns the registered model ``name`` (see the module docstring)."""
    make = MODELS.get(name)  # ValueError naming the choices.
    if dtype not in DTYPES:
        raise ValueError(f'unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}')
    return make(num_classes=num_classes, dtype=DTYPES[dtype])


def init_variables(model: nn.Module, rng: jax.Array, image_size: int = 32) -> dict[str, Any]:
    """Initialises ``{'params', 'batch_stats'}`` for NHWC inputs of ``image_size``."""
    x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    return dict(jax.jit(functools.partial(model.init, train=False))(rng, x))


def count_params(params: Any) -> int:
    """Number of trainable parameters in a parameter pytree."""
    return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))


def flops_per_image(model: nn.Module, variables: Any, image_size: int = 32) -> float:
    """Forward FLOPs for one image, as XLA's cost analysis counts them.

    ``variables`` may be arrays or ``jax.ShapeDtypeStruct``s; nothing is
    compiled. XLA counts every operation (BatchNorm, ReLU and pooling too) and
    skips the multiply-adds of zero padding, so for these networks it gives
    7-13% fewer than fvcore/ptflops-style counters (2 x multiply-adds).
    """
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    lowered = jax.jit(functools.partial(model.apply, train=False)).lower(variables, x)
    cost = lowered.cost_analysis() or lowered.compile().cost_analysis()
    if isinstance(cost, list | tuple):  # One entry per computation in older JAX.
        cost = cost[0]
    return float(cost['flops'])
