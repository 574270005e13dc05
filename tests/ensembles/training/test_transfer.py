"""Transfer learning in use: frozen BatchNorm in inference mode, --pretrained wiring
(presets, channels, clear refusals) and two-phase fine-tuning end to end."""

from __future__ import annotations

import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util
from keras_files import write_legacy_h5

import backbones
from backbones import layers, training
from ensembles.config import PRETRAINED_NORMALIZATION, head_phase
from ensembles.training import build
from experiments import common
from experiments.ensemble_cli import main
from experiments.single import DESCRIPTION


def single_main(argv):
    return main("single", DESCRIPTION, argv)

KEYS = {"params": jax.random.key(0), "dropout": jax.random.key(1)}


# --- frozen BatchNorm ----------------------------------------------------------------------

class _Nested(nn.Module):
    """A top-level BatchNorm and one nested inside a submodule (`inner/bn`)."""

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = layers.batch_norm(train=train, name="top_bn", dtype=jnp.float32, axis_name=None)(x)
        return _Inner(name="inner")(x, train=train)


class _Inner(nn.Module):
    @nn.compact
    def __call__(self, x, *, train: bool):
        return layers.batch_norm(train=train, name="bn", dtype=jnp.float32, axis_name=None)(x)


def _bn_outputs(model, variables, x, *, train, frozen=()):
    """{module path: output} of every BatchNorm, with `frozen` top-level modules frozen."""
    def apply(variables, x):  # jitted: one compile instead of many eager op dispatches
        with layers.frozen_batch_norm(frozen):
            return model.apply(variables, x, train=train, rngs={"dropout": KEYS["dropout"]},
                               mutable=["batch_stats", "intermediates"],
                               capture_intermediates=lambda m, _: isinstance(m, nn.BatchNorm))

    _, state = jax.jit(apply)(variables, x)
    flat = traverse_util.flatten_dict(state["intermediates"])
    return {key[:-1]: value[-1] for key, value in flat.items()}, state["batch_stats"]


def test_nested_batch_norm_resolves_to_its_top_level_module():
    model = _Nested()
    x = jax.random.normal(jax.random.key(2), (4, 3, 3, 2)) * 3 + 1
    variables = model.init(KEYS, x, train=False)
    out, stats = _bn_outputs(model, variables, x, train=True, frozen={"inner"})
    inference, _ = _bn_outputs(model, variables, x, train=False)
    np.testing.assert_array_equal(stats["inner"]["bn"]["mean"],
                                  variables["batch_stats"]["inner"]["bn"]["mean"])
    assert not np.allclose(stats["top_bn"]["mean"], variables["batch_stats"]["top_bn"]["mean"])
    # top_bn normalised with batch statistics; inner/bn with the running ones.
    np.testing.assert_allclose(out[("top_bn",)].mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    top = out[("top_bn",)]
    np.testing.assert_allclose(out[("inner", "bn")], top / np.sqrt(1 + 1e-3), rtol=1e-6)
    assert not np.allclose(out[("top_bn",)], inference[("top_bn",)])


def _setup(name, policy, *, size, head="linear", width=None, lr=1e-2):
    options = {} if width is None else {"width": width}
    model = backbones.create(name, num_classes=4, head=head, axis_name="batch", **options)
    shape = (1, size, size, 1)
    variables = training.state.initial_variables(model, jax.random.PRNGKey(0), shape)
    tx = training.make_optimizer(training.OptimConfig(learning_rate=lr),
                                 training.freeze_labels(variables["params"], policy, model))
    state = training.create_train_state(model, tx, jax.random.PRNGKey(0), shape, variables)
    trainable = training.trainable_modules(variables["params"], policy, model)
    step = training.make_train_step(freeze_policy=policy, trainable=trainable)
    dp = training.data_parallel("shard_map", jax.devices()[:1])
    return model, state, trainable, dp, dp.train(step, donate=False)


def _batch(size, n=8, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int32) % 4
    images = (rng.normal(size=(n, size, size, 1)) * 2 + 3).astype(np.float32)
    return {"image": images, "label": labels, "weight": np.ones(n, np.float32)}


@pytest.mark.slow
@pytest.mark.parametrize("name,size,width", [("cnn_bn3x2", 16, 0.25), ("resnet18", 32, 0.125)])
def test_last1_frozen_stages_use_running_statistics(name, size, width):
    model, state, trainable, dp, step = _setup(name, "last:1", size=size, width=width)
    batch = _batch(size)
    frozen = [m for m in state.params if m not in trainable]
    assert frozen and set(trainable) - {"head"}
    # BatchNorm scales set to 1, as imported weights have them: a residual branch's
    # zero-initialised last scale would output its offset in both modes and block the
    # gradient to the branch's convolutions.
    state = state.replace(params=jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.ones_like(x) if p[-1].key == "scale" else x, state.params))
    # Model level: frozen stages' BatchNorm outputs equal inference mode, trainable ones not.
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    local = model.clone(axis_name=None)  # outside the step: no named device axis
    train_out, _ = _bn_outputs(local, variables, batch["image"], train=True, frozen=frozen)
    infer_out, _ = _bn_outputs(local, variables, batch["image"], train=False)
    for path, value in train_out.items():
        if path[0] in frozen:
            np.testing.assert_allclose(value, infer_out[path], rtol=1e-6, atol=1e-6,
                                       err_msg="/".join(path))
        else:
            assert not np.allclose(value, infer_out[path], atol=1e-3), path
    # Step level: frozen params and statistics bit-identical, trainable ones move.
    new, _ = step(dp.replicate(state), batch)
    new = dp.unreplicate(new)
    for collection in ("params", "batch_stats"):
        old_tree, new_tree = getattr(state, collection), getattr(new, collection)
        for module in old_tree:
            same = jax.tree.all(jax.tree.map(np.array_equal, old_tree[module], new_tree[module]))
            assert same == (module in frozen), (collection, module)


