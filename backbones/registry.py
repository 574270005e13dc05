"""Backbones looked up by name, big_vision style.

A model module registers a factory under a name, with the layer Grad-CAM reads
(`gradcam_layer`); `create` checks the head / class-count combination once, here, so every
backbone fails the same way on bad input.

    @register("resnet50", gradcam_layer="head")
    class ResNet50(nn.Module):
        num_classes: int | None
        head: str = "linear"
        dtype: Any = jnp.float32
        axis_name: str | None = None
        ...

A factory is any callable (usually the `nn.Module` class itself) that accepts the keyword
arguments `num_classes`, `head`, `dtype`, `axis_name` plus its own options.

`gradcam_layer` is the path ("/"-joined submodule names) of the submodule whose input is the
feature map Grad-CAM explains (backbones.gradcam). Every backbone here hands its last conv
block's rectified output to the shared "head", so they all name "head"; a backbone whose
head is fed anything else (a pooled vector, a transformer's tokens) must name another layer.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from backbones.heads import HEADS, check_head

Factory = Callable[..., nn.Module]

_REGISTRY: dict[str, Factory] = {}
_GRADCAM_LAYERS: dict[str, str] = {}


def register(name: str, *, gradcam_layer: str) -> Callable[[Factory], Factory]:
    """Decorator: make `factory` available as `create(name, ...)`, with the submodule whose
    input Grad-CAM explains (`gradcam_layer`, see the module docstring); returns it
    unchanged."""
    if not gradcam_layer or any(not part for part in gradcam_layer.split("/")):
        raise ValueError(f"backbone {name!r}: gradcam_layer must be a submodule path such as "
                         f"'head', got {gradcam_layer!r}")

    def decorate(factory: Factory) -> Factory:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"backbone {name!r} is already registered by {_REGISTRY[name]!r}")
        _REGISTRY[name] = factory
        _GRADCAM_LAYERS[name] = gradcam_layer
        return factory

    return decorate


def names() -> list[str]:
    """All registered backbone names, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> Factory:
    """The factory registered as `name`; ValueError listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown backbone {name!r}; known backbones: {', '.join(names())}") from None


def gradcam_layer(name: str) -> str:
    """The submodule path whose input is backbone `name`'s Grad-CAM feature map."""
    get(name)
    return _GRADCAM_LAYERS[name]


def is_custom_cnn(name: str) -> bool:
    """Whether `name` is one of the seed reports' small custom CNNs (backbones.cnns) rather
    than an ImageNet architecture; the CLIs pick head, defaults and member mode by it."""
    return get(name).__module__ == "backbones.cnns"


def resolve_head(head: str, name: str) -> str:
    """`head`, with "auto" resolved: the seed reports' own top for the custom CNNs ("imagenet":
    flatten + Dense; their two-conv trunks are too shallow for global pooling), "linear" for
    the others."""
    if head != "auto":
        return head
    return "imagenet" if is_custom_cnn(name) else "linear"


def create(name: str, *, num_classes: int | None, head: str = "linear",
           dtype: Any = jnp.float32, axis_name: str | None = None,
           **kwargs: Any) -> nn.Module:
    """Build the Flax module registered as `name` (NHWC in, float32 logits out).

    `dtype` is the compute dtype (params stay float32); `axis_name` is handed to every
    BatchNorm so batch statistics are averaged across devices under pmap / shard_map.
    `kwargs` are the backbone's own options (e.g. `width` for the custom CNNs).
    """
    factory = get(name)
    check_head(head, num_classes)
    arguments = dict(num_classes=num_classes, head=head, dtype=jnp.dtype(dtype),
                     axis_name=axis_name, **kwargs)
    try:
        inspect.signature(factory).bind(**arguments)
    except TypeError:
        accepted = set(inspect.signature(factory).parameters) - {
            "num_classes", "head", "dtype", "axis_name", "parent", "name"}
        unknown = sorted(set(kwargs) - accepted)
        raise TypeError(
            f"backbone {name!r} does not accept option(s) {', '.join(unknown)}; "
            f"its options: {', '.join(sorted(accepted)) or 'none'}") from None
    return factory(**arguments)


__all__ = ["HEADS", "create", "get", "gradcam_layer", "names", "register"]
