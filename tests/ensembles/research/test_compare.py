"""ensembles.research.compare called from Python, no CLI: planning from typed configs, and the
analysis and report of fake scored rows whose values are known."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from ensembles.config import FAMILY_DEFAULTS
from ensembles.research import compare
from ensembles.research.compare_report import markdown, write_outputs

CLASSES = ("normal", "pneumonia")


def _row(variant: str, seed: int, macro_f1: float, pred: np.ndarray, y: np.ndarray) -> dict:
    proba = np.eye(2)[pred]
    return {"strategy": variant, "variant": variant, "backbone": "simple_cnn", "seed": seed,
            "run": f"runs/{variant}-{seed}", "accuracy": macro_f1 + 0.05, "macro_f1": macro_f1,
            "roc_auc_macro": 0.9, "ece_before": 0.1, "ece_after": 0.05, "temperature": 1.5,
            "member_epochs": 2 if variant == "ova" else 1, "train_seconds": 10.0 * (seed + 1),
            "ci95": {"macro_f1": (macro_f1 - 0.1, macro_f1 + 0.1)} if seed == 0 else {},
            "per_class": {c: {"sensitivity": 0.5 + i / 10, "specificity": 0.9}
                          for i, c in enumerate(CLASSES)},
            "y": y, "proba": proba, "pred": pred, "ids": None}


@pytest.fixture()
def result():
    y = np.arange(20) % 2
    wrong = y.copy()
    wrong[:5] = 1 - wrong[:5]            # the single model misses 5 that OvA gets right
    rows = [_row("single", s, f1, wrong, y) for s, f1 in ((0, 0.6), (1, 0.7))]
    rows += [_row("ova", s, f1, y, y) for s, f1 in ((0, 0.8), (1, 0.7))]
    curves = {("ova", "simple_cnn"): {"normal-vs-rest": [(1, 0.5), (2, 0.6)]}}
    return compare.analysis(rows, "single", curves=curves)


def test_the_analysis_of_known_rows(result):
    summary = {r["variant"]: r for r in result["summary"]}
    assert summary["ova"]["macro_f1"] == pytest.approx((0.75, 0.05))
    assert summary["single"]["macro_f1"] == pytest.approx((0.65, 0.05))
    assert summary["ova"]["macro_f1_ci95_seed0"] == pytest.approx((0.7, 0.9))
    assert summary["ova"]["train_seconds"] == pytest.approx((15.0, 5.0))
    # per seed: 5 discordant pairs all one way -> exact McNemar p = 2 / 2^5; Holm over 2
    assert [(t["variant"], t["seed"]) for t in result["paired"]] == [("ova", 0), ("ova", 1)]
    for t in result["paired"]:
        assert t["mcnemar_p"] == pytest.approx(0.0625)
        assert t["mcnemar_p_holm"] == pytest.approx(0.125)
        assert t["macro_f1_diff"] > 0 and t["diff_ci95"][0] <= t["macro_f1_diff"]
    # across seeds: differences 0.2 and 0.0; two seeds cannot get below p = 2 / 2^2
    [t] = result["across_seeds"]
    assert t["seeds"] == [0, 1] and t["mean_diff"] == pytest.approx(0.1)
    assert t["min_p"] == pytest.approx(0.5) and t["p"] == pytest.approx(1.0)


def test_the_report_of_known_rows(result, tmp_path):
    md = markdown(result)
    assert "| ova | simple_cnn | 2 | 0.800 ± 0.050 | 0.750 ± 0.050 [0.700, 0.900] |" in md
    assert "| ova | simple_cnn | 0.500 / 0.900 | 0.600 / 0.900 |" in md
    assert "| ova | simple_cnn | 2.0 ± 0.0 | 15.0 ± 5.0 |" in md
    assert "## Across seeds: macro-F1 difference against single" in md
    write_outputs(tmp_path, result)
    rows = list(csv.DictReader((tmp_path / "compare.csv").open()))
    assert [(r["variant"], r["seed"]) for r in rows] == [
        ("single", "0"), ("single", "1"), ("ova", "0"), ("ova", "1")]
    assert float(rows[2]["macro_f1"]) == 0.8 and rows[2]["sensitivity_pneumonia"] == "0.6"
    doc = json.loads((tmp_path / "compare.json").read_text())
    assert doc["baseline"] == "single" and "y" not in doc["runs"][0]
    assert (tmp_path / "compare.md").read_text() == md
    for f in ("compare.png", "compare_curves.png"):
        assert (tmp_path / f).stat().st_size > 1000


def test_plan_from_typed_configs(tmp_path):
    bases = compare.base_configs(["simple_cnn", "resnet50"], epochs=2, lr=0.01)
    planned = compare.plan(["stack", "single", "cascade"], bases, 2, tmp_path)
    assert [(p.strategy, p.backbone, p.seed) for p in planned] == [
        (s, b, seed) for b in ("simple_cnn", "resnet50") for seed in (0, 1)
        for s in ("single", "cascade", "stack")]            # "stack" moved last
    for p in planned:
        if p.config is None:
            continue
        c = p.config
        assert (c.ensemble.strategy, c.model.backbone, c.training.seed) == (
            p.strategy, p.backbone, p.seed)
        assert (c.training.epochs, c.training.lr) == (2, 0.01)
        family = FAMILY_DEFAULTS[{"simple_cnn": "custom_cnn", "resnet50": "imagenet"}[p.backbone]]
        assert c.data.count == family["count"]
    assert compare.stacked_runs(planned, planned[2]) == [tmp_path / "cascade-simple_cnn-seed0"]
    assert [compare.decide(planned, p, reuse=True) for p in planned[:3]] == ["train"] * 3
    with pytest.raises(ValueError, match=r"unknown strategy \['bagging'\]"):
        compare.plan(["ova", "bagging"], bases, 1, tmp_path)
    with pytest.raises(ValueError, match="--seeds must be >= 1"):
        compare.plan(["ova"], bases, 0, tmp_path)
    assert not any(tmp_path.iterdir())                  # planning writes nothing
