"""Per-example losses and the weighted sums the train step reduces over devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jax.Array, labels: jax.Array, *, label_smoothing: float = 0.0
                  ) -> jax.Array:
    """Per-example softmax cross-entropy in float32, with optional label smoothing."""
    logits = logits.astype(jnp.float32)
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def weighted_sums(logits: jax.Array, labels: jax.Array, weights: jax.Array, *,
                  label_smoothing: float = 0.0) -> dict[str, jax.Array]:
    """Local (per-shard) sums: weighted loss, weighted correct count, total weight, count.

    Dividing the psum of `loss` by the psum of `weight` gives the global weighted mean, which
    is why the step works with sums rather than local means.
    """
    weights = weights.astype(jnp.float32)
    ce = cross_entropy(logits, labels, label_smoothing=label_smoothing)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return {"loss": jnp.sum(weights * ce), "correct": jnp.sum(weights * correct),
            "weight": jnp.sum(weights), "count": jnp.sum((weights > 0).astype(jnp.float32))}