@pytest.mark.slow
def test_head_policy_trunk_in_inference_mode_and_dropout_on():
    # Linear head: the train step's loss is exactly the inference-mode loss.
    _, state, _, dp, step = _setup("cnn_bn3x2", "head", size=16, width=0.25)
    batch = _batch(16)
    new, metrics = step(dp.replicate(state), batch)
    logits = training.make_eval_step()(state, batch)
    want = training.losses.cross_entropy(logits, batch["label"]).mean()
    np.testing.assert_allclose(metrics["loss"], want, rtol=1e-5)
    np.testing.assert_equal(jax.device_get(dp.unreplicate(new).batch_stats),
                            jax.device_get(state.batch_stats))
    # dense512_dropout head: dropout is active (two rng keys, two losses) in the step.
    _, state, _, dp, step = _setup("cnn_bn3x2", "head", size=16, width=0.25,
                                   head="dense512_dropout")
    losses = [float(step(dp.replicate(state.replace(rng=jax.random.PRNGKey(k))), batch)[1]
                    ["loss"]) for k in (1, 2)]
    assert losses[0] != losses[1]


# --- --pretrained wiring -------------------------------------------------------------------

def _config(*extra):
    return common.parse("single", ["--backbone", *extra])[0]


def test_presets_channels_and_explicit_flags(tmp_path):
    weights = tmp_path / "w.h5"
    weights.write_bytes(b"")
    scratch = _config("simple_cnn")
    assert (scratch.data.channels, scratch.data.normalization) == (1, "unit")
    for name, preset in PRETRAINED_NORMALIZATION.items():
        cfg = _config(name, "--pretrained", str(weights))
        assert (cfg.data.channels, cfg.data.normalization) == (3, preset), name
    cfg = _config("resnet50", "--pretrained", str(weights), "--normalization", "tf")
    assert (cfg.data.channels, cfg.data.normalization) == (3, "tf")
    cfg = _config("xception", "--pretrained", str(weights), "--channels", "1")
    assert (cfg.data.channels, cfg.data.normalization) == (1, "tf")
    with pytest.raises(ValueError, match="preset 'caffe' has per-channel constants"):
        _config("resnet50", "--pretrained", str(weights), "--channels", "1")
    cfg = _config("densenet121", "--pretrained", str(weights), "--channels", "1",
                  "--normalization", "xray")
    assert (cfg.data.channels, cfg.data.normalization) == (1, "xray")
    with pytest.raises(ValueError, match="head_epochs must be >= 0"):
        _config("simple_cnn", "--head-epochs", "-1")
    head = head_phase(_config("simple_cnn", "--head-epochs", "2"))
    assert (head.model.freeze, head.training.epochs, head.model.head_epochs,
            head.training.warmup_epochs) == ("head", 2, 0, 0.5)
    assert head_phase(scratch) is None


