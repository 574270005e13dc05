"""Freeze policies: which parameters train (`full`, `head`, `last:N`).

A backbone's stages are its top-level trunk submodules grouped by their Keras-style stage
prefix, in creation order: `conv2_block1_0_conv` and `conv2_block3_2_bn` are stage `conv2`,
`block4_conv1` is `block4`, a name without such a prefix (`bn`, `Conv_0`) is a stage of its
own. A model can override the grouping with a method `stage_of(name) -> str`. The head is
always the submodule `head` (backbones/heads.py).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax

HEAD = "head"
_STAGE_PREFIX = re.compile(r"^([A-Za-z]+\d+)(?:_|$)")


def parse_policy(policy: str) -> tuple[str, int]:
    """'full' -> ('full', 0), 'head' -> ('head', 0), 'last:2' -> ('last', 2)."""
    if policy in ("full", "head"):
        return policy, 0
    match = re.fullmatch(r"last:(\d+)", policy)
    if match and int(match.group(1)) >= 1:
        return "last", int(match.group(1))
    raise ValueError(f"unknown freeze policy {policy!r}; use full, head or last:N (N >= 1)")


def default_stage_of(name: str) -> str:
    """The stage a top-level submodule belongs to, from its Keras-style name."""
    match = _STAGE_PREFIX.match(name)
    return match.group(1) if match else name


def stages(params: Mapping[str, Any], model: Any = None) -> list[list[str]]:
    """Top-level trunk submodule names grouped into stages, in order (head excluded)."""
    stage_of = getattr(model, "stage_of", None) or default_stage_of
    groups: dict[str, list[str]] = {}
    for name in params:
        if name != HEAD:
            groups.setdefault(stage_of(name), []).append(name)
    return list(groups.values())


def trainable_modules(params: Mapping[str, Any], policy: str, model: Any = None) -> set[str]:
    """Names of the top-level submodules that train under `policy`."""
    kind, n = parse_policy(policy)
    if kind == "full":
        return set(params)
    if HEAD not in params:
        raise ValueError(f"freeze policy {policy!r} needs a submodule named 'head'; this model "
                         f"has: {', '.join(params)}")
    if kind == "head":
        return {HEAD}
    groups = stages(params, model)
    if n > len(groups):
        raise ValueError(f"freeze policy {policy!r}: the model has only {len(groups)} stages")
    return {HEAD, *(name for group in groups[-n:] for name in group)}


def freeze_labels(params: Mapping[str, Any], policy: str, model: Any = None) -> Any:
    """A pytree like `params` with leaves 'train' or 'frozen' (for optax.multi_transform)."""
    keep = trainable_modules(params, policy, model)
    return {name: jax.tree.map(lambda _, t=("train" if name in keep else "frozen"): t, sub)
            for name, sub in params.items()}

