"""ResNet v1 as in Keras applications (ResNet50/101) plus basic-block ResNet18/34.

Keras details kept so ImageNet weights import by layer name: zero-pad 3 + 7x7/2 conv1_conv,
zero-pad 1 + 3x3/2 max-pool, bottleneck stride on the block's first 1x1 conv, convolutions
with bias, BatchNorm epsilon 1.001e-5, layers named conv{stage}_block{b}_{k}_{conv,bn}
(k = 0 for the projection shortcut, present where the shape changes: each stage's block1).
head="imagenet" is avg_pool + predictions (ResNet50: 25,636,712 parameters incl. BN moving
statistics). Inputs need sides >= 32 px, as in Keras. From scratch, each residual branch's
last BatchNorm starts with scale 0 (Goyal et al. 2017, as Flax's ImageNet example), so every
block starts as the identity and a deep stack trains from the first step; imported weights
replace the scales.

ResNet18/34 (not in Keras) use the same code with basic blocks (two 3x3 convs, `_1_` and
`_2_`), a projection shortcut only where the shape changes, as in He et al. 2016.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from backbones import cpu_ops
from backbones.heads import Head
from backbones.layers import batch_norm, check_input, conv, scaled
from backbones.registry import register

_EPSILON = 1.001e-5
MIN_SIZE = 32  # Keras's smallest accepted input side


class ResNet(nn.Module):
    """ResNet v1 trunk (`stage_sizes` blocks per stage, conv2..conv5) + head."""

    num_classes: int | None
    stage_sizes: tuple[int, ...]
    bottleneck: bool = True
    head: str = "linear"
    dtype: Any = jnp.float32
    axis_name: str | None = None
    width: float = 1.0
    arch: str = "resnet"  # the registered name, for error messages

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
        conv_ = functools.partial(conv, dtype=self.dtype)
        norm = functools.partial(batch_norm, train=train, dtype=self.dtype,
                                 axis_name=self.axis_name, epsilon=_EPSILON)

        check_input(x, self.arch, MIN_SIZE)
        x = x.astype(self.dtype)
        x = conv_(scaled(64, self.width), 7, strides=2, padding=((3, 3), (3, 3)),
                  name="conv1_conv")(x)
        x = nn.relu(norm(name="conv1_bn")(x))
        x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))  # Keras pads zeros, after a ReLU
        x = cpu_ops.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")

        block = self._bottleneck if self.bottleneck else self._basic
        for stage, num_blocks in enumerate(self.stage_sizes, start=2):
            filters = scaled(64 * 2 ** (stage - 2), self.width)
            for b in range(1, num_blocks + 1):
                stride = 2 if b == 1 and stage > 2 else 1
                x = block(x, filters, stride, f"conv{stage}_block{b}", conv_, norm)
        return Head(self.head, self.num_classes, self.dtype, name="head")(x, train=train)

    @staticmethod
    def _bottleneck(x: jnp.ndarray, filters: int, stride: int, name: str,
                    conv_: Callable[..., nn.Conv], norm: Callable[..., nn.BatchNorm]
                    ) -> jnp.ndarray:
        """Keras `block1`: 1x1/stride, 3x3, 1x1 x4; projection where the shape changes."""
        shortcut = x
        if stride != 1 or x.shape[-1] != 4 * filters:
            shortcut = conv_(4 * filters, 1, strides=stride, padding="VALID",
                             name=f"{name}_0_conv")(x)
            shortcut = norm(name=f"{name}_0_bn")(shortcut)
        x = conv_(filters, 1, strides=stride, padding="VALID", name=f"{name}_1_conv")(x)
        x = nn.relu(norm(name=f"{name}_1_bn")(x))
        x = conv_(filters, 3, name=f"{name}_2_conv")(x)
        x = nn.relu(norm(name=f"{name}_2_bn")(x))
        x = conv_(4 * filters, 1, padding="VALID", name=f"{name}_3_conv")(x)
        x = norm(name=f"{name}_3_bn", scale_init=nn.initializers.zeros)(x)
        return nn.relu(shortcut + x)

    @staticmethod
    def _basic(x: jnp.ndarray, filters: int, stride: int, name: str,
               conv_: Callable[..., nn.Conv], norm: Callable[..., nn.BatchNorm]
               ) -> jnp.ndarray:
        """Two 3x3 convs (the first strided); projection shortcut where the shape changes."""
        shortcut = x
        if stride != 1 or x.shape[-1] != filters:
            shortcut = conv_(filters, 1, strides=stride, padding="VALID",
                             name=f"{name}_0_conv")(x)
            shortcut = norm(name=f"{name}_0_bn")(shortcut)
        x = conv_(filters, 3, strides=stride, padding=((1, 1), (1, 1)),
                  name=f"{name}_1_conv")(x)
        x = nn.relu(norm(name=f"{name}_1_bn")(x))
        x = conv_(filters, 3, name=f"{name}_2_conv")(x)
        x = norm(name=f"{name}_2_bn", scale_init=nn.initializers.zeros)(x)
        return nn.relu(shortcut + x)


def _register_resnet(name: str, stage_sizes: tuple[int, ...],
                     bottleneck: bool) -> Callable[..., ResNet]:
    """Register, as `name`, a factory for the ResNet with these blocks per stage."""

    def factory(*, num_classes: int | None, head: str = "linear", dtype: Any = jnp.float32,
                axis_name: str | None = None, width: float = 1.0) -> ResNet:
        return ResNet(num_classes=num_classes, stage_sizes=stage_sizes, bottleneck=bottleneck,
                      head=head, dtype=dtype, axis_name=axis_name, width=width, arch=name)

    # Grad-CAM: the head's input is the last block's output (Keras "conv5_block3_out").
    return register(name, gradcam_layer="head")(factory)


resnet18 = _register_resnet("resnet18", (2, 2, 2, 2), bottleneck=False)
resnet34 = _register_resnet("resnet34", (3, 4, 6, 3), bottleneck=False)
resnet50 = _register_resnet("resnet50", (3, 4, 6, 3), bottleneck=True)
resnet101 = _register_resnet("resnet101", (3, 4, 23, 3), bottleneck=True)
