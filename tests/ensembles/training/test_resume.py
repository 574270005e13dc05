"""An OvA ensemble killed at any write of an epoch resumes to exactly the uninterrupted run:
member variables, optimizer state, best snapshots, metric records and the test metrics."""

from __future__ import annotations

import json

import chex
import jax
import pytest
from crash_points import CRASH_POINTS, TIMING, Crash, final_checkpoint, inject

from ensembles import Ensemble
from ensembles.training import fitting

SETTINGS = {"backbone": "simple_cnn", "image_size": 16, "count": 120, "width": 0.25,
            "epochs": 3, "batch_size": 16, "members": "stacked", "n_bootstrap": 20,
            "early_stopping_patience": 0, "progress": False}
STEPS = 84 // 16     # 120 phantoms: 84 training examples


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache, trains):
    out = tmp_path_factory.mktemp("full") / "ova"
    return Ensemble("ova", cache_dir=cache, **SETTINGS).fit(out=out)


def _lines(path):
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING}
            for x in path.read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("where", CRASH_POINTS)
def test_ova_killed_anywhere_resumes_exactly(where, uninterrupted, cache, tmp_path,
                                             monkeypatch):
    out = tmp_path / "ova"
    with monkeypatch.context() as patch:
        parallel = inject(where, patch, steps=STEPS)
        if parallel is not None:
            patch.setattr(fitting.training, "data_parallel", lambda mode: parallel)
        with pytest.raises(Crash):
            Ensemble("ova", cache_dir=cache, **SETTINGS).fit(out=out)
    assert not (out / "metrics.json").exists()          # nothing looks finished
    resumed = Ensemble("ova", cache_dir=cache, **SETTINGS).fit(out=out, resume=True)
    ref = uninterrupted.run_dir_
    assert resumed.metrics_ == uninterrupted.metrics_
    chex.assert_trees_all_equal(resumed.bundle_.variables, uninterrupted.bundle_.variables)
    chex.assert_trees_all_equal(final_checkpoint(out / "checkpoints" / "stack-0"),
                                final_checkpoint(ref / "checkpoints" / "stack-0"))
    assert _lines(out / "metrics.jsonl") == _lines(ref / "metrics.jsonl")
    assert [r["epoch"] for r in _lines(out / "metrics.jsonl")] == [1, 2, 3]
    assert jax.tree.structure(resumed.bundle_.variables) == jax.tree.structure(
        uninterrupted.bundle_.variables)
