"""experiments.compare at tiny size: every file written, each run's decision rules scored
as the run scored them, paired tests on shared examples; one config per run (each backbone
with its family's defaults); --reuse keeps finished runs (rewriting the analysis), resumes
interrupted ones and refuses runs made with other settings."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from settings import TINY_ARGS

from ensembles import RunConfig
from ensembles.config import FAMILY_DEFAULTS
from ensembles.research import compare as library
from ensembles.research import comparison
from experiments import compare

# the comparison sets the backbone per run; the metrics carry CIs
ARGS = [*(a for a in TINY_ARGS if a not in ("--backbone", "simple_cnn")), "--n-bootstrap", "1000"]


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
    code = compare.main(["--strategies", "single,ovo,cascade,stack", "--backbones",
                         "simple_cnn", "--seeds", "1", "--compare-out", str(out), *ARGS,
                         "--meta", "logreg", "--cache-dir", str(tmp_path / "tfds"),
                         # the cross set: the training data itself (same seed, count, size)
                         "--cross-dataset", "synthetic_cxr", "--cross-option", "count=120",
                         "--cross-option", "image_size=16"])
    assert code == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"report: {out / 'compare.md'}"
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert [(r["strategy"], r["variant"]) for r in rows] == [
        ("single", "single"), ("single", "single+meta"), ("ovo", "ovo-votes"),
        ("ovo", "ovo-coupling"), ("ovo", "ovo+meta"), ("cascade", "cascade"),
        ("cascade", "cascade-tuned"), ("cascade", "cascade+meta"), ("stack", "stack")]
    for s in ("single", "ovo"):
        config = _config(out / f"{s}-simple_cnn-seed0")
        assert (config.ensemble.strategy, config.model.backbone, config.training.seed,
                config.data.image_size, config.model.width) == (s, "simple_cnn", 0, 16, 0.25)
    assert json.loads((out / "stack-simple_cnn-seed0" / "config.json").read_text())["runs"] == [
        str(out / "ovo-simple_cnn-seed0"), str(out / "cascade-simple_cnn-seed0")]
    metrics = {s: json.loads((out / f"{s}-simple_cnn-seed0" / "metrics.json").read_text())
               for s in ("single", "ovo", "cascade", "stack")}
    by = {r["variant"]: r for r in rows}
    # each run's own rule, recomputed from its member outputs, is what the run saved
    for s, own in (("single", "single"), ("ovo", "ovo-votes"), ("cascade", "cascade"),
                   ("stack", "stack")):
        r, m = by[own], metrics[s]
        assert float(r["macro_f1"]) == pytest.approx(m["macro_f1"])
        assert float(r["accuracy"]) == pytest.approx(m["accuracy"])
        for c, v in m["per_class"].items():
            assert float(r[f"sensitivity_{c}"]) == pytest.approx(v["recall"])
            assert float(r[f"specificity_{c}"]) == pytest.approx(v["specificity"])
        if s != "stack":
            assert float(r["ece_before"]) == pytest.approx(m["temperature_scaling"]["ece_before"])
            assert float(r["ece_after"]) == pytest.approx(m["temperature_scaling"]["ece_after"])
            run = out / f"{s}-simple_cnn-seed0"
            z = np.load(run / "outputs.npz")
            variant = next(v for v in comparison.variants(run) if v.name == own)
            np.testing.assert_allclose(variant.test_proba, z["test_proba"], atol=1e-12)
            np.testing.assert_array_equal(variant.test_pred, z["test_pred"])
    # the other rules score as each run scored them itself (ensembles.api: its "variants")
    for ours, s, theirs in (("ovo-coupling", "ovo", "ovo coupling"),
                            ("cascade-tuned", "cascade", "cascade thresholded"),
                            ("single+meta", "single", "meta logreg"),
                            ("ovo+meta", "ovo", "meta logreg"),
                            ("cascade+meta", "cascade", "meta logreg")):
        [saved] = [v for v in metrics[s]["variants"] if v["name"].startswith(theirs)]
        assert float(by[ours]["macro_f1"]) == pytest.approx(saved["macro_f1"]), ours
        assert float(by[ours]["accuracy"]) == pytest.approx(saved["accuracy"]), ours
    # cost: one epoch per member (6 OvO pairs, 2 cascade stages); a stack costs its runs
    assert [int(by[v]["member_epochs"]) for v in ("single", "ovo-votes", "cascade", "stack")
            ] == [1, 6, 2, 8]
    assert float(by["stack"]["train_seconds"]) == pytest.approx(
        float(by["ovo-votes"]["train_seconds"]) + float(by["cascade"]["train_seconds"]))
    doc = json.loads((out / "compare.json").read_text())
    assert doc["baseline"] == "single"
    assert [t["variant"] for t in doc["paired"]] == [r["variant"] for r in rows[1:]]
    base = np.load(out / "single-simple_cnn-seed0" / "outputs.npz")
    for t in doc["paired"]:
        z = np.load(out / f"{by[t['variant']]['strategy']}-simple_cnn-seed0" / "outputs.npz")
        np.testing.assert_array_equal(z["test_label"], base["test_label"])  # same examples
        if t["variant"] in ("ovo-votes", "cascade", "stack"):   # the runs' own decisions
            right = z["test_pred"] == z["test_label"]
            right_base = base["test_pred"] == z["test_label"]
            assert t["mcnemar_p"] == pytest.approx(_mcnemar_p(
                int(np.sum(right & ~right_base)), int(np.sum(~right & right_base))))
        assert t["macro_f1_diff"] == pytest.approx(
            float(by[t["variant"]]["macro_f1"]) - metrics["single"]["macro_f1"], abs=1e-9)
        assert t["diff_ci95"][0] <= t["macro_f1_diff"] <= t["diff_ci95"][1]
        assert t["mcnemar_p"] <= t["mcnemar_p_holm"] <= 1
    # cross set: every training / validation image is found; the rest is the test split
    assert [c["strategy"] for c in doc["cross_set"]] == ["single", "ovo", "cascade", "stack"]
    for c in doc["cross_set"]:
        z = np.load(out / f"{c['strategy']}-simple_cnn-seed0" / "outputs.npz")
        assert c["examples"] == 120 and c["leakage_checked"]
        assert c["duplicated_images"] == len(np.unique(z["train_indices"])) + len(z["val_index"])
        assert c["macro_f1_without_duplicates"] == pytest.approx(metrics[c["strategy"]]["macro_f1"])
    assert "## Cross-set macro-F1 (synthetic_cxr" in (out / "compare.md").read_text()
    # one seed: the sign-flip test cannot reject (p = 1 for any difference)
    assert {(t["p"], t["min_p"]) for t in doc["across_seeds"]} == {(1.0, 1.0)}
    for f in ("compare.png", "compare_curves.png"):
        assert (out / f).stat().st_size > 1000
    md = (out / "compare.md").read_text()
    assert "± " in md and "Holm family: per backbone" in md
    assert "| cascade-tuned | simple_cnn | 1 |" in md
    # the stack's CIs resample patients, as the runs it stacks do
    ids = np.load(out / "ovo-simple_cnn-seed0" / "outputs.npz")["test_patient_id"]
    assert metrics["stack"]["n_patients"] == len(set(ids.tolist())) > 0


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
    assert library.stacked_runs(planned, stack) == [tmp_path / "cascade-simple_cnn-seed0"]


@pytest.mark.slow
def test_reuse_keeps_finished_runs_and_refuses_other_settings(tmp_path, capsys):
    out, cache = tmp_path / "cmp", str(tmp_path / "tfds")
    argv = ["--strategies", "single,ova", "--backbones", "simple_cnn", "--seeds", "1",
            "--compare-out", str(out), *ARGS, "--cache-dir", cache]
    assert compare.main(argv) == 0
    first = (out / "compare.csv").read_text()
    stamp = (out / "ova-simple_cnn-seed0" / "metrics.json").stat().st_mtime_ns
    report = {f: (out / f).read_text() for f in ("compare.md", "compare.json")}
    for f in ("compare.csv", "compare.md", "compare.json", "compare.png", "compare_curves.png"):
        (out / f).unlink()
    assert compare.main([*argv, "--reuse"]) == 0   # the analysis again, without training
    assert (out / "ova-simple_cnn-seed0" / "metrics.json").stat().st_mtime_ns == stamp
    assert (out / "compare.csv").read_text() == first
    assert {f: (out / f).read_text() for f in report} == report
    assert all((out / f).is_file() for f in ("compare.png", "compare_curves.png"))
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


def test_a_bad_cross_option_is_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert compare.main(["--strategies", "single", "--compare-out", str(out),
                         "--cross-dataset", "synthetic_cxr", "--cross-option", "count"]) == 2
    assert "--cross-option 'count': give KEY=VALUE" in capsys.readouterr().err
    assert not out.exists()
