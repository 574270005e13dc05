"""Grad-CAM (Selvaraju et al. 2017) for every registered backbone, without touching the models.

The feature map A [B, h, w, C] is the input of the backbone's `gradcam_layer` submodule
(backbones.registry: "head" for every backbone here, i.e. the last conv block's rectified
output). It is read, and for the gradient replaced by a free array, through
`flax.linen.intercept_methods`, so modules and saved variables stay exactly as trained. For
class c with logit y^c (pre-softmax, as in the paper):

    alpha_k = mean over (i, j) of dy^c / dA_ijk       (spatial mean of the gradient)
    map     = ReLU(sum_k alpha_k A_k)                  [B, h, w], raw (not normalised)

`gradcam` runs under jit on a whole batch; `upsample` brings maps to an image size
(jax.image.resize, bilinear) and `normalise` scales each to [0, 1] by its maximum. The model
runs in inference mode (BatchNorm running statistics, no dropout), so an example's score
depends on that example only and the gradient of the batch's summed scores is every
example's own gradient.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class GradCam(NamedTuple):
    """Raw maps [B, h, w] (>= 0), the explained class [B] and its softmax probability [B]."""

    maps: jax.Array
    class_index: jax.Array
    probability: jax.Array


def features_and_logits(model: nn.Module, variables: Any, images: jax.Array, layer: str,
                        features: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(logits [B, K], the input of submodule `layer` [B, h, w, C]) in inference mode.

    With `features`, the layer receives them instead of what the trunk computed, so the
    logits are a function of `features` (under jit the unused trunk is dropped)."""
    path = tuple(layer.split("/"))
    seen: list[jax.Array] = []

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and context.module.path == path:
            if features is not None:
                args = (features, *args[1:])
            seen.append(args[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        logits = model.apply(variables, images, train=False)
    if len(seen) != 1:
        raise ValueError(f"Grad-CAM layer {layer!r} was called {len(seen)} times by "
                         f"{type(model).__name__}; it must be called exactly once")
    return logits, seen[0]


def linear_map(features: jax.Array, gradients: jax.Array) -> jax.Array:
    """sum_k alpha_k A_k with alpha = the spatial mean of `gradients`: [B, h, w], before the
    ReLU (maps of several members' feature maps add up before it)."""
    alpha = jnp.mean(gradients.astype(jnp.float32), axis=(1, 2))               # [B, C]
    return jnp.einsum("bhwc,bc->bhw", features.astype(jnp.float32), alpha)


def class_map(model: nn.Module, variables: Any, images: jax.Array, features: jax.Array,
              class_index: jax.Array, layer: str) -> jax.Array:
    """Raw Grad-CAM maps [B, h, w] of `class_index` [B] given the layer's `features` (the
    trunk is not differentiated; under jit it is not even run)."""

    def score(a: jax.Array) -> jax.Array:
        z, _ = features_and_logits(model, variables, images, layer, features=a)
        return jnp.take_along_axis(z, class_index[:, None], axis=1).sum()

    return nn.relu(linear_map(features, jax.grad(score)(features)))


def gradcam_maps(model: nn.Module, variables: Any, images: jax.Array, class_index: jax.Array,
                 layer: str) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(raw maps [B, h, w], explained class [B], logits [B, K], features [B, h, w, C]);
    pure, not jitted. `class_index` [B] int: the class to explain, -1 for the argmax."""
    logits, features = features_and_logits(model, variables, images, layer)
    chosen = jnp.where(class_index < 0, jnp.argmax(logits, axis=-1), class_index)
    return class_map(model, variables, images, features, chosen, layer), chosen, logits, features


@functools.partial(jax.jit, static_argnames=("model", "layer"))
def _gradcam(model, variables, images, class_index, layer):
    maps, chosen, logits, _ = gradcam_maps(model, variables, images, class_index, layer)
    proba = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return GradCam(maps, chosen, jnp.take_along_axis(proba, chosen[:, None], axis=1)[:, 0])


def gradcam(model: nn.Module, variables: Any, images: jax.Array,
            class_index: int | np.ndarray | None = None, *, layer: str) -> GradCam:
    """Grad-CAM of a batch of model inputs [B, H, W, C] (jit-compiled per model and shape).

    `class_index`: None explains each image's predicted class (argmax of the logits), an int
    or [B] ints that class; `layer`: `backbones.gradcam_layer(name)` of the model's backbone.
    """
    b = images.shape[0]
    index = np.full(b, -1) if class_index is None else np.broadcast_to(class_index, (b,))
    index = np.asarray(index)
    k = getattr(model, "num_classes", None)
    if not np.issubdtype(index.dtype, np.integer) or (
            class_index is not None and (index.min() < 0 or (k is not None and index.max() >= k))):
        raise ValueError(f"class_index must be None or class indices in [0, {k}), "
                         f"got {class_index!r}")
    return _gradcam(model, variables, jnp.asarray(images), jnp.asarray(index, jnp.int32), layer)


def upsample(maps: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Maps [B, h, w] resized to [B, *size] (bilinear, half-pixel centres as the images)."""
    return jax.image.resize(jnp.asarray(maps, jnp.float32), (maps.shape[0], *size), "bilinear")


def normalise(maps: jax.Array) -> jax.Array:
    """Each map divided by its maximum, into [0, 1]; an all-zero map stays zero."""
    top = jnp.max(maps, axis=(1, 2), keepdims=True)
    return jnp.where(top > 0, maps / jnp.where(top > 0, top, 1.0), 0.0)
