"""The --precision flag: which compute dtype the model runs in (parameters stay float32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

PRECISIONS = ("fp32", "bf16", "auto")


def compute_dtype(precision: str, backend: str | None = None) -> jnp.dtype:
    """fp32 -> float32, bf16 -> bfloat16, auto -> bfloat16 on GPU/TPU and float32 on CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        backend = backend or jax.default_backend()
        precision = "bf16" if backend in ("gpu", "tpu", "cuda", "rocm") else "fp32"
    return jnp.bfloat16 if precision == "bf16" else jnp.float32
