"""The custom CNNs of the seed reports, as one plain conv-stack module.

`PlainCNN` is blocks of 3x3 'same' convolutions (+ BatchNorm) + ReLU, each block ending in a
2x2 max-pool, then the head. The pool is skipped once the map is below 2x2
(`layers.max_pool_if_fits`), so the models here accept any input side (1 or 3 channels):
cnn16's six pools need 64 px, at 32 px its last block keeps the 1x1 map.

head="imagenet" gives each model the top its report used, on the flattened map:
  simple_cnn   Conv32-pool, Conv64-pool;            top Dense 128 ReLU + output
  complex_cnn  Conv32/64/128/128, each + pool;      top Dense 512 ReLU + Dropout 0.5 + output
  cnn16        Conv64/64/128/128/256/256, each + pool; top Dense 512 ReLU + Dropout 0.2 + output
  cnn_bn3x2    3 x [two Conv+BN+ReLU] 32/64/128 + pool; top Dense 128 ReLU + output
The pooled heads ("linear", "dense1024", ...) work at any input size. Convs before a
BatchNorm have no bias (BN's offset replaces it). `width` multiplies every conv's channels
(tests use tiny widths); the top's Dense widths stay as published.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from backbones.heads import Head
from backbones.layers import batch_norm, check_input, conv, max_pool_if_fits, scaled
from backbones.registry import register


class PlainCNN(nn.Module):
    """Conv blocks named like Keras's VGG (block{i}_conv{j}, block{i}_bn{j}) + a head."""

    num_classes: int | None
    blocks: tuple[tuple[int, ...], ...]
    head: str = "linear"
    dtype: Any = jnp.float32
    axis_name: str | None = None
    use_batch_norm: bool = False
    width: float = 1.0
    top_hidden: tuple[int, ...] = ()
    top_dropout: float = 0.0
    min_size: int = 1
    arch: str = "plain_cnn"  # the registered name, for error messages

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
        check_input(x, self.arch, self.min_size)
        x = x.astype(self.dtype)
        for i, channels in enumerate(self.blocks, start=1):
            for j, c in enumerate(channels, start=1):
                x = conv(scaled(c, self.width), 3, name=f"block{i}_conv{j}", dtype=self.dtype,
                         use_bias=not self.use_batch_norm)(x)
                if self.use_batch_norm:
                    x = batch_norm(train=train, name=f"block{i}_bn{j}", dtype=self.dtype,
                                   axis_name=self.axis_name)(x)
                x = nn.relu(x)
            x = max_pool_if_fits(x)
        return Head(self.head, self.num_classes, self.dtype, imagenet_flatten=True,
                    imagenet_hidden=self.top_hidden, imagenet_dropout=self.top_dropout,
                    name="head")(x, train=train)


def register_plain_cnn(name: str, blocks: tuple[tuple[int, ...], ...],
                       **options: Any) -> Callable[..., PlainCNN]:
    """Register, as `name`, a factory for the PlainCNN with these conv blocks and options."""

    def factory(*, num_classes: int | None, head: str = "linear", dtype: Any = jnp.float32,
                axis_name: str | None = None, width: float = 1.0) -> PlainCNN:
        return PlainCNN(num_classes=num_classes, blocks=blocks, head=head, dtype=dtype,
                        axis_name=axis_name, width=width, arch=name, **options)

    # Grad-CAM: the head's input is the last block's pooled map (VGG: Keras "block5_pool").
    return register(name, gradcam_layer="head")(factory)


simple_cnn = register_plain_cnn("simple_cnn", ((32,), (64,)), top_hidden=(128,))
complex_cnn = register_plain_cnn(
    "complex_cnn", ((32,), (64,), (128,), (128,)), top_hidden=(512,), top_dropout=0.5)
cnn16 = register_plain_cnn(
    "cnn16", ((64,), (64,), (128,), (128,), (256,), (256,)), top_hidden=(512,),
    top_dropout=0.2)
cnn_bn3x2 = register_plain_cnn(
    "cnn_bn3x2", ((32, 32), (64, 64), (128, 128)), use_batch_norm=True, top_hidden=(128,))
