"""DenseNet121, Xception and InceptionV3: Keras's parameter counts, layer names and facts.

Checked through `jax.eval_shape` (nothing materialised) except one small eager forward per
model with random numpy variables; numerical equality with Keras is in test_pretrained.py.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import backbones
from backbones import layers

# name -> (Keras total parameters with the 1000-class top, default side, smallest side,
#          pooled feature width)
KERAS = {
    "densenet121": (8_062_504, 224, 32, 1024),
    "xception": (22_910_480, 299, 71, 2048),
    "inception_v3": (23_851_784, 299, 75, 2048),
}
RNGS = {"params": jax.random.key(0), "dropout": jax.random.key(1)}


def abstract(model, shape):
    return jax.eval_shape(lambda: model.init(RNGS, jnp.zeros(shape), train=False))


def count(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def modules(tree) -> dict[str, set[str]]:
    """{module path: its leaf names} over params and batch_stats."""
    out: dict[str, set[str]] = {}
    for key in traverse_util.flatten_dict(tree):
        out.setdefault("/".join(key[1:-1]), set()).add(key[-1])
    return out


@pytest.mark.parametrize("name", list(KERAS))
def test_parameter_count_equals_keras(name):
    total, side, _, _ = KERAS[name]
    model = backbones.create(name, num_classes=1000, head="imagenet")
    variables = abstract(model, (1, side, side, 3))
    assert count(variables) == total
    assert set(variables) == {"params", "batch_stats"}
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))


@pytest.mark.parametrize("name", list(KERAS))
def test_smallest_input_any_head_bf16(name):
    _, _, side, width = KERAS[name]
    for head, classes, channels, out_shape in (("features", None, 1, (2, width)),
                                               ("dense1024", 4, 3, (2, 4))):
        shape = (2, side, side + 5, channels)  # non-square works too
        model = backbones.create(name, num_classes=classes, head=head, dtype=jnp.bfloat16)
        variables = abstract(model, shape)
        out = jax.eval_shape(lambda v, m=model, s=shape: m.apply(v, jnp.zeros(s), train=False),
                             variables)
        assert (out.shape, out.dtype) == (out_shape, jnp.float32)
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
    with pytest.raises(ValueError, match=f"sides >= {side} px"):
        abstract(model, (1, side - 1, side, channels))


def test_densenet_keras_layout():
    variables = abstract(backbones.create("densenet121", num_classes=1000, head="imagenet"),
                         (1, 32, 32, 3))
    layers = modules(variables)
    convs = {k for k in layers if k.endswith("_conv")}
    assert len(convs) == 1 + 2 * 58 + 3  # stem, two per conv block, three transitions
    assert all(layers[k] == {"kernel"} for k in convs)  # no bias
    assert layers["conv5_block16_1_bn"] == {"scale", "bias", "mean", "var"}
    assert variables["params"]["pool4_conv"]["kernel"].shape == (1, 1, 1024, 512)
    assert variables["params"]["head"]["predictions"]["kernel"].shape == (1024, 1000)


def test_xception_keras_layout():
    variables = abstract(backbones.create("xception", num_classes=1000, head="imagenet"),
                         (1, 71, 71, 3))
    layers = modules(variables)
    assert {k for k in layers if k.startswith(("conv2d", "batch_normalization"))} == {
        "conv2d", "conv2d_1", "conv2d_2", "conv2d_3", "batch_normalization",
        "batch_normalization_1", "batch_normalization_2", "batch_normalization_3"}
    params = variables["params"]
    assert params["conv2d_3"]["kernel"].shape == (1, 1, 728, 1024)
    assert params["block2_sepconv1"]["depthwise"]["kernel"].shape == (3, 3, 1, 64)
    assert params["block2_sepconv1"]["pointwise"]["kernel"].shape == (1, 1, 64, 128)
    assert params["block14_sepconv2"]["pointwise"]["kernel"].shape == (1, 1, 1536, 2048)
    assert sum(k.startswith("block") and k.endswith("_bn") for k in layers) == 36


def test_inception_keras_layout():
    variables = abstract(backbones.create("inception_v3", num_classes=1000, head="imagenet"),
                         (1, 75, 75, 3))
    layers = modules(variables)
    names = [f"conv2d{f'_{i}' if i else ''}" for i in range(94)]
    assert {k for k in layers if k.startswith("conv2d")} == set(names)
    assert all(layers[k.replace("conv2d", "batch_normalization")] == {"bias", "mean", "var"}
               for k in names)  # BatchNorm without scale
    params = variables["params"]
    assert params["conv2d"]["kernel"].shape == (3, 3, 3, 32)  # creation order is kept
    assert params["conv2d_4"]["kernel"].shape == (3, 3, 80, 192)
    assert params["conv2d_93"]["kernel"].shape == (1, 1, 2048, 192)  # mixed10's pool branch
    assert params["conv2d_32"]["kernel"].shape == (1, 7, 128, 128)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["densenet121", "xception", "inception_v3"])
def test_train_mode_updates_batch_stats_and_inference_uses_them(name, monkeypatch):
    _, _, side, _ = KERAS[name]
    model = backbones.create(name, num_classes=3, head="linear")
    x = np.random.default_rng(0).normal(size=(2, side, side, 1)).astype(np.float32)
    rng = np.random.default_rng(1)
    variables = jax.tree.map(lambda s: rng.uniform(0.5, 1.0, s.shape).astype(np.float32) / 4,
                             abstract(model, x.shape))
    logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert logits.shape == (2, 3) and np.isfinite(logits).all()
    changed = jax.tree.map(lambda a, b: not np.allclose(a, b), variables["batch_stats"],
                           updates["batch_stats"])
    assert all(jax.tree.leaves(changed))
    first = model.apply(variables, x, train=False)
    assert not np.allclose(first, logits)  # moving vs batch statistics
    # Inference is per example: each half of the batch alone gives the same rows.
    halves = np.concatenate([model.apply(variables, x[i:i + 1], train=False) for i in (0, 1)])
    np.testing.assert_allclose(halves, first, rtol=1e-5, atol=1e-6)
    # With momentum 0 the update *is* the batch statistics; inference with them as moving
    # statistics must reproduce the train-mode logits (same epsilon, same mean/var use).
    monkeypatch.setattr(layers, "BN_MOMENTUM", 0.0)
    _, batch = backbones.create(name, num_classes=3, head="linear").apply(
        variables, x, train=True, mutable=["batch_stats"])
    replayed = model.apply({"params": variables["params"], **batch}, x, train=False)
    np.testing.assert_allclose(replayed, logits, rtol=1e-4, atol=1e-5)
