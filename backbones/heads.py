"""Classifier heads shared by every backbone.

A backbone computes its trunk feature map [B, H, W, C] and hands it to `Head`, always as
the submodule named "head", so the head's parameters are `params["head"]` for every model
(handy for freezing the trunk or giving the head its own learning rate).

Kinds:
  linear            global average pool + Dense(num_classes)
  dense1024         pool + Dense 1024 ReLU + Dense(num_classes)
  dense512_dropout  pool + Dense 512 ReLU + Dropout 0.2 + Dense(num_classes)
  features          pool only (num_classes must be None): Keras include_top=False,
                    pooling="avg"; this is how to read the trunk output
  imagenet          Keras's own top for the model: by default avg_pool + predictions
                    (ResNet, DenseNet, Xception, Inception); VGG passes
                    `imagenet_flatten=True, imagenet_hidden=(4096, 4096)` for flatten +
                    fc1 + fc2 + predictions. The Dense layers carry the Keras names
                    (fc1, fc2, predictions) under "head", so an importer maps Keras
                    "predictions" to params["head"]["predictions"]. The output is logits;
                    their softmax equals Keras's `predictions` output. For the custom
                    CNNs this is the seed reports' original top (flatten + Dense ReLU
                    [+ Dropout] + output), see backbones/cnns.py.

Outputs are float32 whatever the compute dtype.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

HEADS: tuple[str, ...] = ("linear", "dense1024", "dense512_dropout", "features", "imagenet")

# kind -> (width of the hidden ReLU layer or None, dropout rate after it)
_POOLED_MLPS: dict[str, tuple[int | None, float]] = {
    "linear": (None, 0.0),
    "dense1024": (1024, 0.0),
    "dense512_dropout": (512, 0.2),
}


def check_head(head: str, num_classes: int | None) -> None:
    """Raise a one-line error unless `head` is known and agrees with `num_classes`."""
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; known heads: {', '.join(HEADS)}")
    if head == "features":
        if num_classes is not None:
            raise ValueError(f"head='features' outputs pooled features: num_classes must be "
                             f"None, got {num_classes!r}")
    elif isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"head={head!r} needs num_classes to be a positive int, "
                         f"got {num_classes!r}")


def global_avg_pool(x: jnp.ndarray) -> jnp.ndarray:
    """[B, H, W, C] -> [B, C], averaged in float32 so bf16 trunks keep precision."""
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


class Head(nn.Module):
    """Maps a trunk feature map [B, H, W, C] to float32 logits [B, num_classes].

    For kind="features" it returns the pooled features [B, C] instead.
    """

    kind: str
    num_classes: int | None
    dtype: Any = jnp.float32
    imagenet_flatten: bool = False
    imagenet_hidden: tuple[int, ...] = ()
    imagenet_dropout: float = 0.0  # after each hidden layer of the imagenet top

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        check_head(self.kind, self.num_classes)
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=jnp.float32)
        if self.kind == "features":
            return global_avg_pool(x)
        if self.kind == "imagenet":
            if self.imagenet_flatten:  # Keras Flatten on NHWC: row-major over (H, W, C)
                x = x.reshape((x.shape[0], -1))
            else:
                x = global_avg_pool(x)
            for i, width in enumerate(self.imagenet_hidden, start=1):
                x = nn.relu(dense(width, name=f"fc{i}")(x))
                if self.imagenet_dropout:
                    x = nn.Dropout(self.imagenet_dropout, deterministic=not train)(x)
            return dense(self.num_classes, name="predictions")(x).astype(jnp.float32)
        hidden, rate = _POOLED_MLPS[self.kind]
        x = global_avg_pool(x)
        if hidden:
            x = nn.relu(dense(hidden, name="hidden")(x))
        if rate:
            x = nn.Dropout(rate, deterministic=not train)(x)
        return dense(self.num_classes, name="logits")(x).astype(jnp.float32)
