"""The per-shard train and eval steps: pure functions of (state, batch).

They are written for one shard of a data-parallel batch and reduce over the named axis
`axis_name` ("batch"), so the same function runs under pmap, under jit + shard_map, and
under `jax.vmap` over a leading member axis first (ensembles stack member states on axis 0
and share the image). No Python side effects: everything random comes from `state.rng`.
"""

from __future__ import annotations

from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
from jax import lax

from backbones.layers import frozen_batch_norm
from backbones.training import freeze, losses
from backbones.training.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
StepFn = Callable[[TrainState, Batch], tuple[TrainState, Metrics]]


def _variables(state: TrainState, params) -> dict:
    variables = {"params": params}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    return variables


def make_train_step(*, label_smoothing: float = 0.0, axis_name: str = "batch",
                    freeze_policy: str = "full", trainable: set[str] | None = None,
                    prepare: Callable[[jax.Array, jax.Array], jax.Array] | None = None
                    ) -> StepFn:
    """Build `train_step(state, batch) -> (state, metrics)`.

    batch: {"image" [B,H,W,C], "label" int [B], "weight" float [B]}. The loss is
    psum(sum(weight * ce)) / psum(sum(weight)); each shard differentiates its share
    sum(weight * ce) / psum(sum(weight)) and the gradients are psum-ed, which is the pmean
    of the per-shard gradients of the device-count-scaled loss. The model runs in train mode
    (dropout on) except that BatchNorm in frozen submodules (every trunk submodule under
    freeze_policy "head", those outside `trainable` under "last:N") runs in inference mode:
    it normalises with, and never updates, its running statistics (Keras's `trainable=False`).
    `trainable` names the top-level submodules that train (needed for "last:N").
    `prepare(key, images)`, if given, is the input's last work on device (e.g. uint8 images
    normalised, then augmented) with a per-step, per-shard key.
    Metrics (identical on every shard): loss, accuracy (weighted), count.
    """
    kind, _ = freeze.parse_policy(freeze_policy)
    if kind == "last" and trainable is None:
        raise ValueError("freeze policy last:N needs `trainable` (see freeze.trainable_modules)")

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        chex.assert_rank(batch["image"], 4)                       # checked once, at trace
        chex.assert_shape([batch["label"], batch["weight"]], (batch["image"].shape[0],))
        chex.assert_type([batch["label"], batch["weight"]], [int, float])
        key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step),
                                 lax.axis_index(axis_name))
        prepare_key, dropout_key = jax.random.split(key)
        images = batch["image"]
        keep = {freeze.HEAD} if kind == "head" else trainable
        frozen = () if kind == "full" else [name for name in state.params if name not in keep]
        if prepare is not None:
            images = prepare(prepare_key, images)
        total_weight = lax.psum(jnp.sum(batch["weight"].astype(jnp.float32)), axis_name)
        safe_weight = jnp.where(total_weight > 0, total_weight, 1.0)

        def loss_fn(params):
            variables = _variables(state, params)
            with frozen_batch_norm(frozen):
                if state.batch_stats:
                    logits, updates = state.apply_fn(variables, images, train=True,
                                                     rngs={"dropout": dropout_key},
                                                     mutable=["batch_stats"])
                    new_stats = updates["batch_stats"]
                else:
                    logits = state.apply_fn(variables, images, train=True,
                                            rngs={"dropout": dropout_key})
                    new_stats = state.batch_stats
            sums = losses.weighted_sums(logits, batch["label"], batch["weight"],
                                        label_smoothing=label_smoothing)
            return sums["loss"] / safe_weight, (sums, new_stats)

        grads, (sums, new_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
        grads = lax.psum(grads, axis_name)
        new_state = state.apply_gradients(grads=grads, batch_stats=new_stats)
        sums = lax.psum(sums, axis_name)
        metrics = {"loss": sums["loss"] / safe_weight, "accuracy": sums["correct"] / safe_weight,
                   "count": sums["count"]}
        return new_state, metrics

    return train_step


def make_eval_step() -> Callable[[TrainState, Batch], jax.Array]:
    """Build `eval_step(state, batch) -> float32 logits [B, C]` (inference mode)."""

    def eval_step(state: TrainState, batch: Batch) -> jax.Array:
        chex.assert_rank(batch["image"], 4)
        return state.apply_fn(_variables(state, state.params), batch["image"], train=False)

    return eval_step
