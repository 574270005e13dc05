"""`python -m experiments.single` end to end on synthetic_cxr at tiny size."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ensembles import Ensemble
from ensembles.config import FAMILY_DEFAULTS
from experiments import common
from experiments.ensemble_cli import main
from experiments.single import DESCRIPTION


def single_main(argv):
    return main("single", DESCRIPTION, argv)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds-cache")


def _argv(out, cache, *extra):
    return ["--backbone", "simple_cnn", "--count", "64", "--image-size", "16", "--width",
            "0.25", "--epochs", "2", "--batch-size", "8", "--n-bootstrap", "20",
            "--cache-dir", str(cache), "--out", str(out), "--no-progress", *extra]


@pytest.mark.slow
def test_single_writes_every_file(tmp_path, cache, capsys):
    out = tmp_path / "run"
    assert single_main(_argv(out, cache)) == 0
    line = capsys.readouterr().out.strip()
    metrics = json.loads((out / "metrics.json").read_text())
    lo, hi = metrics["ci95"]["macro_f1"]
    assert line.startswith(f"test accuracy {metrics['accuracy']:.3f} [")
    assert f"macro-F1 {metrics['macro_f1']:.3f} [{lo:.3f}, {hi:.3f}]" in line
    assert "chance 0.250 for 4 classes" in line and line.endswith(f"report: {out / 'report.html'}")
    assert ("AT CHANCE" in line) == (lo <= 0.25)
    for name in ("config.json", "metrics.json", "report.md", "confusion.png", "curves.png",
                 "metrics.jsonl", "roc.png", "reliability.png", "combiner.json"):
        assert (out / name).stat().st_size > 0, name
    assert sorted(p.name for p in (out / "checkpoints" / "stack-0" / "member-0").iterdir()
                  if p.name.isdigit()) == ["1", "2"]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["model"]["backbone"] == "simple_cnn"
    assert config["config"]["training"]["epochs"] == 2
    # every "auto" resolved before training and recorded (on CPU: fp32, members in turn)
    assert config["config"]["model"]["head"] == "imagenet"
    assert config["config"]["model"]["precision"] == "fp32"
    assert config["config"]["training"]["members"] == "sequential"
    assert config["config"]["training"]["member_data"] == "shared"
    assert config["config"]["data"]["dataset"] == "synthetic_cxr"
    assert config["member_names"] == ["all"]
    assert config["class_names"] == ["covid", "normal", "viral_pneumonia",
                                     "bacterial_pneumonia"]
    n_test = config["split_sizes"]["test"]
    assert sum(map(sum, metrics["confusion_matrix"])) == n_test
    # The metrics are those of the saved test predictions, recomputed here by hand.
    saved = np.load(out / "outputs.npz")
    y, pred = saved["test_label"], saved["test_pred"]
    cm = np.zeros((4, 4), int)
    np.add.at(cm, (y, pred), 1)
    assert metrics["confusion_matrix"] == cm.tolist()
    assert metrics["accuracy"] == pytest.approx(np.trace(cm) / n_test, abs=1e-12)
    present = cm.sum(1) > 0
    f1 = 2 * np.diag(cm) / (cm.sum(0) + cm.sum(1)).clip(min=1)
    assert metrics["macro_f1"] == pytest.approx(f1[present].mean(), abs=1e-12)
    assert [r["f1"] for r in metrics["per_class"].values()] == pytest.approx(f1, abs=1e-12)
    assert set(metrics["per_class"]) == set(config["class_names"])
    for row in metrics["per_class"].values():
        assert {"precision", "recall", "specificity", "f1", "support"} <= set(row)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert {"epoch", "step", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
            "val_macro_f1", "images_per_s", "step_time_s", "seconds"} <= set(records[0])
    steps = config["split_sizes"]["train"] // 8
    assert [r["step"] for r in records] == [steps, 2 * steps]


@pytest.mark.slow
def test_single_cli_and_ensemble_single_agree(tmp_path, cache):
    """The CLI and the Python API with the same settings give the same metrics."""
    out = tmp_path / "cli"
    assert single_main(_argv(out, cache)) == 0
    cli = json.loads((out / "metrics.json").read_text())
    api = Ensemble("single", backbone="simple_cnn", count=64, image_size=16, width=0.25,
                   epochs=2, batch_size=8, n_bootstrap=20, cache_dir=str(cache),
                   progress=False).fit(out=tmp_path / "api")
    assert api.metrics_ == cli
    assert api.members_ == ("all",)


def test_refuses_a_non_empty_out_and_missing_weights(tmp_path, cache, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert single_main(_argv(out, cache)) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert single_main(_argv(tmp_path / "other", cache, "--pretrained",
                             str(tmp_path / "missing.h5"))) == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("backbone,family", [("simple_cnn", "custom_cnn"),
                                             ("resnet50", "imagenet")])
def test_help_shows_the_defaults_of_the_backbones_family(backbone, family, capsys):
    d, other = FAMILY_DEFAULTS[family], FAMILY_DEFAULTS[
        "imagenet" if family == "custom_cnn" else "custom_cnn"]
    name = {"custom_cnn": "custom CNNs", "imagenet": "ImageNet backbones"}
    mine, theirs = name[family], name["imagenet" if family == "custom_cnn" else "custom_cnn"]
    with pytest.raises(SystemExit):
        common.parse("single", ["--backbone", backbone, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--dataset", "--parallel", "--precision", "--balance", "--freeze",
                 "--early-stopping-patience", "--augment, --no-augment", "--monitor"):
        assert flag in text, flag
    assert "(default: synthetic_cxr, or the layout --data-dir holds" in text
    assert "(default: shard_map)" in text
    assert (f"--epochs EPOCHS (default: {d['epochs']} for {mine} like {backbone}, "
            f"{other['epochs']} for {theirs})") in text
    assert (f"--batch-size BATCH_SIZE global batch size (default: {d['batch_size']} for "
            f"{mine} like {backbone}, {other['batch_size']} for {theirs})") in text
    assert (f"--count COUNT synthetic_cxr: examples (default: {d['count']} for {mine} like "
            f"{backbone}, {other['count']} for {theirs})") in text


@pytest.mark.slow
def test_simple_cnn_beats_chance_on_synthetic(tmp_path, cache):
    """Normal vs bacterial pneumonia, 300 phantoms at 32 px: well above the 0.5 of chance."""
    out = tmp_path / "run"
    argv = ["--backbone", "simple_cnn", "--count", "300", "--classes",
            "normal,bacterial_pneumonia", "--image-size", "32", "--width", "0.5",
            "--epochs", "6", "--batch-size", "16", "--no-augment", "--lr", "3e-3",
            "--n-bootstrap", "20", "--cache-dir", str(cache), "--out", str(out),
            "--no-progress"]
    assert single_main(argv) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["val_accuracy"][0] for r in records) >= 0.75, records
    assert json.loads((out / "metrics.json").read_text())["accuracy"] >= 0.6  # 44 test images
