"""Xception mirroring `keras.applications.Xception` layer for layer.

Named Keras layers keep their names (`block1_conv1`, `block1_conv1_bn`, `block2_sepconv1`,
...). The four residual 1x1 convs and their BatchNorms are unnamed in Keras, which calls
them `conv2d`, `conv2d_1`, ... and `batch_normalization`, ... in creation order; this module
uses exactly those names, and the weight import maps them by order.
Keras facts kept: convs without bias, BatchNorm epsilon 1e-3 (momentum:
layers.BN_MOMENTUM), a separable conv is a depthwise 3x3 (depth multiplier 1) followed by a
pointwise 1x1.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from backbones.heads import Head
from backbones.layers import batch_norm, check_input
from backbones.registry import register

BN_EPSILON = 1e-3
MIN_SIZE = 71  # Keras's smallest accepted input side


class SeparableConv(nn.Module):
    """Keras SeparableConv2D without bias: depthwise conv, then a 1x1 pointwise conv.

    The depthwise kernel is Flax's grouped layout (kh, kw, 1, in); Keras stores
    (kh, kw, in, 1), which the weight import transposes.
    """

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = nn.Conv(x.shape[-1], self.kernel_size, padding="SAME", use_bias=False,
                    feature_group_count=x.shape[-1], dtype=self.dtype,
                    param_dtype=jnp.float32, name="depthwise")(x)
        return nn.Conv(self.features, (1, 1), use_bias=False, dtype=self.dtype,
                       param_dtype=jnp.float32, name="pointwise")(x)


# Grad-CAM: the head's input is block14_sepconv2_act (Keras's name; 7x7 at 299 px).
@register("xception", gradcam_layer="head")
class Xception(nn.Module):
    """Xception trunk (Keras layout) followed by a classification head.

    Attributes:
      num_classes: outputs of the head (None only with head="features").
      head: "imagenet" (Keras's top: avg_pool + predictions) or a name from backbones.heads.
      dtype: compute dtype; parameters stay float32.
      axis_name: mapped axis over which BatchNorm averages batch statistics.
    """

    num_classes: int | None
    head: str = "linear"
    dtype: Any = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        conv = partial(nn.Conv, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32)
        sepconv = partial(SeparableConv, dtype=self.dtype)
        bn = partial(batch_norm, train=train, dtype=self.dtype, axis_name=self.axis_name,
                     epsilon=BN_EPSILON)
        unnamed = iter(range(4))

        def residual(x: jnp.ndarray, features: int) -> jnp.ndarray:
            k = next(unnamed)
            suffix = f"_{k}" if k else ""
            x = conv(features, (1, 1), strides=(2, 2), padding="SAME",
                     name=f"conv2d{suffix}")(x)
            return bn(name=f"batch_normalization{suffix}")(x)

        def pool(x: jnp.ndarray) -> jnp.ndarray:
            return nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")

        check_input(x, "xception", MIN_SIZE)
        x = jnp.asarray(x, self.dtype)
        x = conv(32, (3, 3), strides=(2, 2), padding="VALID", name="block1_conv1")(x)
        x = nn.relu(bn(name="block1_conv1_bn")(x))
        x = conv(64, (3, 3), padding="VALID", name="block1_conv2")(x)
        x = nn.relu(bn(name="block1_conv2_bn")(x))

        # Entry flow: blocks 2-4 halve the resolution with a strided 1x1 shortcut.
        for block, features in ((2, 128), (3, 256), (4, 728)):
            shortcut = residual(x, features)
            if block > 2:
                x = nn.relu(x)
            x = sepconv(features, name=f"block{block}_sepconv1")(x)
            x = nn.relu(bn(name=f"block{block}_sepconv1_bn")(x))
            x = sepconv(features, name=f"block{block}_sepconv2")(x)
            x = bn(name=f"block{block}_sepconv2_bn")(x)
            x = pool(x) + shortcut

        # Middle flow: eight identity-shortcut blocks of three separable convs.
        for block in range(5, 13):
            shortcut = x
            for j in (1, 2, 3):
                x = nn.relu(x)
                x = sepconv(728, name=f"block{block}_sepconv{j}")(x)
                x = bn(name=f"block{block}_sepconv{j}_bn")(x)
            x = x + shortcut

        # Exit flow.
        shortcut = residual(x, 1024)
        x = nn.relu(x)
        x = sepconv(728, name="block13_sepconv1")(x)
        x = nn.relu(bn(name="block13_sepconv1_bn")(x))
        x = sepconv(1024, name="block13_sepconv2")(x)
        x = bn(name="block13_sepconv2_bn")(x)
        x = pool(x) + shortcut
        x = sepconv(1536, name="block14_sepconv1")(x)
        x = nn.relu(bn(name="block14_sepconv1_bn")(x))
        x = sepconv(2048, name="block14_sepconv2")(x)
        x = nn.relu(bn(name="block14_sepconv2_bn")(x))
        return Head(self.head, self.num_classes, dtype=self.dtype, name="head")(x, train=train)
