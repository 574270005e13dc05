"""`python -m experiments.single` end to end on synthetic_cxr at tiny size."""

from __future__ import annotations

import json

import pytest

from experiments import single


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds-cache")


def _argv(out, cache, *extra):
    return ["--backbone", "simple_cnn", "--count", "64", "--image-size", "16", "--width",
            "0.25", "--epochs", "2", "--batch-size", "8", "--n-bootstrap", "20",
            "--cache-dir", str(cache), "--out", str(out), "--no-progress", *extra]


def test_single_writes_every_file(tmp_path, cache, capsys):
    out = tmp_path / "run"
    assert single.main(_argv(out, cache)) == 0
    assert f"report: {out / 'report.md'}" in capsys.readouterr().out
    for name in ("config.json", "metrics.json", "report.md", "confusion.png", "curves.png",
                 "metrics.jsonl", "roc.png", "reliability.png"):
        assert (out / name).stat().st_size > 0, name
    assert any((out / "checkpoint" / "latest").glob("[0-9]*"))
    assert any((out / "checkpoint" / "best").glob("[0-9]*"))
    config = json.loads((out / "config.json").read_text())
    assert config["backbone"] == "simple_cnn" and config["epochs"] == 2
    assert config["class_names"] == ["covid", "normal", "viral_pneumonia",
                                     "bacterial_pneumonia"]
    metrics = json.loads((out / "metrics.json").read_text())
    n_test = config["split_sizes"]["test"]
    assert sum(map(sum, metrics["confusion_matrix"])) == n_test
    assert 0.0 <= metrics["accuracy"] <= 1.0 and 0.0 <= metrics["macro_f1"] <= 1.0
    assert set(metrics["per_class"]) == set(config["class_names"])
    for row in metrics["per_class"].values():
        assert {"precision", "recall", "specificity", "f1", "support"} <= set(row)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert {"epoch", "step", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
            "val_macro_f1", "images_per_s", "seconds"} <= set(records[0])
    steps = config["steps_per_epoch"]
    assert [r["step"] for r in records] == [steps, 2 * steps]


def test_refuses_a_non_empty_out_and_missing_weights(tmp_path, cache, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert single.main(_argv(out, cache)) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert single.main(_argv(tmp_path / "other", cache, "--pretrained",
                             str(tmp_path / "missing.h5"))) == 2
    assert "error:" in capsys.readouterr().err


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        single.parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--dataset", "--parallel", "--precision", "--balance", "--freeze",
                 "--early-stopping-patience", "--augment, --no-augment"):
        assert flag in text, flag
    assert "(default: synthetic_cxr)" in text and "(default: shard_map)" in text


@pytest.mark.slow
def test_simple_cnn_beats_chance_on_synthetic(tmp_path, cache):
    """Normal vs bacterial pneumonia, 300 phantoms at 32 px: well above the 0.5 of chance."""
    out = tmp_path / "run"
    argv = ["--backbone", "simple_cnn", "--count", "300", "--classes",
            "normal,bacterial_pneumonia", "--image-size", "32", "--width", "0.5",
            "--epochs", "6", "--batch-size", "16", "--no-augment", "--lr", "3e-3",
            "--n-bootstrap", "20", "--cache-dir", str(cache), "--out", str(out),
            "--no-progress"]
    assert single.main(argv) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["val_accuracy"] for r in records) >= 0.75, records
    assert json.loads((out / "metrics.json").read_text())["accuracy"] >= 0.6  # 44 test images
