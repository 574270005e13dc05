"""The one training loop: exact resume, crash consistency at every write, NaN guard, monitors.

A crash is injected (an exception that nothing catches, as a kill would leave the files) at
each point between the writes of an epoch: before its checkpoint, inside it (orbax's
temporary folder written, not yet renamed), between the checkpoint and the metric record,
and after both. The resumed run must end bit-identical to an uninterrupted one: parameters,
optimizer state, best snapshots and metric records.
"""

from __future__ import annotations

import json
from pathlib import Path

import chex
import jax
import numpy as np
import pytest
from crash_points import (
    CRASH_POINTS,
    TIMING,
    Crash,
    Interrupted,
    final_checkpoint,
    inject,
)

import backbones
from backbones import training
from backbones.training.metric_writer import MetricWriter
from data_pipeline.loader import make_loader
from data_pipeline.preprocess import PreprocessConfig
from ensembles.training import members

SIZE, N, BATCH, STEPS, EPOCHS = 16, 24, 8, 2, 3   # 16 training examples: 2 steps per epoch
class TinySource:
    """In-memory random-access source: class k is brighter by k, plus noise."""

    def __init__(self):
        rng = np.random.default_rng(0)
        self.labels = np.arange(N) % 3
        noise = rng.integers(0, 60, size=(N, SIZE, SIZE, 1))
        self.images = (noise + 60 * self.labels[:, None, None, None]).astype(np.uint8)

    def __len__(self):
        return N

    def __repr__(self):  # Grain checks the source's repr when it restores an iterator
        return f"TinySource(n={N})"

    def __getitem__(self, i):
        return {"image": self.images[i], "label": int(self.labels[i]), "patient_id": "",
                "path": f"{i}.png"}


def _fit(out: Path, parallel=None, *, monitor="val_loss", patience=None):
    """One K=3 model through the engine (a stack of one member), checkpoints in out/ckpt."""
    parallel = parallel or training.data_parallel("shard_map", jax.devices()[:1])
    source = TinySource()
    prep = PreprocessConfig(image_size=SIZE)
    loader = make_loader(source, np.arange(16), batch_size=BATCH, preprocess=prep,
                         shuffle=True, seed=3, num_epochs=EPOCHS)
    val = make_loader(source, np.arange(16, N), batch_size=BATCH, preprocess=prep,
                      shuffle=False, drop_remainder=False)
    model = backbones.create("simple_cnn", num_classes=3, width=0.25, axis_name="batch",
                             head="dense512_dropout")
    tx = training.make_optimizer(training.OptimConfig(learning_rate=3e-3))
    state = training.create_train_state(model, tx, jax.random.PRNGKey(0), (1, SIZE, SIZE, 1))
    table = np.arange(3)[None]
    step = members.relabel_for_member(parallel.train(training.make_train_step()), table[0],
                                      np.ones(3, np.float32))
    predict = parallel.predict(training.make_eval_step())
    with MetricWriter(out, tensorboard=False) as writer:
        result = training.fit(
            state, step=step, predict=lambda s, b: predict(s, b)[None], parallel=parallel,
            train_data=loader, val_data=val,
            config=training.FitConfig(epochs=EPOCHS, steps_per_epoch=STEPS, monitor=monitor,
                                      patience=patience, progress=False),
            stacked=False, member_names=["all"], checkpoint_dir=out / "ckpt",
            on_record=writer.write)
        writer.rewrite(result.records)
    return result


def _records(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, trains):
    out = tmp_path_factory.mktemp("full")
    return out, _fit(out)


def _assert_same_run(out: Path, resumed, ref_out: Path, ref) -> None:
    assert _records(resumed.records) == _records(ref.records)
    chex.assert_trees_all_equal(resumed.variables, ref.variables)
    np.testing.assert_array_equal(resumed.best_epoch, ref.best_epoch)
    chex.assert_trees_all_equal(final_checkpoint(out / "ckpt"),
                                final_checkpoint(ref_out / "ckpt"))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert _records(lines) == _records(ref.records)