def test_imagenet_file_lookup_and_refusals(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CXR_ENSEMBLES_WEIGHTS", str(tmp_path))
    argv = ["--out", str(tmp_path / "run"), "--pretrained", "imagenet", "--backbone"]
    assert single_main([*argv, "densenet121"]) == 2
    err = capsys.readouterr().err
    notop = "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5"
    assert f"{tmp_path / notop} not found" in err
    assert "storage.googleapis.com/tensorflow/keras-applications/densenet/" in err
    assert single_main([*argv, "resnet18"]) == 2
    assert "resnet18 has no ImageNet weights" in capsys.readouterr().err
    assert single_main([*argv[:2], "--pretrained", str(tmp_path / "nope.h5"),
                        "--backbone", "vgg16"]) == 2
    assert "nope.h5 is not a file" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before the run directory
    # Only the with-top file present: it is used (its top is dropped on load).
    full = tmp_path / "densenet121_weights_tf_dim_ordering_tf_kernels.h5"
    full.write_bytes(b"")
    assert build.weights_path(_config("densenet121", "--pretrained", "imagenet")) == full
    (tmp_path / notop).write_bytes(b"")
    assert build.weights_path(_config("densenet121", "--pretrained", "imagenet")) == (
        tmp_path / notop)


# --- two-phase fine-tuning end to end ------------------------------------------------------

def _keras_like_trunk(name: str, seed: int = 0) -> dict:
    """He-scaled random trunk variables of `name` (no init run: shapes from eval_shape)."""
    model = backbones.create(name, num_classes=4, head="linear")
    abstract = jax.eval_shape(lambda: model.init(KEYS, jnp.zeros((1, 32, 32, 3)), train=False))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if path[-1].key == "kernel":
            return rng.normal(0, np.sqrt(2 / np.prod(leaf.shape[:-1])), leaf.shape)
        if path[-1].key in ("scale", "var"):
            return rng.uniform(0.5, 1.5, leaf.shape)
        return rng.normal(0, 0.05, leaf.shape)

    trunk = {c: {m: v for m, v in tree.items() if m != "head"} for c, tree in abstract.items()}
    return jax.tree_util.tree_map_with_path(lambda p, x: draw(p, x).astype(np.float32), trunk)


def _latest_state(directory, stacked: bool):
    """The newest epoch's train state of a one-member stack (member axis dropped)."""
    with ocp.CheckpointManager(directory.absolute()) as manager:
        items = manager.restore(manager.latest_step(), args=ocp.args.Composite(
            items=ocp.args.StandardRestore()))["items"]
    return jax.tree.map(lambda x: x[0], items["state"]) if stacked else items["state"]


@pytest.mark.slow
def test_two_phase_from_a_pretrained_file(tmp_path):
    trunk = _keras_like_trunk("vgg16")
    path = write_legacy_h5(tmp_path / "vgg16_notop.h5", trunk)
    out = tmp_path / "run"
    argv = ["--backbone", "vgg16", "--pretrained", str(path), "--head-epochs", "1",
            "--epochs", "1", "--freeze", "last:1", "--count", "48", "--image-size", "32",
            "--batch-size", "8", "--warmup-epochs", "0.5", "--n-bootstrap", "0", "--no-augment",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--no-progress"]
    with pytest.warns(UserWarning, match="not an official Keras"):
        assert single_main(argv) == 0
    config = json.loads((out / "config.json").read_text())["config"]
    assert (config["data"]["normalization"], config["data"]["channels"],
            config["model"]["head_epochs"]) == ("caffe", 3, 1)
    for run in (out / "head", out):
        records = (run / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(r)["epoch"] for r in records] == [1], run
    want = traverse_util.flatten_dict(trunk["params"])
    stacked = config["training"]["members"] == "stacked"
    ckpt = Path("checkpoints") / "stack-0" / ("" if stacked else "member-0")
    phase1 = traverse_util.flatten_dict(_latest_state(out / "head" / ckpt, stacked)["params"])
    phase2 = traverse_util.flatten_dict(_latest_state(out / ckpt, stacked)["params"])
    for key, value in want.items():  # phase 1 trained the head alone
        np.testing.assert_array_equal(phase1[key], value, err_msg="/".join(key))
        if key[0].startswith("block5"):  # phase 2 (last:1) moved only the last stage
            assert not np.array_equal(phase2[key], value), key
        else:
            np.testing.assert_array_equal(phase2[key], value, err_msg="/".join(key))
    head = [k for k in phase1 if k[0] == "head"]
    assert head and not all(np.array_equal(phase1[k], phase2[k]) for k in head)
