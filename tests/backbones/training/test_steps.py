"""The training engine on tiny models: losses, optimisers, freezing, overfitting, NaN guard."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import backbones
from backbones import training
from backbones.training import freeze


def _batch(n=8, size=16, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int32) % classes
    images = rng.normal(size=(n, size, size, 1)).astype(np.float32) + labels[:, None, None,
                                                                             None]
    return {"image": images, "label": labels, "weight": np.ones(n, np.float32)}


def _setup(name="simple_cnn", *, lr=3e-3, optimizer="adam", policy="full", size=16, width=0.25,
           head="linear"):
    model = backbones.create(name, num_classes=4, head=head, width=width, axis_name="batch")
    key = jax.random.PRNGKey(0)
    variables = training.state.initial_variables(model, key, (1, size, size, 1))
    labels = None if policy == "full" else training.freeze_labels(variables["params"], policy,
                                                                  model)
    tx = training.make_optimizer(training.OptimConfig(optimizer=optimizer, learning_rate=lr),
                                 labels)
    state = training.create_train_state(model, tx, key, (1, size, size, 1), variables)
    step = training.make_train_step(
        freeze_policy=policy,
        trainable=training.trainable_modules(variables["params"], policy, model))
    dp = training.data_parallel("shard_map", jax.devices()[:1])
    return state, dp, dp.train(step, donate=False)


def test_weighted_sums_match_a_hand_computed_weighted_mean():
    logits = jnp.array([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    labels = jnp.array([0, 0, 1])
    weights = jnp.array([1.0, 3.0, 0.0])
    sums = training.losses.weighted_sums(logits, labels, weights)
    ce = -jax.nn.log_softmax(logits)[jnp.arange(3), labels]
    np.testing.assert_allclose(sums["loss"] / sums["weight"], (ce[0] + 3 * ce[1]) / 4,
                               rtol=1e-6)
    assert float(sums["correct"]) == 1.0 and float(sums["count"]) == 2.0
    smooth = training.losses.cross_entropy(logits[:1], labels[:1], label_smoothing=0.2)
    logp = jax.nn.log_softmax(logits[0])
    np.testing.assert_allclose(smooth[0], -(0.9 * logp[0] + 0.1 * logp[1]), rtol=1e-6)


def test_zero_weight_examples_do_not_count():
    state, dp, step = _setup()
    batch = _batch()
    half = {k: np.concatenate([v[:4], v[:4]]) for k, v in batch.items()}  # same shapes
    masked = {**batch, "weight": np.r_[np.ones(4), np.zeros(4)].astype(np.float32)}
    _, m_half = step(dp.replicate(state), half)
    _, m_masked = step(dp.replicate(state), masked)
    np.testing.assert_allclose(m_half["loss"], m_masked["loss"], rtol=1e-5)
    assert float(m_masked["count"]) == 4.0


def test_tiny_batch_overfits():
    state, dp, step = _setup(lr=1e-2)
    batch = _batch()
    replicated = dp.replicate(state)
    losses = []
    for _ in range(40):
        replicated, metrics = step(replicated, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.1 * losses[0], losses
    assert float(metrics["accuracy"]) == 1.0


def test_schedules_and_bad_optimizer_config():
    cfg = training.OptimConfig(schedule="warmup_cosine", learning_rate=1.0, warmup_steps=2,
                               total_steps=10)
    lr = training.optim.make_schedule(cfg)
    assert float(lr(0)) == 0.0 and float(lr(2)) == pytest.approx(1.0)
    assert float(lr(10)) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'"):
        training.make_optimizer(training.OptimConfig(optimizer="lamb"))
    with pytest.raises(ValueError, match="total_steps"):
        training.optim.make_schedule(training.OptimConfig(schedule="warmup_cosine"))


def test_clipping_bounds_the_update():
    params = {"w": jnp.zeros(3)}
    grads = {"w": jnp.array([300.0, 400.0, 0.0])}
    tx = training.make_optimizer(training.OptimConfig(optimizer="sgd", learning_rate=1.0,
                                                      momentum=0.0, clip_norm=1.0))
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(optax.tree.norm(updates), 1.0, rtol=1e-6)


def test_freeze_policy_parsing_and_stages():
    assert freeze.parse_policy("last:2") == ("last", 2)
    with pytest.raises(ValueError, match="unknown freeze policy"):
        freeze.parse_policy("last:0")
    params = {"conv1_conv": 0, "conv1_bn": 0, "conv2_block1_0_conv": 0, "conv2_block2_0_conv": 0,
              "conv3_block1_0_conv": 0, "head": 0}
    assert freeze.stages(params) == [["conv1_conv", "conv1_bn"],
                                     ["conv2_block1_0_conv", "conv2_block2_0_conv"],
                                     ["conv3_block1_0_conv"]]
    assert freeze.trainable_modules(params, "last:1") == {"conv3_block1_0_conv", "head"}
    with pytest.raises(ValueError, match="only 3 stages"):
        freeze.trainable_modules(params, "last:4")


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["head", "last:1"])
def test_frozen_parameters_and_statistics_stay_bit_identical(policy):
    state, dp, step = _setup("cnn_bn3x2", policy=policy, lr=1e-2)
    before = jax.device_get(state)
    replicated = dp.replicate(state)
    for seed in range(3):
        replicated, _ = step(replicated, _batch(seed=seed))
    after = jax.device_get(dp.unreplicate(replicated))
    trainable = training.trainable_modules(before.params, policy)
    assert "head" in trainable and "block1_conv1" not in trainable
    for name in before.params:
        same = all(np.array_equal(a, b) for a, b in zip(
            jax.tree.leaves(before.params[name]), jax.tree.leaves(after.params[name]),
            strict=True))
        assert same == (name not in trainable), name
    for name in before.batch_stats:
        same = all(np.array_equal(a, b) for a, b in zip(
            jax.tree.leaves(before.batch_stats[name]), jax.tree.leaves(after.batch_stats[name]),
            strict=True))
        assert same == (name not in trainable), name


def test_precision_flag():
    assert training.compute_dtype("auto", "cpu") == jnp.float32
    assert training.compute_dtype("auto", "gpu") == jnp.bfloat16
    assert training.compute_dtype("bf16") == jnp.bfloat16
    with pytest.raises(ValueError, match="unknown precision"):
        training.compute_dtype("fp8")


def test_bf16_step_keeps_float32_params():
    model = backbones.create("simple_cnn", num_classes=4, width=0.25, axis_name="batch",
                             dtype=jnp.bfloat16)
    tx = training.make_optimizer(training.OptimConfig())
    state = training.create_train_state(model, tx, jax.random.PRNGKey(0), (1, 16, 16, 1))
    dp = training.data_parallel("shard_map", jax.devices()[:1])
    replicated, metrics = dp.train(training.make_train_step(), donate=False)(
        dp.replicate(state), _batch())
    assert {x.dtype for x in jax.tree.leaves(replicated.params)} == {jnp.dtype(jnp.float32)}
    assert np.isfinite(float(metrics["loss"]))
