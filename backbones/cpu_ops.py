"""Two ops that XLA:CPU runs far slower than their arithmetic needs, in a form it runs fast.

- A convolution whose kernel is larger than its input map (ResNet50's conv5 3x3 convs on
  2x2 maps at 64 px, cnn16's last block) falls to a generic Eigen path that takes ~100x its
  FLOPs; `conv_general_dilated` computes it as im2col (strided slices of the padded input,
  concatenated on channels) + one matmul, forward and backward.
- The gradient of a max-pool (`select_and_scatter`) is expanded on CPU into a reduce-window
  with index tuples and a scatter; `max_pool`'s gradient compares the window's strided
  slices with the pooled max and sends it, as select_and_scatter does, to the first
  maximum of each window (row-major), with plain selects and pads.

Both give the same values and gradients as the plain ops up to float summation order (the
pool exactly) and are used only where `jax.default_backend()` is "cpu" at trace time.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Padding = str | Sequence[tuple[int, int]]
_NHWC = ("NHWC", "HWIO", "NHWC")


def on_cpu() -> bool:
    """Whether computations trace for XLA:CPU (the default backend)."""
    return jax.default_backend() == "cpu"


def _is_nhwc(dimension_numbers) -> bool:
    if dimension_numbers is None:
        return False
    if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
        return dimension_numbers == lax.conv_dimension_numbers(
            (1, 1, 1, 1), (1, 1, 1, 1), _NHWC)
    return tuple(dimension_numbers) == _NHWC


def _windows(x: jax.Array, window: tuple[int, int], strides: tuple[int, int],
             padding: Sequence[tuple[int, int]], pad_value: float) -> list[jax.Array]:
    """The window's kh*kw strided views of padded NHWC `x`, each [B, Ho, Wo, C], row-major."""
    x = lax.pad(x, jnp.array(pad_value, x.dtype), ((0, 0, 0), *((lo, hi, 0) for lo, hi in padding),
                                                   (0, 0, 0)))
    (kh, kw), (sh, sw) = window, strides
    ho, wo = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
    return [lax.slice(x, (0, i, j, 0), (x.shape[0], i + sh * (ho - 1) + 1,
                                        j + sw * (wo - 1) + 1, x.shape[3]), (1, sh, sw, 1))
            for i in range(kh) for j in range(kw)]


def _pads(shape: Sequence[int], window: Sequence[int], strides: Sequence[int],
          padding: Padding) -> list[tuple[int, int]]:
    if isinstance(padding, str):
        return list(lax.padtype_to_pads(shape, window, strides, padding))
    return [tuple(p) for p in padding]


@jax.named_scope("im2col_conv")
def im2col_conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1),
                padding: Padding = "SAME") -> jax.Array:
    """NHWC x HWIO convolution as im2col + matmul (no dilation, no groups)."""
    kh, kw, c, o = kernel.shape
    pads = _pads(x.shape[1:3], (kh, kw), strides, padding)
    cols = jnp.concatenate(_windows(x, (kh, kw), tuple(strides), pads, 0.0), axis=-1)
    return lax.dot_general(cols, kernel.reshape(kh * kw * c, o), (((3,), (0,)), ((), ())))


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: Padding, lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None, dimension_numbers=None,
                         feature_group_count: int = 1, precision=None) -> jax.Array:
    """`lax.conv_general_dilated`, as im2col + matmul on CPU where the kernel exceeds the map.

    Drop-in for flax's `nn.Conv(conv_general_dilated=...)`; every other case (another
    backend, dilation, groups, a layout other than NHWC/HWIO) is the plain op.
    """
    plain = (not on_cpu() or not _is_nhwc(dimension_numbers) or feature_group_count != 1
             or any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
             or lhs.ndim != 4 or all(m >= k for m, k in zip(lhs.shape[1:3], rhs.shape[:2])))
    if plain:
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, precision=precision)
    return im2col_conv(lhs, rhs, window_strides, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _first_max_pool(x: jax.Array, window: tuple[int, int], strides: tuple[int, int],
                    padding: tuple[tuple[int, int], ...]) -> jax.Array:
    return lax.reduce_window(x, jnp.array(-jnp.inf, x.dtype), lax.max, (1, *window, 1), (1, *strides, 1),
                             ((0, 0), *padding, (0, 0)))


def _first_max_pool_fwd(x, window, strides, padding):
    top = _first_max_pool(x, window, strides, padding)
    return top, (x, top)


@jax.named_scope("max_pool_grad")
def _first_max_pool_bwd(window, strides, padding, residuals, g):
    """Each window's gradient to its first maximum (row-major), as select_and_scatter."""
    x, top = residuals
    taps, scatter = jax.vjp(lambda x: _windows(x, window, strides, padding, -jnp.inf), x)
    taken = jnp.zeros(top.shape, bool)
    grads = []
    for tap in taps:
        first = (tap == top) & ~taken
        grads.append(jnp.where(first, g, jnp.zeros_like(g)))
        taken = taken | first
    return scatter(grads)


_first_max_pool.defvjp(_first_max_pool_fwd, _first_max_pool_bwd)


def max_pool(x: jax.Array, window: Sequence[int], strides: Sequence[int] | None = None,
             padding: Padding = "VALID", *, fast: bool | None = None) -> jax.Array:
    """`flax.linen.max_pool` for NHWC `x`; on CPU (or `fast=True`) without select_and_scatter.

    Padding (like flax's) is with -inf; a window's gradient goes to its first maximum.
    """
    window = tuple(window)
    strides = tuple(strides or window)
    if not (on_cpu() if fast is None else fast):
        return nn.max_pool(x, window, strides=strides, padding=padding)
    return _first_max_pool(x, window, strides,
                           tuple(_pads(x.shape[1:3], window, strides, padding)))
