"""pmap, shard_map and one device agree; the batch must divide by the device count.

Two CPU devices are simulated in a subprocess (XLA_FLAGS must be set before JAX starts).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from backbones import training

SCRIPT = textwrap.dedent("""
    import json
    import jax, numpy as np
    import backbones
    from backbones import training

    assert jax.device_count() == 2, jax.devices()
    model = backbones.create("cnn_bn3x2", num_classes=3, width=0.125, axis_name="batch")
    tx = training.make_optimizer(training.OptimConfig(optimizer="sgd", learning_rate=0.1))
    state = training.create_train_state(model, tx, jax.random.PRNGKey(0), (1, 16, 16, 1))
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(4, 16, 16, 1)).astype(np.float32),
             "label": np.array([0, 1, 2, 1], np.int32),
             "weight": np.array([1.0, 2.0, 1.0, 0.5], np.float32)}
    step = training.make_train_step()
    out = {}
    for name, mode, devices in [("single", "shard_map", jax.devices()[:1]),
                                ("shard_map", "shard_map", jax.devices()),
                                ("pmap", "pmap", jax.devices())]:
        dp = training.data_parallel(mode, devices)
        replicated, metrics = dp.train(step)(dp.replicate(state), batch)
        new = jax.device_get(dp.unreplicate(replicated))
        logits = dp.predict(training.make_eval_step())(replicated, {"image": batch["image"][:3]})
        out[name] = {"loss": float(metrics["loss"]), "accuracy": float(metrics["accuracy"]),
                     "params": [np.asarray(x).ravel().tolist()
                                for x in jax.tree.leaves(new.params)],
                     "stats": [np.asarray(x).ravel().tolist()
                               for x in jax.tree.leaves(new.batch_stats)],
                     "logits": np.asarray(logits).tolist()}
    # Ensemble-style: the step vmapped over 2 members (labels/weights [M, B], image shared)
    # under the wrapper equals each member trained alone.
    members = jax.tree.map(lambda a, b: np.stack([a, b]), state, state.replace(
        params=jax.tree.map(lambda x: x * 0.5, state.params)))
    vstep = jax.vmap(step, in_axes=(0, {"image": None, "label": 0, "weight": 0}))
    mbatch = {"image": batch["image"], "label": np.stack([batch["label"], 2 - batch["label"]]),
              "weight": np.stack([batch["weight"], np.ones(4, np.float32)])}
    dp = training.data_parallel("shard_map")
    _, vmetrics = dp.train(vstep, batch_axes={"image": 0, "label": 1, "weight": 1})(
        dp.replicate(members), mbatch)
    alone = []
    for m in range(2):
        member = jax.tree.map(lambda x: x[m], members)
        _, met = dp.train(step)(dp.replicate(member),
                                {"image": batch["image"], "label": mbatch["label"][m],
                                 "weight": mbatch["weight"][m]})
        alone.append(float(met["loss"]))
    out["vmapped"] = {"loss": np.asarray(vmetrics["loss"]).tolist(), "alone": alone}
    try:
        dp.train(step)(dp.replicate(state), {k: v[:3] for k, v in batch.items()})
    except ValueError as error:
        out["error"] = str(error)
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def two_devices() -> dict:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
def test_parallel_modes_match_one_device(two_devices, mode):
    single, other = two_devices["single"], two_devices[mode]
    assert other["loss"] == pytest.approx(single["loss"], rel=1e-5)
    assert other["accuracy"] == pytest.approx(single["accuracy"], rel=1e-6)
    for a, b in zip(single["params"] + single["stats"], other["params"] + other["stats"],
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # odd eval batch padded, then cut back: the same rows, in order, as on one device
    assert np.shape(other["logits"]) == (3, 3)
    np.testing.assert_allclose(other["logits"], single["logits"], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_vmapped_member_step_equals_members_alone(two_devices):
    np.testing.assert_allclose(two_devices["vmapped"]["loss"], two_devices["vmapped"]["alone"],
                               rtol=1e-5)


def test_batch_not_divisible_by_devices_is_a_clear_error(two_devices):
    assert two_devices["error"] == ("batch size 3 does not divide by the 2 devices "
                                    "(shard_map); choose a multiple of 2")


def test_unknown_parallel_mode():
    with pytest.raises(ValueError, match="unknown parallel mode 'dp'"):
        training.data_parallel("dp")


def test_check_batch_size_without_devices_to_spare():
    dp = training.DataParallel("pmap", tuple(jax.devices()) * 2)  # 2 entries: checks the count only
    with pytest.raises(ValueError, match="batch size 5 does not divide by the 2 devices"):
        dp.check_batch_size(5)
