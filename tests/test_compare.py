"""experiments.compare at tiny size: every file written, paired tests on shared examples;
one config per run (each backbone with its family's defaults); --reuse keeps finished runs,
resumes interrupted ones and refuses runs made with other settings."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from ensembles import RunConfig
from ensembles.config import FAMILY_DEFAULTS
from experiments import compare

TINY = ["--image-size", "16", "--count", "120", "--epochs", "1", "--width", "0.25",
        "--batch-size", "16", "--no-progress"]


def _config(run_dir) -> RunConfig:
    return RunConfig.from_dict(json.loads((run_dir / "config.json").read_text())["config"])


def _mcnemar_p(b: int, c: int) -> float:
    """McNemar by hand: exact two-sided binomial below 25 discordant pairs, else chi-square
    with continuity correction (1 degree of freedom: sf(x) = erfc(sqrt(x / 2)))."""
    n = b + c
    if n < 25:
        return min(1.0, 2 * sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n)
    return math.erfc(math.sqrt(max(abs(b - c) - 1, 0) ** 2 / n / 2))


@pytest.mark.slow
def test_compare_tiny(tmp_path, capsys):
    out = tmp_path / "cmp"
    code = compare.main(["--strategies", "single,ova,stack", "--backbones", "simple_cnn",
                         "--seeds", "1", "--compare-out", str(out), *TINY,
                         "--cache-dir", str(tmp_path / "tfds")])
    assert code == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"report: {out / 'compare.md'}"
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert [r["strategy"] for r in rows] == ["single", "ova", "stack"]
    for s in ("single", "ova"):
        config = _config(out / f"{s}-simple_cnn-seed0")
        assert (config.ensemble.strategy, config.model.backbone, config.training.seed,
                config.data.image_size, config.model.width) == (s, "simple_cnn", 0, 16, 0.25)
    assert json.loads((out / "stack-simple_cnn-seed0" / "config.json").read_text())["runs"] == [
        str(out / "ova-simple_cnn-seed0")]
    metrics = {s: json.loads((out / f"{s}-simple_cnn-seed0" / "metrics.json").read_text())
               for s in ("single", "ova", "stack")}
    for r in rows:  # the table reports each run's own metrics
        assert float(r["macro_f1"]) == pytest.approx(metrics[r["strategy"]]["macro_f1"])
        assert float(r["accuracy"]) == pytest.approx(metrics[r["strategy"]]["accuracy"])
    doc = json.loads((out / "compare.json").read_text())
    assert {t["strategy"] for t in doc["paired"]} == {"ova", "stack"}
    base = np.load(out / "single-simple_cnn-seed0" / "outputs.npz")
    for t in doc["paired"]:
        z = np.load(out / f"{t['strategy']}-simple_cnn-seed0" / "outputs.npz")
        np.testing.assert_array_equal(z["test_label"], base["test_label"])  # same examples
        right, right_base = z["test_pred"] == z["test_label"], base["test_pred"] == z["test_label"]
        assert t["mcnemar_p"] == pytest.approx(
            _mcnemar_p(int(np.sum(right & ~right_base)), int(np.sum(~right & right_base))))
        assert t["macro_f1_diff"] == pytest.approx(
            metrics[t["strategy"]]["macro_f1"] - metrics["single"]["macro_f1"], abs=1e-9)
        assert t["diff_ci95"][0] <= t["macro_f1_diff"] <= t["diff_ci95"][1]
    assert (out / "compare.png").stat().st_size > 1000
    assert "± " in (out / "compare.md").read_text()
    # the stack's CIs resample patients, as the runs it stacks do
    ids = np.load(out / "ova-simple_cnn-seed0" / "outputs.npz")["test_patient_id"]
    stacked = json.loads((out / "stack-simple_cnn-seed0" / "metrics.json").read_text())
    assert stacked["n_patients"] == len(set(ids.tolist())) > 0


def test_unknown_strategy_is_a_clear_error(tmp_path, capsys):
    assert compare.main(["--strategies", "ova,bagging", "--compare-out", str(tmp_path)]) == 2
    assert "unknown strategy ['bagging']" in capsys.readouterr().err


def test_flags_the_comparison_sets_per_run_are_refused(tmp_path, capsys):
    out = tmp_path / "cmp"
    for flag in (["--seed", "3"], ["--backbone", "cnn16"], ["--out", "x"], ["--resume"]):
        assert compare.main(["--strategies", "ova", "--compare-out", str(out), *flag]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {flag[0]}: the comparison sets these per run"), err
    assert not out.exists()   # nothing written before the flags are checked


def test_one_config_per_run_with_each_backbones_family_defaults(tmp_path):
    planned = compare.plan(["single", "cascade", "stack"], ["simple_cnn", "resnet50"], 2,
                           tmp_path, ["--epochs", "2", "--lr", "0.01"])
    assert [(p.strategy, p.backbone, p.seed) for p in planned] == [
        (s, b, seed) for b in ("simple_cnn", "resnet50") for seed in (0, 1)
        for s in ("single", "cascade", "stack")]
    for p in planned:
        assert p.run_dir == tmp_path / f"{p.strategy}-{p.backbone}-seed{p.seed}"
        if p.strategy == "stack":
            assert p.config is None
            continue
        c = p.config
        assert (c.ensemble.strategy, c.model.backbone, c.training.seed) == (
            p.strategy, p.backbone, p.seed)
        assert (c.training.epochs, c.training.lr) == (2, 0.01)
        family = FAMILY_DEFAULTS[{"simple_cnn": "custom_cnn", "resnet50": "imagenet"}[p.backbone]]
        assert (c.data.count, c.training.batch_size) == (family["count"], family["batch_size"])
    # the stack of a (backbone, seed) is over its other runs, the single model left out
    stack = planned[2]
    assert compare.stacked_runs(planned, stack) == [tmp_path / "cascade-simple_cnn-seed0"]


@pytest.mark.slow
def test_reuse_keeps_finished_runs_and_refuses_other_settings(tmp_path, capsys):
    out, cache = tmp_path / "cmp", str(tmp_path / "tfds")
    argv = ["--strategies", "single,ova", "--backbones", "simple_cnn", "--seeds", "1",
            "--compare-out", str(out), *TINY, "--cache-dir", cache]
    assert compare.main(argv) == 0
    first = (out / "compare.csv").read_text()
    stamp = (out / "ova-simple_cnn-seed0" / "metrics.json").stat().st_mtime_ns
    assert compare.main([*argv, "--reuse"]) == 0
    assert (out / "ova-simple_cnn-seed0" / "metrics.json").stat().st_mtime_ns == stamp
    assert (out / "compare.csv").read_text() == first
    assert "reusing" in capsys.readouterr().err
    # an interrupted run (its last files not written) is resumed from its checkpoints
    (out / "ova-simple_cnn-seed0" / "metrics.json").unlink()
    assert compare.main([*argv, "--reuse"]) == 0
    err = capsys.readouterr().err
    assert f"resuming {out / 'ova-simple_cnn-seed0'}" in err
    assert f"reusing {out / 'single-simple_cnn-seed0'}" in err
    assert (out / "compare.csv").read_text() == first
    stamp = (out / "ova-simple_cnn-seed0" / "metrics.json").stat().st_mtime_ns
    assert compare.main([*argv, "--reuse", "--lr", "0.01"]) == 2
    assert ("was made with other settings (training.lr: 0.001 vs 0.01)"
            in capsys.readouterr().err)
    assert (out / "ova-simple_cnn-seed0" / "metrics.json").stat().st_mtime_ns == stamp
    # without --reuse, finished runs are refused before anything trains
    assert compare.main(argv) == 2
    assert "exists and is not empty" in capsys.readouterr().err
