"""experiments.compare at tiny size: every file written, paired tests on shared examples."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from experiments import compare

TINY = ["--image-size", "16", "--count", "120", "--epochs", "1", "--width", "0.25",
        "--batch-size", "16", "--no-progress"]


@pytest.mark.slow
def test_compare_tiny(tmp_path):
    out = tmp_path / "cmp"
    code = compare.main(["--strategies", "single,ova,stack", "--backbones", "simple_cnn",
                         "--seeds", "1", "--compare-out", str(out), *TINY,
                         "--cache-dir", str(tmp_path / "tfds")])
    assert code == 0
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert [r["strategy"] for r in rows] == ["single", "ova", "stack"]
    for r in rows:
        assert 0.0 <= float(r["macro_f1"]) <= 1.0
    doc = json.loads((out / "compare.json").read_text())
    assert {t["strategy"] for t in doc["paired"]} == {"ova", "stack"}
    for t in doc["paired"]:
        assert 0.0 < t["mcnemar_p"] <= 1.0
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
    assert compare.main([*argv, "--reuse", "--lr", "0.01"]) == 2
    assert "was made with other settings (lr: 0.001 vs 0.01)" in capsys.readouterr().err
