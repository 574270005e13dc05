"""DenseNet121 mirroring `keras.applications.DenseNet121` layer for layer.

Every trunk submodule carries the Keras layer's name (`conv1_conv`, `conv2_block1_0_bn`, ...,
`bn`) and Keras's `predictions` lives under the shared `head` (head="imagenet"), so ImageNet
weights map one-to-one (see backbones/pretrained.py).
Keras facts kept: convs without bias, BatchNorm epsilon 1.001e-5 (momentum:
layers.BN_MOMENTUM), a zero pad before the 7x7 stem conv and before the stem max pool.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from backbones.heads import Head
from backbones.layers import batch_norm, check_input
from backbones.registry import register

BLOCKS = (6, 12, 24, 16)  # conv blocks per dense block
GROWTH_RATE = 32
BN_EPSILON = 1.001e-5
MIN_SIZE = 32  # Keras's smallest accepted input side



# Grad-CAM: the head's input is the final BN + ReLU (Keras "relu"; 7x7 at 224 px).
@register("densenet121", gradcam_layer="head")
class DenseNet121(nn.Module):
    """DenseNet121 trunk (Keras layout) followed by a classification head.

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
        bn = partial(batch_norm, train=train, dtype=self.dtype, axis_name=self.axis_name,
                     epsilon=BN_EPSILON)

        check_input(x, "densenet121", MIN_SIZE)
        x = jnp.asarray(x, self.dtype)
        x = jnp.pad(x, ((0, 0), (3, 3), (3, 3), (0, 0)))
        x = conv(64, (7, 7), strides=(2, 2), padding="VALID", name="conv1_conv")(x)
        x = nn.relu(bn(name="conv1_bn")(x))
        x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        x = nn.max_pool(x, (3, 3), strides=(2, 2))

        for stage, num_blocks in enumerate(BLOCKS, start=2):
            for i in range(1, num_blocks + 1):
                name = f"conv{stage}_block{i}"
                y = nn.relu(bn(name=f"{name}_0_bn")(x))
                y = conv(4 * GROWTH_RATE, (1, 1), name=f"{name}_1_conv")(y)
                y = nn.relu(bn(name=f"{name}_1_bn")(y))
                y = conv(GROWTH_RATE, (3, 3), padding="SAME", name=f"{name}_2_conv")(y)
                x = jnp.concatenate([x, y], axis=-1)
            if stage < len(BLOCKS) + 1:
                name = f"pool{stage}"
                x = nn.relu(bn(name=f"{name}_bn")(x))
                x = conv(x.shape[-1] // 2, (1, 1), name=f"{name}_conv")(x)
                x = nn.avg_pool(x, (2, 2), strides=(2, 2))

        x = nn.relu(bn(name="bn")(x))
        return Head(self.head, self.num_classes, dtype=self.dtype, name="head")(x, train=train)
