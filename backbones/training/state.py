"""The functional train state: parameters, BatchNorm statistics, optimiser state, step, rng."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import core
from flax.training import train_state


class TrainState(train_state.TrainState):
    """Flax's TrainState plus BatchNorm statistics and the dropout rng.

    `apply_fn` and `tx` are static (not pytree leaves); everything else is an array, so the
    state can be checkpointed, replicated across devices and stacked on a member axis.
    """

    batch_stats: Any = None
    rng: jax.Array | None = None


def initial_variables(model, key: jax.Array, input_shape: tuple[int, ...]) -> dict:
    """Initialise the model on a zero batch of `input_shape` (NHWC) in inference mode."""
    params_key, dropout_key = jax.random.split(key)
    x = jnp.zeros(input_shape, jnp.float32)
    return model.init({"params": params_key, "dropout": dropout_key}, x, train=False)


def create_train_state(model, tx: optax.GradientTransformation, key: jax.Array,
                       input_shape: tuple[int, ...], variables: dict | None = None
                       ) -> TrainState:
    """Build a TrainState for `model`; `variables` (e.g. pretrained) overrides the init."""
    init_key, rng = jax.random.split(key)
    if variables is None:
        variables = initial_variables(model, init_key, input_shape)
    variables = core.unfreeze(variables)
    return TrainState.create(
        apply_fn=model.apply, params=variables["params"], tx=tx,
        batch_stats=variables.get("batch_stats", {}), rng=rng)


def checkpoint_items(state: TrainState) -> dict:
    """The array leaves of a state that a checkpoint stores (apply_fn and tx are code)."""
    return {"params": state.params, "batch_stats": state.batch_stats,
            "opt_state": state.opt_state, "step": state.step, "rng": state.rng}


def with_checkpoint_items(state: TrainState, items: dict) -> TrainState:
    """Return `state` with the arrays of a restored checkpoint put back in place."""
    return state.replace(**items)
