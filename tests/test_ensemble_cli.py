"""The ova / ovo / cascade CLIs end to end on synthetic_cxr at tiny size, and their bad-input
errors (raised before anything is written)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments import ensemble_cli

TINY = ["--image-size", "16", "--count", "120", "--epochs", "1", "--width", "0.25",
        "--batch-size", "16", "--no-progress"]
FILES = ("config.json", "combiner.json", "metrics.json", "metrics.jsonl", "report.md",
         "confusion.png", "roc.png", "reliability.png", "curves.png", "outputs.npz")


def _run(strategy, tmp_path, cache, *extra):
    out = tmp_path / strategy
    return ensemble_cli.run(strategy, [*TINY, "--out", str(out), "--cache-dir", str(cache),
                                       *extra])


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.mark.slow
@pytest.mark.parametrize("strategy,members", [("ovo", 6), ("cascade", 2)])
def test_cli_end_to_end(strategy, members, tmp_path, cache):
    out = _run(strategy, tmp_path, cache, "--meta", "logreg")
    for name in FILES:
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["bundle"]["format_version"] == 1
    assert len(config["bundle"]["tasks"]["names"]) == members
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy", "macro_f1", "roc_auc_macro", "ece", "ci95", "temperature_scaling"):
        assert key in metrics, key
    names = [v["name"] for v in metrics["variants"]]
    assert any(n.startswith("meta logreg") for n in names)
    if strategy == "cascade":
        assert any(n.startswith("cascade thresholded") for n in names)
    outputs = np.load(out / "outputs.npz")
    assert not np.isin(outputs["val_index"], outputs["train_indices"]).any()
    assert (out / "meta.json").is_file()


def test_cascade_without_healthy_class_fails_before_writing(tmp_path, cache):
    out = tmp_path / "cascade"
    with pytest.raises(ValueError, match="healthy class"):
        ensemble_cli.run("cascade", [*TINY, "--classes", "covid,viral_pneumonia,"
                                     "bacterial_pneumonia", "--out", str(out),
                                     "--cache-dir", str(cache)])
    assert not out.exists()


def test_ovo_pair_too_small_fails_before_writing(tmp_path, cache):
    out = tmp_path / "ovo"
    with pytest.raises(ValueError, match="training examples per class"):
        ensemble_cli.run("ovo", [*TINY, "--min-per-class", "1000", "--out", str(out),
                                 "--cache-dir", str(cache)])
    assert not out.exists()


def test_existing_run_is_not_overwritten(tmp_path, cache):
    out = tmp_path / "ova"
    out.mkdir()
    (out / "report.md").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        ensemble_cli.run("ova", [*TINY, "--out", str(out), "--cache-dir", str(cache)])
    assert (out / "report.md").read_text() == "keep me"


def test_main_prints_one_line_error(tmp_path, cache, capsys):
    code = ensemble_cli.main("cascade", "", [*TINY, "--classes", "covid,viral_pneumonia",
                                             "--out", str(tmp_path / "x"),
                                             "--cache-dir", str(cache)])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert code == 2 and len(err) == 1 and err[0].startswith("error: cascade needs")
    assert "Traceback" not in err[0]


@pytest.mark.slow
def test_meta_on_out_of_fold_outputs(tmp_path, cache):
    out = _run("ova", tmp_path, cache, "--meta", "logreg", "--meta-folds", "2")
    metrics = json.loads((out / "metrics.json").read_text())
    meta = [v for v in metrics["variants"] if v["name"].startswith("meta logreg")]
    assert [v["name"] for v in meta] == ["meta logreg (fit on 2-fold out-of-fold member outputs)"]
    assert 0.0 <= meta[0]["macro_f1"] <= 1.0
    for f in (0, 1):   # one member training per fold, logged apart from the final members'
        records = (out / "oof" / f"fold-{f}" / "metrics.jsonl").read_text().splitlines()
        # --members auto: one after another on CPU, one record per member and epoch
        assert sorted(json.loads(r)["member"] for r in records) == [0, 1, 2, 3]
    assert (out / "meta.json").is_file()


@pytest.mark.parametrize("extra,message", [
    (["--meta-folds", "2"], "--meta-folds needs --meta"),
    (["--meta", "logreg", "--meta-folds", "1"], "--meta-folds needs --meta and K >= 2"),
    (["--meta", "logreg", "--meta-folds", "500"], "fewer than k=500 folds"),
])
def test_bad_meta_folds_fail_before_writing(extra, message, tmp_path, cache):
    out = tmp_path / "ova"
    with pytest.raises(ValueError, match=message):
        ensemble_cli.run("ova", [*TINY, *extra, "--out", str(out), "--cache-dir", str(cache)])
    assert not out.exists()
