"""The ensemble bundle: save -> load -> predict equals the in-process test predictions;
predict / evaluate CLIs on generated images; incomplete or foreign run directories refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from data_pipeline.datasets import load_dataset
from data_pipeline.loader import make_loader
from data_pipeline.splits import split_indices
from data_pipeline.synthetic import generate_phantoms
from ensembles.bundle import BundleError, bundle_pieces, copy_bundle, load_bundle
from experiments import ensemble_cli, evaluate, predict, single
from ensembles.evaluation import evaluate_predictions

TINY = ["--image-size", "16", "--count", "120", "--epochs", "1", "--width", "0.25",
        "--batch-size", "16", "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("bundle")
    return ensemble_cli.run("ova", [*TINY, "--out", str(base / "ova"), "--cache-dir",
                                    str(base / "tfds")])


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A class folder tree with one class the model lacks (lung_opacity) and a broken file."""
    root = tmp_path_factory.mktemp("folder")
    ph = generate_phantoms(12, image_size=24, classes=("covid", "normal", "viral_pneumonia"),
                           seed=3)
    for i, (im, y) in enumerate(zip(ph["image"], ph["label"], strict=True)):
        d = root / ph["class_names"][y]
        d.mkdir(exist_ok=True)
        Image.fromarray(im[..., 0]).save(d / f"img{i}.png")
    (root / "lung_opacity").mkdir()
    for i in range(3):
        Image.fromarray(ph["image"][i, ..., 0]).save(root / "lung_opacity" / f"o{i}.png")
    return root


def test_round_trip_predictions_equal_in_process(run):
    bundle = load_bundle(run)
    saved = np.load(run / "outputs.npz")
    config = json.loads((run / "config.json").read_text())
    ds = load_dataset("synthetic_cxr", cache_dir=config["cache_dir"],
                      count=config["count"], image_size=config["image_size"],
                      seed=config["seed"])
    loader = make_loader(ds.source, saved["test_index"], batch_size=7,
                         preprocess=bundle.preprocess, shuffle=False, drop_remainder=False)
    probs, labels, idx = bundle.member_outputs(loader)
    np.testing.assert_array_equal(idx, saved["test_index"])
    np.testing.assert_allclose(bundle.combine(probs), saved["test_proba"], atol=1e-5)
    np.testing.assert_array_equal(bundle.decide(probs), saved["test_pred"])


def test_predict_cli_skips_unreadable(run, images, tmp_path, capsys):
    (images / "covid" / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "p.csv"
    assert predict.main(["--run", str(run), str(images), "--csv", str(out)]) == 0
    rows = out.read_text().splitlines()
    assert rows[0].split(",")[:5] == ["path", "covid", "normal", "viral_pneumonia",
                                      "bacterial_pneumonia"]
    assert len(rows) == 1 + 15
    probs = np.array([[float(v) for v in r.split(",")[1:5]] for r in rows[1:]])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert "skipped 1 unreadable" in capsys.readouterr().err
    (images / "covid" / "broken.png").unlink()


def test_evaluate_reports_class_mismatch(run, images, tmp_path):
    out = tmp_path / "eval"
    assert evaluate.main(["--run", str(run), "--dataset", "image_folder", "--data-dir",
                          str(images), "--cache-dir", str(tmp_path / "tfds"),
                          "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    cross = metrics["cross_dataset"]
    assert cross["model_lacks"] == ["lung_opacity"]
    assert cross["data_lacks"] == ["bacterial_pneumonia"]
    assert cross["excluded_examples"]["lung_opacity"]["count"] == 3
    assert metrics["n_examples"] == 12
    assert "lung_opacity" in (out / "report.md").read_text()


def test_incomplete_and_foreign_runs_are_refused(run, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    shutil.rmtree(broken / "members" / "stack-0")
    with pytest.raises(BundleError, match="member checkpoint .* is missing"):
        load_bundle(broken)
    foreign = tmp_path / "foreign"
    shutil.copytree(run, foreign)
    config = json.loads((foreign / "config.json").read_text())
    config["bundle"]["format_version"] = 99
    (foreign / "config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="format version 99"):
        load_bundle(foreign)
    with pytest.raises(BundleError, match="config.json is missing"):
        load_bundle(tmp_path)


def test_single_run_loads_and_copies(tmp_path):
    """A run of experiments.single (its --head auto resolved on load) predicts its own test
    metrics, and its bundle pieces (config + newest best checkpoint) load the same model."""
    out = tmp_path / "single"
    single.run(single.parse_args([
        "--backbone", "simple_cnn", "--image-size", "16", "--count", "80", "--epochs", "1",
        "--warmup-epochs", "0", "--width", "0.25", "--batch-size", "16", "--no-progress",
        "--n-bootstrap", "0", "--out", str(out), "--cache-dir", str(tmp_path / "tfds")]))
    config = json.loads((out / "config.json").read_text())
    ds = load_dataset("synthetic_cxr", cache_dir=config["cache_dir"], count=80, image_size=16,
                      seed=0)
    test = split_indices(ds.labels, ds.patient_ids, recipe=config["split_recipe"])["test"]
    pieces = bundle_pieces(out)
    assert [str(p) for p in pieces] == ["config.json", "checkpoint/best/3"]
    copy_bundle(out, tmp_path / "copy", pieces)
    saved = json.loads((out / "metrics.json").read_text())
    for run_dir in (out, tmp_path / "copy"):
        bundle = load_bundle(run_dir)
        assert bundle.kind == "single"
        p = bundle.predict(ds.source, test)
        m = evaluate_predictions(p.labels, p.proba, ds.class_names, n_bootstrap=0)
        assert m["accuracy"] == saved["accuracy"]
        assert m["roc_auc_macro"] == pytest.approx(saved["roc_auc_macro"], abs=1e-6)
