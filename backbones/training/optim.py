"""Optimisers and learning-rate schedules from a small config (optax)."""

from __future__ import annotations

import dataclasses
from typing import Any

import optax

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "warmup_cosine")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """What the optimiser does. `total_steps` is needed only by warmup_cosine."""

    optimizer: str = "adam"
    learning_rate: float = 1e-3
    schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 0
    weight_decay: float = 0.0
    momentum: float = 0.9
    clip_norm: float | None = None


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Constant, or linear warm-up then cosine decay to zero over `total_steps`."""
    if cfg.schedule == "constant":
        return optax.constant_schedule(cfg.learning_rate)
    if cfg.schedule == "warmup_cosine":
        if cfg.total_steps <= cfg.warmup_steps:
            raise ValueError(f"warmup_cosine needs total_steps ({cfg.total_steps}) > "
                             f"warmup_steps ({cfg.warmup_steps})")
        return optax.warmup_cosine_decay_schedule(
            0.0, cfg.learning_rate, cfg.warmup_steps, cfg.total_steps, end_value=0.0)
    raise ValueError(f"unknown schedule {cfg.schedule!r}; choose one of {', '.join(SCHEDULES)}")


def make_optimizer(cfg: OptimConfig, freeze_labels: Any = None) -> optax.GradientTransformation:
    """The optimiser, with global-norm clipping first and frozen parameters' updates zeroed.

    `freeze_labels` is a pytree like the params with leaves "train" or "frozen" (see
    freeze.py); frozen leaves get optax.set_to_zero, so they stay bit-identical and carry no
    optimiser state or weight decay.
    """
    lr = make_schedule(cfg)
    if cfg.optimizer == "adam":
        base = (optax.add_decayed_weights(cfg.weight_decay) if cfg.weight_decay else
                optax.identity())
        base = optax.chain(base, optax.adam(lr))
    elif cfg.optimizer == "adamw":
        base = optax.adamw(lr, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "sgd":
        base = optax.chain(optax.add_decayed_weights(cfg.weight_decay) if cfg.weight_decay
                           else optax.identity(), optax.sgd(lr, momentum=cfg.momentum))
    else:
        raise ValueError(
            f"unknown optimizer {cfg.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    if cfg.clip_norm:
        base = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), base)
    if freeze_labels is None:
        return base
    return optax.multi_transform({"train": base, "frozen": optax.set_to_zero()}, freeze_labels)
