"""Small building blocks shared by the backbones: one place for dtype and BatchNorm settings.

Every layer computes in `dtype` (bf16 for mixed precision) and keeps float32 parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

Padding = str | Sequence[tuple[int, int]]


def conv(features: int, kernel: int, *, name: str, dtype: Any, strides: int = 1,
         padding: Padding = "SAME", use_bias: bool = True) -> nn.Conv:
    """A square `kernel` x `kernel` convolution, Keras Conv2D layout (kh, kw, in, out)."""
    return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding=padding,
                   use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name)


def batch_norm(*, train: bool, name: str, dtype: Any, axis_name: str | None,
               epsilon: float = 1e-3, use_scale: bool = True) -> nn.BatchNorm:
    """Keras-compatible BatchNorm (momentum 0.99; Keras's default epsilon 1e-3).

    Batch statistics are used and updated only when `train`; `axis_name` averages them
    across devices under pmap / shard_map.
    """
    return nn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=epsilon,
                        use_scale=use_scale, axis_name=axis_name, dtype=dtype,
                        param_dtype=jnp.float32, name=name)


def check_input(x: jnp.ndarray, name: str, min_size: int) -> None:
    """One-line ValueError unless `x` is an NHWC batch of 1 or 3 channels, >= min_size px."""
    if x.ndim != 4 or x.shape[-1] not in (1, 3) or min(x.shape[1:3]) < min_size:
        raise ValueError(f"{name} expects NHWC images with 1 or 3 channels and sides >= "
                         f"{min_size} px, got shape {tuple(x.shape)}")


def max_pool_if_fits(x: jnp.ndarray, window: int = 2) -> jnp.ndarray:
    """Max-pool `window` x `window`, stride `window`, 'valid' (Keras MaxPooling2D default).

    The pool is skipped while the feature map is smaller than the window, so deep plain
    CNNs accept small inputs (32 px) instead of shrinking to zero size; for inputs large
    enough to pool at every stage this is exactly Keras's layer.
    """
    if min(x.shape[1], x.shape[2]) < window:
        return x
    return nn.max_pool(x, (window, window), strides=(window, window), padding="VALID")


def scaled(channels: int, width: float) -> int:
    """`channels` times the width multiplier, at least 1."""
    return max(1, round(channels * width))
