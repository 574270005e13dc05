"""Backbones: registry, heads, custom CNNs, VGG, ResNet and the summary CLI.

Big models are checked through `jax.eval_shape` (shapes and parameter counts, no weights);
only tiny-width models at 16-32 px are actually run.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import backbones
from backbones.__main__ import main, summarize

# "rbg" keys: XLA compiles threefry-based initialisers ~6x slower on CPU (9 s vs 1.5 s).
KEY = jax.random.key(0, impl="rbg")
RNGS = {"params": jax.random.key(1, impl="rbg"), "dropout": jax.random.key(2, impl="rbg")}
OURS = ("simple_cnn", "complex_cnn", "cnn16", "cnn_bn3x2", "vgg16", "vgg19",
        "resnet18", "resnet34", "resnet50", "resnet101")
MIN_SIZE = {"xception": 71, "inception_v3": 75}  # Keras's minimum sides; others: 32


def count(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def abstract_variables(model: nn.Module, shape: tuple[int, ...]):
    """Variables as shape structs: nothing materialised."""
    return jax.eval_shape(lambda: model.init(RNGS, jnp.zeros(shape), train=False))


def abstract_output(model: nn.Module, shape: tuple[int, ...]):
    variables = abstract_variables(model, shape)
    return jax.eval_shape(lambda v: model.apply(v, jnp.zeros(shape), train=False), variables)


# --- registry ---------------------------------------------------------------------------

def test_all_models_registered():
    assert set(OURS) | {"densenet121", "xception", "inception_v3"} == set(backbones.names())
    assert backbones.names() == sorted(backbones.names())


@pytest.mark.parametrize("name, kwargs, error, message", [
    ("nope", {"num_classes": 2}, ValueError, "unknown backbone 'nope'; known"),
    ("simple_cnn", {"num_classes": 2, "head": "nope"}, ValueError, "unknown head 'nope'"),
    ("simple_cnn", {"num_classes": None}, ValueError, "positive int"),
    ("simple_cnn", {"num_classes": 0}, ValueError, "positive int"),
    ("simple_cnn", {"num_classes": 3, "head": "features"}, ValueError, "must be None"),
    ("resnet50", {"num_classes": 3, "depth": 7}, TypeError, "does not accept option(s) depth"),
])
def test_create_rejects_bad_arguments(name, kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        backbones.create(name, **kwargs)


def test_register_refuses_a_second_factory_under_a_taken_name():
    with pytest.raises(ValueError, match="already registered"):
        backbones.register("resnet50", gradcam_layer="head")(lambda **kwargs: None)


@pytest.mark.parametrize("name", backbones.names())
def test_every_backbone_outputs_float32_logits_at_a_small_size(name):
    size = MIN_SIZE.get(name, 32)
    out = abstract_output(backbones.create(name, num_classes=3), (2, size, size, 1))
    assert (out.shape, out.dtype) == ((2, 3), jnp.float32)


@pytest.mark.parametrize("name, shape", [
    ("resnet18", (1, 16, 16, 1)), ("vgg16", (1, 31, 40, 3)), ("simple_cnn", (1, 32, 32, 2)),
    ("cnn16", (32, 32, 1))])
def test_bad_input_gets_a_one_line_error(name, shape):
    model = backbones.create(name, num_classes=2)
    with pytest.raises(ValueError, match=f"^{name} expects NHWC images with 1 or 3 channels"):
        abstract_variables(model, shape)


# --- parameter counts --------------------------------------------------------------------

@pytest.mark.parametrize("name, total, trainable", [
    ("resnet50", 25_636_712, 25_583_592),     # Keras ResNet50
    ("vgg16", 138_357_544, 138_357_544),      # Keras VGG16
    ("vgg19", 143_667_240, 143_667_240),      # Keras VGG19
    ("resnet101", 44_707_176, 44_601_832),    # Keras ResNet101
    ("resnet18", 11_703_912, 11_694_312),     # ours: torchvision's 11,689,512 + conv biases
    ("resnet34", 21_823_208, 21_806_184),
])
def test_imagenet_top_parameter_counts_match_keras(name, total, trainable):
    model = backbones.create(name, num_classes=1000, head="imagenet")
    variables = abstract_variables(model, (1, 224, 224, 3))
    assert count(variables) == total
    assert count(variables["params"]) == trainable


@pytest.mark.parametrize("name, head, size, expected", [
    ("simple_cnn", "imagenet", 64, 2_117_188),   # flatten 16*16*64 -> 128 -> 4
    ("simple_cnn", "linear", 64, 19_652),
    ("complex_cnn", "imagenet", 64, 1_291_972),  # flatten 4*4*128 -> 512 -> 4
    ("complex_cnn", "linear", 64, 241_348),
    ("cnn16", "imagenet", 64, 1_279_044),        # flatten 1*1*256 -> 512 -> 4
    ("cnn16", "imagenet", 32, 1_279_044),        # the sixth pool is skipped at 32 px
    ("cnn_bn3x2", "imagenet", 64, 1_336_676 + 896),  # + BN moving statistics
    ("cnn_bn3x2", "linear", 64, 287_972 + 896),
])
def test_custom_cnn_parameter_counts(name, head, size, expected):
    model = backbones.create(name, num_classes=4, head=head)
    assert count(abstract_variables(model, (1, size, size, 3))) == expected


def test_simple_cnn_count_by_hand():
    """Conv 3x3 1->32, Conv 3x3 32->64, Dense 64->4, all with bias."""
    model = backbones.create("simple_cnn", num_classes=4)
    by_hand = (9 * 1 * 32 + 32) + (9 * 32 * 64 + 64) + (64 * 4 + 4)
    assert count(abstract_variables(model, (1, 32, 32, 1))) == by_hand == 19_076


# --- layer names and shapes follow Keras -------------------------------------------------

def test_resnet50_layer_names_and_stage_shapes_follow_keras():
    model = backbones.create("resnet50", num_classes=1000, head="imagenet")
    params = abstract_variables(model, (1, 224, 224, 3))["params"]
    convs = [k for k in params if k.endswith("_conv")]
    bns = [k for k in params if k.endswith("_bn")]
    assert len(convs) == len(bns) == 53  # Keras ResNet50: 53 Conv2D, 53 BatchNormalization
    assert {"conv1_conv", "conv2_block1_0_conv", "conv2_block2_3_bn", "conv4_block6_2_conv",
            "conv5_block3_3_bn"} <= set(params)
    assert "conv2_block2_0_conv" not in params  # identity shortcut inside a stage
    assert set(params["head"]) == {"predictions"}
    assert params["conv3_block1_1_conv"]["kernel"].shape == (1, 1, 256, 128)
    assert params["conv1_conv"]["bias"].shape == (64,)  # Keras convs carry a bias

    def stages(x):
        _, state = model.apply(jax.tree.map(jnp.zeros_like, params_and_stats), x, train=False,
                               capture_intermediates=True)
        return state["intermediates"]

    params_and_stats = abstract_variables(model, (1, 224, 224, 3))
    inter = jax.eval_shape(stages, jnp.zeros((1, 224, 224, 3)))
    side = {k: inter[k]["__call__"][0].shape[1] for k in
            ("conv1_conv", "conv2_block3_3_conv", "conv3_block4_3_conv", "conv4_block6_3_conv",
             "conv5_block3_3_conv")}
    assert side == {"conv1_conv": 112, "conv2_block3_3_conv": 56, "conv3_block4_3_conv": 28,
                    "conv4_block6_3_conv": 14, "conv5_block3_3_conv": 7}


def test_vgg16_layer_names_follow_keras():
    model = backbones.create("vgg16", num_classes=1000, head="imagenet")
    params = abstract_variables(model, (1, 224, 224, 3))["params"]
    convs = sorted(k for k in params if k != "head")
    assert convs == sorted(f"block{b}_conv{c}" for b, n in enumerate((2, 2, 3, 3, 3), 1)
                           for c in range(1, n + 1))
    assert params["head"]["fc1"]["kernel"].shape == (7 * 7 * 512, 4096)
    assert params["head"]["fc2"]["kernel"].shape == (4096, 4096)
    assert params["head"]["predictions"]["kernel"].shape == (4096, 1000)


# --- heads -------------------------------------------------------------------------------

WIDTH = 0.25  # simple_cnn trunk ends with 16 channels


@pytest.mark.parametrize("head, num_classes, out_shape, head_params", [
    ("linear", 3, (2, 3), 16 * 3 + 3),
    ("dense1024", 3, (2, 3), 16 * 1024 + 1024 + 1024 * 3 + 3),
    ("dense512_dropout", 3, (2, 3), 16 * 512 + 512 + 512 * 3 + 3),
    ("features", None, (2, 16), 0),
    ("imagenet", 3, (2, 3), 8 * 8 * 16 * 128 + 128 + 128 * 3 + 3),  # flatten of 8x8x16
])
def test_heads_shapes_and_parameter_counts(head, num_classes, out_shape, head_params):
    model = backbones.create("simple_cnn", num_classes=num_classes, head=head, width=WIDTH)
    variables = abstract_variables(model, (2, 32, 32, 1))
    out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 32, 32, 1)), train=False),
                         variables)
    assert (out.shape, out.dtype) == (out_shape, jnp.float32)
    assert count(variables["params"].get("head", {})) == head_params


def test_features_head_is_the_pooled_trunk_that_linear_head_classifies():
    x = jax.random.normal(KEY, (2, 32, 32, 1))
    linear = backbones.create("simple_cnn", num_classes=3, width=WIDTH)
    variables = linear.init(RNGS, x, train=False)
    trunk = {"params": {k: v for k, v in variables["params"].items() if k != "head"}}
    features = backbones.create("simple_cnn", num_classes=None, head="features", width=WIDTH)
    pooled = features.apply(trunk, x, train=False)
    dense = variables["params"]["head"]["logits"]
    np.testing.assert_allclose(linear.apply(variables, x, train=False),
                               pooled @ dense["kernel"] + dense["bias"], rtol=1e-5, atol=1e-6)


def test_dropout_only_in_train_mode():
    x = jax.random.normal(KEY, (4, 16, 16, 1))
    model = backbones.create("simple_cnn", num_classes=3, head="dense512_dropout", width=WIDTH)
    variables = model.init(RNGS, x, train=False)
    evals = [model.apply(variables, x, train=False) for _ in range(2)]
    np.testing.assert_array_equal(evals[0], evals[1])
    a, b = (model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(k, impl="rbg")})
            for k in (3, 4))
    assert not np.allclose(a, b) and not np.allclose(a, evals[0])
    with pytest.raises(flax.errors.InvalidRngError, match='needs PRNG for "dropout"'):
        model.apply(variables, x, train=True)
    plain = backbones.create("simple_cnn", num_classes=3, head="linear", width=WIDTH)
    plain_vars = plain.init(RNGS, x, train=False)
    np.testing.assert_array_equal(plain.apply(plain_vars, x, train=True),
                                  plain.apply(plain_vars, x, train=False))


# --- BatchNorm ---------------------------------------------------------------------------

def _bn_model(**kwargs):
    return backbones.create("cnn_bn3x2", num_classes=3, width=WIDTH, **kwargs)


def test_batch_stats_update_only_in_train_mode():
    x = jax.random.normal(KEY, (4, 16, 16, 1))
    model = _bn_model()
    variables = model.init(RNGS, x, train=False)
    _, frozen = model.apply(variables, x, train=False, mutable=["batch_stats"])
    jax.tree.map(np.testing.assert_array_equal, frozen["batch_stats"], variables["batch_stats"])
    _, updated = model.apply(variables, x, train=True, mutable=["batch_stats"])
    # first BN after a bias-free conv: new mean = 0.9 * 0 + 0.1 * batch mean of the conv
    kernel = variables["params"]["block1_conv1"]["kernel"]
    conv = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(updated["batch_stats"]["block1_bn1"]["mean"],
                               0.1 * conv.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(updated["batch_stats"]["block1_bn1"]["var"],
                               0.9 + 0.1 * conv.var(axis=(0, 1, 2)), rtol=1e-4)


def test_axis_name_averages_batch_statistics_across_shards():
    """Two shards of 2 under a named vmap axis give the statistics of the whole batch of 4."""
    x = jax.random.normal(KEY, (4, 16, 16, 1))
    single, sharded = _bn_model(), _bn_model(axis_name="batch")
    variables = single.init(RNGS, x, train=False)
    logits, whole = single.apply(variables, x, train=True, mutable=["batch_stats"])

    def shard_step(xs):
        return sharded.apply(variables, xs, train=True, mutable=["batch_stats"])

    shard_logits, per_shard = jax.vmap(shard_step, axis_name="batch")(x.reshape(2, 2, 16, 16, 1))
    np.testing.assert_allclose(shard_logits.reshape(4, 3), logits, rtol=1e-4, atol=1e-4)
    jax.tree.map(lambda s, w: np.testing.assert_allclose(s[0], w, rtol=1e-4, atol=1e-6),
                 per_shard["batch_stats"], whole["batch_stats"])
    # eval mode needs no bound axis
    np.testing.assert_allclose(sharded.apply(variables, x, train=False),
                               single.apply(variables, x, train=False), rtol=1e-6)


def test_resnet_batch_norm_needs_the_named_axis_it_was_given():
    """Every BatchNorm of a ResNet gets axis_name: training outside the axis fails."""
    model = backbones.create("resnet18", num_classes=3, width=0.125, axis_name="batch")
    variables = abstract_variables(model, (2, 32, 32, 1))

    def train(v, x):
        return model.apply(v, x, train=True, mutable=["batch_stats"])

    with pytest.raises(NameError, match="batch"):
        jax.eval_shape(train, variables, jnp.zeros((2, 32, 32, 1)))
    _, stats = jax.eval_shape(jax.vmap(train, in_axes=(None, 0), axis_name="batch"),
                              variables, jnp.zeros((2, 1, 32, 32, 1)))
    assert stats["batch_stats"]["conv5_block2_2_bn"]["mean"].shape == (2, 64)


# --- channels and precision --------------------------------------------------------------

@pytest.mark.parametrize("name", ["cnn16", "vgg19", "resnet34"])
def test_one_and_three_channels(name):
    for channels in (1, 3):
        model = backbones.create(name, num_classes=2, width=0.125)
        variables = abstract_variables(model, (2, 32, 32, channels))
        first = "conv1_conv" if name.startswith("resnet") else "block1_conv1"
        assert variables["params"][first]["kernel"].shape[2] == channels
        out = abstract_output(model, (2, 32, 32, channels))
        assert out.shape == (2, 2)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    x = jax.random.normal(KEY, (2, 16, 16, 1))
    model16 = _bn_model(dtype=jnp.bfloat16)
    variables = model16.init(RNGS, x, train=False)
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    logits, state = model16.apply(variables, x, train=False, capture_intermediates=True)
    assert logits.dtype == jnp.float32
    assert state["intermediates"]["block1_conv1"]["__call__"][0].dtype == jnp.bfloat16
    reference = _bn_model().apply(variables, x, train=False)
    np.testing.assert_allclose(logits, reference, rtol=0.1,
                               atol=0.05 * float(jnp.abs(reference).max()))
    _, updates = model16.apply(variables, x, train=True, mutable=["batch_stats"])
    assert {leaf.dtype for leaf in jax.tree.leaves(updates)} == {jnp.dtype(jnp.float32)}


def test_resnet_bfloat16_shapes_and_dtypes():
    model = backbones.create("resnet50", num_classes=3, dtype=jnp.bfloat16, width=0.125)
    variables = abstract_variables(model, (2, 32, 32, 3))
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    logits, state = jax.eval_shape(
        lambda v: model.apply(v, jnp.zeros((2, 32, 32, 3)), train=False,
                              capture_intermediates=True), variables)
    assert logits.dtype == jnp.float32
    assert state["intermediates"]["conv5_block3_3_conv"]["__call__"][0].dtype == jnp.bfloat16


# --- training ---------------------------------------------------------------------------

def test_simple_cnn_overfits_a_tiny_batch():
    x = jax.random.normal(KEY, (8, 16, 16, 1))
    y = jnp.arange(8) % 4
    model = backbones.create("simple_cnn", num_classes=4, head="imagenet", width=WIDTH)
    params = model.init(RNGS, x, train=False)["params"]
    tx = optax.adam(1e-2)

    def loss_fn(p):
        logits = model.apply({"params": p}, x, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(p, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    opt_state = tx.init(params)
    losses = []
    for _ in range(30):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    assert losses[-1] < 0.1 * losses[0]
    assert (model.apply({"params": params}, x, train=False).argmax(-1) == y).all()


# --- CLI ---------------------------------------------------------------------------------

def test_cli_summary_json_for_resnet50(capsys):
    assert main(["summary", "resnet50", "--head", "imagenet", "--num-classes", "1000",
                 "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["total_params"] == 25_636_712
    assert info["trainable_params"] == 25_583_592
    assert info["non_trainable_params"] == 53_120
    assert info["output_shape"] == [1, 1000] and info["input_shape"] == [1, 224, 224, 3]
    assert 7.0 < info["gflops"] < 8.2  # ~3.9 G multiply-adds, as published for ResNet50


def test_summary_gflops_match_the_convolution_arithmetic():
    """simple_cnn at 32x32x1: 2 FLOPs per multiply-add of the convs and the Dense + small ops.

    XLA counts only the taps that fall inside the image: a 3x3 'same' conv over an n x n map
    has (3n - 2)^2 of them per (input, output) channel pair.
    """
    info = summarize("simple_cnn", num_classes=4, image_size=32, channels=1)
    macs = (3 * 32 - 2) ** 2 * 1 * 32 + (3 * 16 - 2) ** 2 * 32 * 64 + 64 * 4
    assert 2 * macs <= info["gflops"] * 1e9 <= 1.05 * 2 * macs
    assert info["total_params"] == 19_076
    features = summarize("simple_cnn", num_classes=None, head="features", image_size=32,
                         channels=1)
    assert features["output_shape"] == [1, 64]


def test_cli_list_and_errors(capsys):
    listed = subprocess.run([sys.executable, "-m", "backbones", "list"], capture_output=True,
                            text=True, check=True).stdout.split()
    assert listed == backbones.names()
    with pytest.raises(SystemExit) as exit_info:
        main(["summary", "nope"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert re.search(r"error: unknown backbone 'nope'; known backbones: .*\bsimple_cnn\b", error)


def test_auto_head_is_the_published_top_for_custom_cnns_and_linear_otherwise():
    assert backbones.resolve_head("auto", "simple_cnn") == "imagenet"
    assert backbones.resolve_head("auto", "cnn_bn3x2") == "imagenet"
    assert backbones.resolve_head("auto", "resnet50") == "linear"
    assert backbones.resolve_head("dense1024", "simple_cnn") == "dense1024"