@pytest.mark.parametrize("where", CRASH_POINTS)
def test_a_crash_at_any_write_resumes_bit_identical(where, uninterrupted, tmp_path,
                                                    monkeypatch):
    ref_out, ref = uninterrupted
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        parallel = inject(where, patch, steps=STEPS)
        with pytest.raises(Crash):
            _fit(out, parallel)
    if where == "inside_save":   # the half-written epoch 2 is not a checkpoint
        assert training.Checkpointer(out / "ckpt").latest_epoch() == 1
    resumed = _fit(out)
    _assert_same_run(out, resumed, ref_out, ref)


def test_keep_k_and_one_item_set_per_epoch(uninterrupted):
    out, _ = uninterrupted
    epochs = sorted(p.name for p in (out / "ckpt").iterdir() if p.name.isdigit())
    assert epochs == ["2", "3"]                                # keep_checkpoints=2
    assert {p.name for p in (out / "ckpt" / "3").iterdir()} >= {"items", "records", "data"}


def test_nan_stops_and_names_the_last_good_checkpoint(tmp_path):
    with pytest.raises(training.TrainingDiverged,
                       match=r"\['all'\] at step 4 \(epoch 2\).*last good checkpoint: .*ckpt/1"):
        _fit(tmp_path, Interrupted(at=STEPS + 2, poison=True))


def test_non_finite_state_is_never_written(tmp_path):
    model = backbones.create("simple_cnn", num_classes=3, width=0.25)
    tx = training.make_optimizer(training.OptimConfig())
    state = training.create_train_state(model, tx, jax.random.PRNGKey(0), (1, SIZE, SIZE, 1))
    bad = state.replace(params=jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(np.inf),
                                            state.params))
    best = {"params": state.params, "batch_stats": state.batch_stats}
    stopper = training.EarlyStopping.start(1, "val_loss", 3).as_dict()
    with training.Checkpointer(tmp_path) as checkpointer:
        with pytest.raises(training.NonFiniteError, match="refusing to checkpoint epoch 1"):
            checkpointer.save(1, bad, best, stopper, [])
        assert checkpointer.latest_epoch() is None
        checkpointer.save(1, state, best, stopper, [{"epoch": 1}])
        restored = checkpointer.restore(bad, best, stopper)
    chex.assert_trees_all_equal(jax.device_get(restored[0].params),
                                jax.device_get(state.params))
    assert restored[3] == [{"epoch": 1}] and restored[4] == 1


@pytest.mark.parametrize("monitor,values,best", [
    ("val_loss", [0.9, 0.5, 0.7], 2), ("val_macro_f1", [0.2, 0.6, 0.4], 2),
    ("val_accuracy", [0.5, 0.4, 0.6], 3)])
def test_early_stopping_follows_the_monitor(monitor, values, best):
    stop = training.EarlyStopping.start(1, monitor, patience=2)
    for epoch, v in enumerate(values, 1):
        stop.update(epoch, np.array([v]))
    assert stop.best_epoch.tolist() == [best]


def test_early_stopping_is_per_member():
    stop = training.EarlyStopping.start(2, "val_loss", patience=1)
    np.testing.assert_array_equal(stop.update(1, np.array([1.0, 1.0])), [True, True])
    np.testing.assert_array_equal(stop.update(2, np.array([0.5, 2.0])), [True, False])
    assert stop.active.tolist() == [True, False]
    np.testing.assert_array_equal(stop.update(3, np.array([0.4, 0.1])), [True, False])
    assert stop.best_epoch.tolist() == [3, 1]


def test_member_metrics_use_each_members_own_examples():
    table = np.array([[0, 1, 2], [-1, 0, 1]])        # a 3-class member and a 2-class one
    labels = np.array([0, 1, 2, 2])
    logits = np.zeros((2, 4, 3))
    logits[0, [0, 1, 2, 3], [0, 1, 0, 2]] = 5.0      # member 0: 3 of 4 right
    logits[1, [1, 2, 3], [0, 0, 1]] = 5.0            # member 1: sees 3 examples, 2 right
    m = members.relabel_metrics(table)(logits[:, :, :3], labels)
    np.testing.assert_allclose(m["val_accuracy"], [0.75, 2 / 3])
    # member 0: class 0 precision 0.5 recall 1, class 1 perfect, class 2 precision 1 recall 0.5
    assert m["val_macro_f1"][0] == pytest.approx(np.mean([2 / 3, 1.0, 2 / 3]))
