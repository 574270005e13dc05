"""Small building blocks shared by the backbones: one place for dtype and BatchNorm settings.

Every layer computes in `dtype` (bf16 for mixed precision) and keeps float32 parameters.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from backbones import cpu_ops

Padding = str | Sequence[tuple[int, int]]


def conv(features: int, kernel: int, *, name: str, dtype: Any, strides: int = 1,
         padding: Padding = "SAME", use_bias: bool = True) -> nn.Conv:
    """A square `kernel` x `kernel` convolution, Keras Conv2D layout (kh, kw, in, out).

    On CPU a kernel larger than its input map runs as im2col + matmul (`cpu_ops`).
    """
    return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding=padding,
                   use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name,
                   conv_general_dilated=cpu_ops.conv_general_dilated)


# Top-level submodules whose BatchNorm runs in inference mode even when train=True.
_FROZEN: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar(
    "frozen_batch_norm", default=frozenset())


@contextlib.contextmanager
def frozen_batch_norm(modules: Iterable[str]) -> Iterator[None]:
    """While active, BatchNorm inside the named top-level submodules uses (and keeps) its
    running statistics, whatever `train` says.

    The train step enters it around `apply`, so it acts at trace time and the compiled step
    stays pure: frozen stages normalise exactly as at inference while the trainable stages'
    BatchNorm and the head's dropout run in train mode. A layer's top-level submodule is the
    first element of its module path (relative to the module `apply` was called on), so
    BatchNorm nested inside a submodule resolves to that submodule.
    """
    token = _FROZEN.set(frozenset(modules))
    try:
        yield
    finally:
        _FROZEN.reset(token)


class BatchNorm(nn.BatchNorm):
    """nn.BatchNorm in train mode when `train`, unless its top-level submodule is frozen."""

    train: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, mask: jnp.ndarray | None = None) -> jnp.ndarray:
        frozen = bool(self.path) and self.path[0] in _FROZEN.get()
        return super().__call__(x, use_running_average=not self.train or frozen, mask=mask)


# Running-statistics momentum. Keras uses 0.99, which keeps 60% of the initial (0, 1) statistics
# after 50 steps: a short run (the CPU defaults: tens of steps) then evaluates with statistics
# that match no weights and predicts one class. 0.9, as Flax's ImageNet example and PyTorch
# (momentum 0.1), forgets the start within ~40 steps. Inference and imported weights are
# unaffected: momentum only changes how training updates the statistics.
BN_MOMENTUM = 0.9


def batch_norm(*, train: bool, name: str, dtype: Any, axis_name: str | None,
               epsilon: float = 1e-3, use_scale: bool = True,
               scale_init: Callable[..., jax.Array] = nn.initializers.ones) -> BatchNorm:
    """BatchNorm with Keras's default epsilon 1e-3 and momentum `BN_MOMENTUM`.

    Batch statistics are used and updated only when `train` and the layer is not inside a
    `frozen_batch_norm` submodule; `axis_name` averages them across devices under pmap /
    shard_map. `scale_init=zeros` on a residual branch's last BatchNorm starts the block as
    the identity.
    """
    return BatchNorm(train=train, momentum=BN_MOMENTUM, epsilon=epsilon, use_scale=use_scale,
                     scale_init=scale_init, axis_name=axis_name, dtype=dtype,
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
    enough to pool at every stage this is exactly Keras's layer (`cpu_ops.max_pool`: on CPU
    without select_and_scatter).
    """
    if min(x.shape[1], x.shape[2]) < window:
        return x
    return cpu_ops.max_pool(x, (window, window), strides=(window, window), padding="VALID")


def scaled(channels: int, width: float) -> int:
    """`channels` times the width multiplier, at least 1."""
    return max(1, round(channels * width))
