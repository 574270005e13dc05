"""The CPU levers benchmarks/throughput.py times: a remat-wrapped model computes the same
logits and gradients as the plain one (only the backward pass's memory/compute trade changes)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import backbones
from benchmarks.throughput import REMAT, _remat_apply


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["nothing", "dots"])
def test_remat_gives_the_plain_logits_and_gradients(policy):
    model = backbones.create("cnn_bn3x2", num_classes=3, width=0.25)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 16, 16, 1)), jnp.float32)
    variables = model.init(jax.random.PRNGKey(0), x, train=False)

    def loss(params, apply):
        logits, _ = apply({**variables, "params": params}, x, train=True,
                          mutable=["batch_stats"])
        return jnp.sum(jnp.sin(logits)), logits

    plain = jax.grad(loss, has_aux=True)(variables["params"], model.apply)
    remat = jax.grad(loss, has_aux=True)(
        variables["params"], lambda *a, **kw: _remat_apply(model.apply, REMAT[policy], *a, **kw))
    np.testing.assert_allclose(remat[1], plain[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(remat[0]), jax.tree.leaves(plain[0]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
