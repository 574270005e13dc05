"""The ensemble bundle: save -> load -> predict equals the in-process test predictions (an
`experiments.single` run included: a one-member ensemble bundle); labels and decisions share
the model's class order on data that lists its classes in another order; predict / evaluate
CLIs on generated images; incomplete or foreign run directories refused."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image
from settings import TINY

from data_pipeline.datasets import load_dataset
from data_pipeline.decode import decode_image
from data_pipeline.loader import make_loader
from data_pipeline.synthetic import generate_phantoms
from ensembles import Ensemble, RunConfig
from ensembles.bundle import (
    Bundle,
    BundleError,
    bundle_pieces,
    copy_bundle,
    load_bundle,
)
from ensembles.evaluate.assess import evaluate_bundle
from ensembles.evaluate.metrics import evaluate_predictions
from ensembles.training import build
from experiments import ensemble_cli, evaluate, predict, single

BUNDLE = {**TINY, "n_bootstrap": 1000}   # the metrics carry CIs


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, trains):
    base = tmp_path_factory.mktemp("bundle")
    return Ensemble("ova", **BUNDLE, cache_dir=str(base / "tfds")).fit(out=base / "ova")


@pytest.fixture(scope="module")
def run(fitted):
    return fitted.run_dir_


def test_fit_keeps_the_bundle_it_wrote(fitted):
    """fit keeps its in-memory bundle; it is what load_bundle reads back from the run."""
    mem, loaded = fitted.bundle_, load_bundle(fitted.run_dir_)
    for field in ("run_dir", "backbone", "class_names", "preprocess", "kind", "model_options",
                  "operating_point", "segmenter", "meta"):
        assert getattr(mem, field) == getattr(loaded, field), field
    assert mem.temperature == pytest.approx(loaded.temperature)
    assert mem.thresholds == pytest.approx(loaded.thresholds)
    assert Path(mem.hashes_file).resolve() == Path(loaded.hashes_file).resolve()
    assert mem.tasks.names == loaded.tasks.names
    np.testing.assert_array_equal(mem.tasks.table, loaded.tasks.table)
    jax.tree.map(np.testing.assert_array_equal, mem.variables, loaded.variables)
    ds = build.load_data(fitted.config)
    test = np.load(fitted.run_dir_ / "outputs.npz")["test_index"]
    a, b = (x.predict(ds.source, test, batch_size=16) for x in (mem, loaded))
    np.testing.assert_allclose(a.proba, b.proba, atol=1e-6)
    np.testing.assert_array_equal(a.decisions, b.decisions)


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


def _run_config(run_dir) -> RunConfig:
    return RunConfig.from_dict(json.loads((run_dir / "config.json").read_text())["config"])


def test_round_trip_predictions_equal_in_process(run):
    bundle = load_bundle(run)
    saved = np.load(run / "outputs.npz")
    ds = build.load_data(_run_config(run))
    loader = make_loader(ds.source, saved["test_index"], batch_size=7,
                         preprocess=bundle.preprocess, shuffle=False, drop_remainder=False)
    probs, labels, idx = bundle.member_outputs(loader)
    np.testing.assert_array_equal(idx, saved["test_index"])
    np.testing.assert_allclose(bundle.combine(probs), saved["test_proba"], atol=1e-5)
    np.testing.assert_array_equal(bundle.decide(probs), saved["test_pred"])
    p = bundle.predict(ds.source, saved["test_index"], batch_size=7,
                       label_names=ds.class_names)
    np.testing.assert_array_equal(p.labels, saved["test_label"])
    np.testing.assert_array_equal(p.decisions, saved["test_pred"])


def test_labels_and_decisions_share_the_model_class_order(run, images, tmp_path):
    """A dataset listing its classes in another order than the model (and one the model
    lacks): Predictions.labels are mapped into the model's order, so accuracy from labels vs
    decisions equals the accuracy counted by class name."""
    order = ("lung_opacity", "viral_pneumonia", "normal", "covid")
    ds = load_dataset("image_folder", data_dir=images, classes=order,
                      cache_dir=tmp_path / "tfds")
    bundle = load_bundle(run)
    assert ds.class_names == order
    assert bundle.class_names == ("covid", "normal", "viral_pneumonia", "bacterial_pneumonia")
    p = bundle.predict(ds.source, np.arange(len(ds.source)), batch_size=5,
                       label_names=ds.class_names)
    assert p.class_names == bundle.class_names
    truth = [ds.class_names[y] for y in ds.labels[p.indices]]       # names, by hand
    expected = [bundle.class_names.index(n) if n in bundle.class_names else -1 for n in truth]
    np.testing.assert_array_equal(p.labels, expected)
    known = p.labels >= 0
    assert known.sum() == 12 and (~known).sum() == 3
    raw = ds.labels[p.indices]
    assert np.any(raw[known] != p.labels[known])   # the orders really differ on known classes
    by_name = np.mean([bundle.class_names[d] == n
                       for d, n, k in zip(p.decisions, truth, known, strict=True) if k])
    assert np.mean(p.decisions[known] == p.labels[known]) == pytest.approx(by_name)
    metrics, y, proba, _ = evaluate_bundle(bundle, ds, np.arange(len(ds.source)), batch_size=5,
                                        n_bootstrap=0)
    assert metrics["accuracy"] == pytest.approx(by_name)
    np.testing.assert_array_equal(y, p.labels[known])
    np.testing.assert_allclose(proba, p.proba[known], atol=1e-6)
    per_class = {c: np.mean([bundle.class_names[d] == c for d, n in
                             zip(p.decisions, truth, strict=True) if n == c])
                 for c in ("covid", "normal", "viral_pneumonia") if c in truth}
    for c, recall in per_class.items():
        assert metrics["per_class"][c]["recall"] == pytest.approx(recall)
    assert metrics["evaluated_on"]["excluded_examples"]["lung_opacity"]["count"] == 3


def test_predict_cli_skips_unreadable(run, images, tmp_path, capsys):
    (images / "covid" / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "p.csv"
    try:
        assert predict.main(["--run", str(run), str(images), "--csv", str(out)]) == 0
    finally:
        (images / "covid" / "broken.png").unlink()
    rows = list(csv.reader(out.open()))
    names = ["covid", "normal", "viral_pneumonia", "bacterial_pneumonia"]
    assert rows[0] == ["path", *names, "prediction", "decided_by", "operating_point",
                       *(f"threshold_{c}" for c in names), "flagged", "duplicate_of_training"]
    assert len(rows) == 1 + 15
    probs = np.array([[float(v) for v in r[1:5]] for r in rows[1:]])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert "skipped 1 unreadable" in capsys.readouterr().err
    # the prediction column names the class of the bundle's decisions, in the model's order
    bundle = load_bundle(run)
    source = [{"image": decode_image(r[0]), "label": 0} for r in rows[1:]]
    p = bundle.predict(source, np.arange(len(source)))
    np.testing.assert_allclose(probs, p.proba, atol=2e-6)
    assert [r[5] for r in rows[1:]] == [bundle.class_names[d] for d in p.decisions]
    assert {r[6] for r in rows[1:]} == {"highest probability"}
    assert {r[7] for r in rows[1:]} == {"youden"}
    thresholds = np.array([[float(v) for v in r[8:12]] for r in rows[1:]])
    np.testing.assert_allclose(thresholds, np.tile(bundle.thresholds, (15, 1)), atol=1e-6)
    flagged = [set(filter(None, r[12].split(";"))) for r in rows[1:]]
    assert flagged == [{c for c, q, t in zip(names, row, bundle.thresholds, strict=True)
                        if q >= t} for row in p.proba]
    assert any(flagged) and not all(f == set(names) for f in flagged)


def test_operating_point_round_trips_through_the_bundle(run):
    """The thresholds in combiner.json are the ones chosen on the saved validation outputs;
    the loaded bundle carries them; the reported test rates are those of its flags."""
    from ensembles.combine.operating_points import choose_thresholds, flag
    from ensembles.config import OperatingPoint

    saved = np.load(run / "outputs.npz")
    bundle = load_bundle(run)
    members = [saved[f"val_member_{m}"] for m in range(len(bundle.tasks.names))]
    want = choose_thresholds(saved["val_label"], bundle.combine(members),
                             OperatingPoint("youden"))
    doc = json.loads((run / "combiner.json").read_text())["operating_point"]
    assert doc["target"] == bundle.operating_point == "youden"
    np.testing.assert_allclose(doc["thresholds"], want, rtol=1e-6)
    np.testing.assert_allclose(bundle.thresholds, want, rtol=1e-6)
    metrics = json.loads((run / "metrics.json").read_text())["operating_point"]
    hits = flag(saved["test_proba"], bundle.thresholds)
    y = saved["test_label"]
    for k, name in enumerate(bundle.class_names):
        assert metrics["test"][name]["sensitivity"] == pytest.approx(np.mean(hits[y == k, k]))
        assert metrics["test"][name]["specificity"] == pytest.approx(np.mean(~hits[y != k, k]))
    assert "## Operating points" in (run / "report.md").read_text()


def test_evaluate_reports_class_mismatch(run, images, tmp_path, capsys):
    out = tmp_path / "eval"
    assert evaluate.main(["--run", str(run), "--dataset", "image_folder", "--data-dir",
                          str(images), "--cache-dir", str(tmp_path / "tfds"),
                          "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    on = metrics["evaluated_on"]
    assert on["model_lacks"] == ["lung_opacity"]
    assert on["data_lacks"] == ["bacterial_pneumonia"]
    assert on["excluded_examples"]["lung_opacity"]["count"] == 3
    assert metrics["n_examples"] == on["examples"] == 12
    assert "lung_opacity" in (out / "report.md").read_text()
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"test accuracy {metrics['accuracy']:.3f}")
    # the data lacks bacterial_pneumonia: chance over the 3 classes present
    assert "chance 0.333 for 3 classes present" in last
    assert last.endswith(f"report: {out}/report.html")


def test_incomplete_and_foreign_runs_are_refused(run, tmp_path, capsys):
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
    assert predict.main(["--run", str(broken), str(tmp_path)]) == 2
    assert evaluate.main(["--run", str(foreign), "--dataset", "synthetic_cxr"]) == 2
    err = capsys.readouterr().err
    assert "error: incomplete run: member checkpoint" in err
    assert "error: " in err and "format version 99" in err


@pytest.mark.slow
def test_single_run_is_an_ensemble_bundle(tmp_path, capsys):
    """A run of experiments.single is a one-member ensemble bundle; it (and its copied
    pieces) loads and predicts its test split as the run did in-process."""
    out = tmp_path / "single"
    argv = ["--backbone", "simple_cnn", "--image-size", "16", "--count", "80", "--epochs", "1",
            "--warmup-epochs", "0", "--width", "0.25", "--batch-size", "16", "--no-progress",
            "--n-bootstrap", "0", "--out", str(out), "--cache-dir", str(tmp_path / "tfds")]
    assert ensemble_cli.main("single", single.DESCRIPTION, argv) == 0
    assert capsys.readouterr().out.strip().endswith(f"report: {out}/report.html")
    config = _run_config(out)
    assert config.ensemble.strategy == "single"
    ds = build.load_data(config)
    test = build.build_data(config, ds).splits["test"]
    saved = np.load(out / "outputs.npz")
    np.testing.assert_array_equal(saved["test_index"], test)
    metrics = json.loads((out / "metrics.json").read_text())
    pieces = bundle_pieces(out)
    assert [str(p) for p in pieces] == ["config.json", "combiner.json", "members/stack-0",
                                        "train_hashes.npz"]
    copy_bundle(out, tmp_path / "copy", pieces)
    for run_dir in (out, tmp_path / "copy"):
        bundle = load_bundle(run_dir)
        assert isinstance(bundle, Bundle) and bundle.kind == "ensemble"
        assert bundle.tasks.strategy == "single" and len(bundle.tasks.names) == 1
        p = bundle.predict(ds.source, test, batch_size=5, label_names=ds.class_names)
        np.testing.assert_allclose(p.proba, saved["test_proba"], atol=1e-5)
        np.testing.assert_array_equal(p.decisions, saved["test_pred"])
        np.testing.assert_array_equal(p.labels, saved["test_label"])
        m = evaluate_predictions(p.labels, p.proba, ds.class_names, y_pred=p.decisions,
                                 n_bootstrap=0)
        assert m["accuracy"] == metrics["accuracy"]
        assert m["roc_auc_macro"] == pytest.approx(metrics["roc_auc_macro"], abs=1e-6)


def test_predict_proba_on_raw_images_equals_the_run(run):
    """Ensemble.load(...).predict_proba / predict on raw uint8 images, [N, H, W, 1] and
    [N, H, W], give the run's own test probabilities and decisions."""
    ens = Ensemble.load(run)
    saved = np.load(run / "outputs.npz")
    assert ens.classes_ == tuple(str(c) for c in saved["class_names"])
    assert ens.members_ == load_bundle(run).tasks.names and len(ens.members_) == 4
    assert ens.metrics_ == json.loads((run / "metrics.json").read_text())
    ds = build.load_data(ens.config)
    raw = np.stack([np.asarray(ds.source[int(i)]["image"]) for i in saved["test_index"]])
    assert raw.dtype == np.uint8 and raw.shape[-1] == 1
    for images in (raw, raw[..., 0]):
        np.testing.assert_allclose(ens.predict_proba(images), saved["test_proba"], atol=1e-5)
        np.testing.assert_array_equal(ens.predict(images), saved["test_pred"])
