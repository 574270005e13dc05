"""Orbax checkpoints: resume is bit-identical, non-finite states are never written, keep-K."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import backbones
from backbones import training
from data_pipeline.loader import make_loader
from data_pipeline.preprocess import PreprocessConfig

SIZE, N, BATCH, STEPS = 16, 24, 8, 2  # 16 training examples: 2 steps per epoch


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


class Interrupted(training.DataParallel):
    """Stops (KeyboardInterrupt) or poisons the batch (NaN) at the k-th train call."""

    def __init__(self, at: int, poison: bool = False):
        super().__init__("shard_map", tuple(jax.devices()[:1]))
        object.__setattr__(self, "at", at)
        object.__setattr__(self, "poison", poison)

    def train(self, step_fn, **kwargs):
        inner, calls = super().train(step_fn, **kwargs), [0]

        def run(state, batch):
            calls[0] += 1
            if calls[0] == self.at:
                if not self.poison:
                    raise KeyboardInterrupt
                batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
            return inner(state, batch)
        return run


def _fit(tmp_path, parallel, *, epochs=3):
    source = TinySource()
    loader = make_loader(source, np.arange(16), batch_size=BATCH,
                         preprocess=PreprocessConfig(image_size=SIZE), shuffle=True, seed=3,
                         num_epochs=epochs)
    val = make_loader(source, np.arange(16, N), batch_size=BATCH,
                      preprocess=PreprocessConfig(image_size=SIZE), shuffle=False,
                      drop_remainder=False)
    model = backbones.create("simple_cnn", num_classes=3, width=0.25, axis_name="batch",
                             head="dense512_dropout")
    tx = training.make_optimizer(training.OptimConfig(learning_rate=3e-3))
    state = training.create_train_state(model, tx, jax.random.PRNGKey(0), (1, SIZE, SIZE, 1))
    checkpointer = training.Checkpointer(tmp_path / "checkpoint", keep=2)
    try:
        return training.fit(
            state, parallel=parallel, train_step=training.make_train_step(),
            eval_step=training.make_eval_step(), train_loader=loader, val_loader=val,
            config=training.FitConfig(epochs=epochs, steps_per_epoch=STEPS, patience=None,
                                      progress=False),
            out_dir=tmp_path, checkpointer=checkpointer), checkpointer
    finally:
        checkpointer.close()


def _records(path):
    drop = ("seconds", "images_per_s")
    return [{k: v for k, v in json.loads(line).items() if k not in drop}
            for line in path.read_text().splitlines()]


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path):
    single = training.data_parallel("shard_map", jax.devices()[:1])
    full, _ = _fit(tmp_path / "full", single)
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path / "cut", Interrupted(at=STEPS + 2))  # mid epoch 2: epoch 1 is saved
    assert _records(tmp_path / "cut" / "metrics.jsonl") == _records(
        tmp_path / "full" / "metrics.jsonl")[:1]
    resumed, checkpointer = _fit(tmp_path / "cut", single)
    assert _records(tmp_path / "cut" / "metrics.jsonl") == _records(
        tmp_path / "full" / "metrics.jsonl")
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    for a, b in zip(jax.tree.leaves(jax.device_get(full.state)),
                    jax.tree.leaves(jax.device_get(resumed.state)), strict=True):
        assert np.array_equal(a, b)
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoint" / "latest").iterdir()
                  if p.name.isdigit()) == ["4", "6"]          # keep=2
    assert len([p for p in (tmp_path / "cut" / "checkpoint" / "best").iterdir()
                if p.name.isdigit()]) == 1


def test_nan_stops_and_names_the_last_good_checkpoint(tmp_path):
    with pytest.raises(training.TrainingDiverged,
                       match=r"at step 4 \(epoch 2\); last good checkpoint: .*latest/2"):
        _fit(tmp_path, Interrupted(at=STEPS + 2, poison=True))


def test_non_finite_state_is_never_written(tmp_path):
    model = backbones.create("simple_cnn", num_classes=3, width=0.25)
    tx = training.make_optimizer(training.OptimConfig())
    state = training.create_train_state(model, tx, jax.random.PRNGKey(0), (1, SIZE, SIZE, 1))
    bad = state.replace(params=jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(np.inf),
                                            state.params))
    checkpointer = training.Checkpointer(tmp_path)
    with pytest.raises(training.NonFiniteError, match="refusing to checkpoint step 0"):
        checkpointer.save(bad)
    assert checkpointer.path() is None
    checkpointer.save(state, best=True)
    restored = checkpointer.restore(bad, kind="best")
    assert all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(restored.params),
        strict=True))
    checkpointer.close()
