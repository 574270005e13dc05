"""InceptionV3 mirroring `keras.applications.InceptionV3` layer for layer.

Keras builds every conv + BatchNorm pair through `conv2d_bn` without names, so its layers
are called `conv2d`, `conv2d_1`, ... and `batch_normalization`, ... in creation order; this
module creates them in the same order under the same names (the weight import maps a file's
generated names by order, whatever counter offset the file was saved with).
Keras facts kept: convs without bias, BatchNorm epsilon 1e-3 and no scale (momentum:
layers.BN_MOMENTUM), 3x3 "same" average pools that exclude the padding from the mean.
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
MIN_SIZE = 75  # Keras's smallest accepted input side


# Grad-CAM: the head's input is the output of mixed10 (Keras "mixed10"; 8x8 at 299 px).
@register("inception_v3", gradcam_layer="head")
class InceptionV3(nn.Module):
    """InceptionV3 trunk (Keras layout) followed by a classification head.

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
        counter = iter(range(94))

        def conv_bn(x: jnp.ndarray, features: int, kh: int, kw: int,
                    strides: int = 1, padding: str = "SAME") -> jnp.ndarray:
            k = next(counter)
            suffix = f"_{k}" if k else ""
            x = nn.Conv(features, (kh, kw), strides=(strides, strides), padding=padding,
                        use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                        name=f"conv2d{suffix}")(x)
            x = batch_norm(train=train, dtype=self.dtype, axis_name=self.axis_name,
                           epsilon=BN_EPSILON, use_scale=False,
                           name=f"batch_normalization{suffix}")(x)
            return nn.relu(x)

        avg3 = partial(nn.avg_pool, window_shape=(3, 3), strides=(1, 1), padding="SAME",
                       count_include_pad=False)
        max3 = partial(nn.max_pool, window_shape=(3, 3), strides=(2, 2))
        cat = partial(jnp.concatenate, axis=-1)

        check_input(x, "inception_v3", MIN_SIZE)
        x = jnp.asarray(x, self.dtype)
        x = conv_bn(x, 32, 3, 3, strides=2, padding="VALID")
        x = conv_bn(x, 32, 3, 3, padding="VALID")
        x = conv_bn(x, 64, 3, 3)
        x = max3(x)
        x = conv_bn(x, 80, 1, 1, padding="VALID")
        x = conv_bn(x, 192, 3, 3, padding="VALID")
        x = max3(x)

        # mixed0-2: 35x35 blocks.
        for pool_features in (32, 64, 64):
            b1 = conv_bn(x, 64, 1, 1)
            b5 = conv_bn(conv_bn(x, 48, 1, 1), 64, 5, 5)
            b3 = conv_bn(conv_bn(conv_bn(x, 64, 1, 1), 96, 3, 3), 96, 3, 3)
            bp = conv_bn(avg3(x), pool_features, 1, 1)
            x = cat([b1, b5, b3, bp])

        # mixed3: reduction to 17x17.
        b3 = conv_bn(x, 384, 3, 3, strides=2, padding="VALID")
        bd = conv_bn(conv_bn(conv_bn(x, 64, 1, 1), 96, 3, 3), 96, 3, 3, strides=2,
                     padding="VALID")
        x = cat([b3, bd, max3(x)])

        # mixed4-7: 17x17 blocks with factorised 7x7 convs.
        for c in (128, 160, 160, 192):
            b1 = conv_bn(x, 192, 1, 1)
            b7 = conv_bn(conv_bn(conv_bn(x, c, 1, 1), c, 1, 7), 192, 7, 1)
            bd = conv_bn(x, c, 1, 1)
            bd = conv_bn(conv_bn(bd, c, 7, 1), c, 1, 7)
            bd = conv_bn(conv_bn(bd, c, 7, 1), 192, 1, 7)
            bp = conv_bn(avg3(x), 192, 1, 1)
            x = cat([b1, b7, bd, bp])

        # mixed8: reduction to 8x8.
        b3 = conv_bn(conv_bn(x, 192, 1, 1), 320, 3, 3, strides=2, padding="VALID")
        b7 = conv_bn(conv_bn(conv_bn(x, 192, 1, 1), 192, 1, 7), 192, 7, 1)
        b7 = conv_bn(b7, 192, 3, 3, strides=2, padding="VALID")
        x = cat([b3, b7, max3(x)])

        # mixed9-10: 8x8 blocks with split 1x3 / 3x1 branches.
        for _ in range(2):
            b1 = conv_bn(x, 320, 1, 1)
            b3 = conv_bn(x, 384, 1, 1)
            b3 = cat([conv_bn(b3, 384, 1, 3), conv_bn(b3, 384, 3, 1)])
            bd = conv_bn(conv_bn(x, 448, 1, 1), 384, 3, 3)
            bd = cat([conv_bn(bd, 384, 1, 3), conv_bn(bd, 384, 3, 1)])
            bp = conv_bn(avg3(x), 192, 1, 1)
            x = cat([b1, b3, bd, bp])

        return Head(self.head, self.num_classes, dtype=self.dtype, name="head")(x, train=train)
