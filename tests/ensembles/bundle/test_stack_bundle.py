"""Stack runs as bundles: experiments.stack (over --runs, or training its runs first) writes a
self-contained stack bundle whose components keep their own preprocessing; load_bundle ->
predict equals the probabilities the stack run wrote; evaluate / predict CLIs on it; broken
or foreign stack bundles refused.

Two tiny runs on one image folder (raw 32 px): OvA at 16 px, 1 channel, "unit", with a
gradient-boosting meta (meta.skops); OvO at 24 px, 3 channels, "tf".
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import skops.io as sio
from PIL import Image
from sklearn.neighbors import KNeighborsClassifier

from data_pipeline.datasets import load_dataset
from data_pipeline.synthetic import generate_phantoms
from ensembles import Ensemble, RunConfig, Stack
from ensembles.bundle import BundleError, StackBundle, add_manifest, load_bundle
from ensembles.combine.meta import MetaClassifier
from ensembles.config import FAMILY_DEFAULTS
from ensembles.evaluate.assess import evaluate_bundle
from experiments import evaluate, predict, stack

TINY = {"epochs": 1, "width": 0.25, "batch_size": 16, "progress": False,
        "dataset": "image_folder"}
PREPROCESS = {"ova": {"image_size": 16, "meta": "gboost"},
              "ovo": {"image_size": 24, "channels": 3, "normalization": "tf"}}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    ph = generate_phantoms(120, image_size=32, seed=5)
    for i, (im, y) in enumerate(zip(ph["image"], ph["label"], strict=True)):
        d = root / ph["class_names"][y]
        d.mkdir(exist_ok=True)
        Image.fromarray(im[..., 0]).save(d / f"img{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory, folder, trains) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("runs")
    return {s: Ensemble(s, **TINY, **settings, data_dir=str(folder),
                        cache_dir=str(base / "tfds")).fit(out=base / s).run_dir_
            for s, settings in PREPROCESS.items()}


@pytest.fixture(scope="module")
def stacked(tmp_path_factory, runs) -> Path:
    out = tmp_path_factory.mktemp("stack") / "logreg"
    assert stack.main(["--runs", str(runs["ova"]), str(runs["ovo"]), "--stack-out",
                       str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def dataset(runs, folder):
    return load_dataset("image_folder", data_dir=folder, cache_dir=_cache_dir(runs["ova"]))


def _cache_dir(run: Path) -> str:
    config = json.loads((run / "config.json").read_text())["config"]
    return RunConfig.from_dict(config).data.cache_dir


def test_ensemble_saves_gboost_meta(runs):
    """--meta gboost: meta.skops in the bundle, equal to a refit on the saved val outputs."""
    bundle = load_bundle(runs["ova"])
    assert json.loads((runs["ova"] / "config.json").read_text())["bundle"]["meta"] == "meta.skops"
    z = np.load(runs["ova"] / "outputs.npz")
    val = [z[f"val_member_{m}"] for m in range(4)]
    test = [z[f"test_member_{m}"] for m in range(4)]
    refit = MetaClassifier(model="gradient_boosting").fit(
        bundle.meta.features({"ova": val}), z["val_label"], example_indices=z["val_index"],
        train_indices=z["train_indices"])
    x_test = bundle.meta.features({"ova": test})
    np.testing.assert_array_equal(bundle.meta.predict_proba(x_test), refit.predict_proba(x_test))


def test_stack_bundle_layout(stacked, runs):
    config = json.loads((stacked / "config.json").read_text())
    section = config["bundle"]
    assert section["kind"] == "stack" and section["format_version"] == 1
    assert section["components"] == [{"name": "ova/simple_cnn", "path": "components/0"},
                                     {"name": "ovo/simple_cnn", "path": "components/1"}]
    assert section["meta"] == "meta.json"
    for i, s in enumerate(("ova", "ovo")):
        component = stacked / "components" / str(i)
        assert (component / "config.json").is_file() and (component / "combiner.json").is_file()
        assert (component / "members" / "stack-0").is_dir()
        # hard links on one filesystem: the same file, no extra space
        assert os.path.samefile(component / "combiner.json", runs[s] / "combiner.json")
    assert (stacked / "components" / "0" / "meta.skops").is_file()
    assert not (stacked / "components" / "0" / "outputs.npz").exists()


def test_load_bundle_predicts_what_the_stack_run_wrote(stacked, dataset):
    bundle = load_bundle(stacked)
    assert isinstance(bundle, StackBundle)
    assert [c.preprocess.image_size for c in bundle.components] == [16, 24]
    assert [c.preprocess.channels for c in bundle.components] == [1, 3]
    z = np.load(stacked / "outputs.npz")
    p = bundle.predict(dataset.source, z["test_index"], batch_size=7)
    np.testing.assert_array_equal(p.indices, z["test_index"])
    np.testing.assert_array_equal(p.labels, z["test_label"])
    np.testing.assert_allclose(p.proba, z["test_proba"], atol=1e-6)
    np.testing.assert_array_equal(p.decisions, z["test_pred"])


def test_gboost_stack_bundle_round_trip(runs, dataset, tmp_path):
    out = tmp_path / "gboost"
    fitted = Stack([runs["ova"], runs["ovo"]], meta="gboost").fit(out)
    assert fitted.run_dir_ == out
    assert fitted.metrics_ == json.loads((out / "metrics.json").read_text())
    assert json.loads((out / "config.json").read_text())["bundle"]["meta"] == "meta.skops"
    z = np.load(out / "outputs.npz")
    bundle = load_bundle(out)
    p = bundle.predict(dataset.source, z["test_index"])
    np.testing.assert_allclose(p.proba, z["test_proba"], atol=1e-6)
    # a meta file holding types outside the allowlist is refused before it is built
    sio.dump({"format": "cxr-ensembles/meta-gboost-v1", "params": bundle.meta.get_params(),
              "n_features": 20, "layout": bundle.meta.layout_,
              "estimator": KNeighborsClassifier(1, algorithm="kd_tree").fit(
                  np.eye(20), np.arange(20) % 4)},
             out / "meta.skops")
    with pytest.raises(BundleError, match="meta.skops does not match its SHA-256 digest"):
        load_bundle(out)
    config = json.loads((out / "config.json").read_text())   # re-recorded by a forger
    config["bundle"] = add_manifest(out, config["bundle"])
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="refusing to load types .*KDTree"):
        load_bundle(out)


def test_evaluate_cli_on_stack_run(stacked, folder, dataset, tmp_path):
    bundle = load_bundle(stacked)
    metrics, y, proba, _ = evaluate_bundle(bundle, dataset, np.arange(len(dataset.source)))
    z = np.load(stacked / "outputs.npz")
    assert len(y) == metrics["n_examples"] == 120
    np.testing.assert_allclose(proba[z["test_index"]], z["test_proba"], atol=1e-6)
    out = tmp_path / "eval"
    assert evaluate.main(["--run", str(stacked), "--dataset", "image_folder", "--data-dir",
                          str(folder), "--cache-dir", _cache_dir(stacked / "components" / "0"),
                          "--out", str(out)]) == 0
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["n_examples"] == 120
    assert saved["accuracy"] == pytest.approx(float(np.mean(proba.argmax(1) == y)))
    assert saved["evaluated_on"]["model_lacks"] == [] == saved["evaluated_on"]["data_lacks"]
    assert saved["evaluated_on"]["run"] == str(stacked)


def test_predict_cli_on_stack_run(stacked, folder, dataset, tmp_path):
    z = np.load(stacked / "outputs.npz")
    files = [str(folder / dataset.paths[i]) for i in z["test_index"]]
    out = tmp_path / "p.csv"
    assert predict.main(["--run", str(stacked), *files, "--csv", str(out)]) == 0
    rows = [r.split(",") for r in out.read_text().splitlines()]
    assert rows[0] == ["path", *dataset.class_names, "prediction", "decided_by",
                       "duplicate_of_training"]
    assert [r[0] for r in rows[1:]] == files
    probs = np.array([[float(v) for v in r[1:5]] for r in rows[1:]])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(probs, z["test_proba"], atol=2e-6)
    assert [r[5] for r in rows[1:]] == [dataset.class_names[k] for k in z["test_pred"]]


def test_broken_stack_bundles_are_refused(stacked, tmp_path):
    missing = tmp_path / "missing"
    shutil.copytree(stacked, missing)
    shutil.rmtree(missing / "components" / "1")
    with pytest.raises(BundleError, match=r"components/1 does not exist"):
        load_bundle(missing)
    incomplete = tmp_path / "incomplete"
    shutil.copytree(stacked, incomplete)
    shutil.rmtree(incomplete / "components" / "0" / "members" / "stack-0")
    with pytest.raises(BundleError, match=r"incomplete run: .*components/0/members/stack-0"):
        load_bundle(incomplete)
    foreign = tmp_path / "foreign"
    shutil.copytree(stacked, foreign)
    config = json.loads((foreign / "config.json").read_text())
    config["bundle"]["format_version"] = 2
    (foreign / "config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="format version 2"):
        load_bundle(foreign)


def test_stack_of_incomplete_run_writes_nothing(runs, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(runs["ovo"], broken)
    (broken / "combiner.json").unlink()
    out = tmp_path / "stack"
    with pytest.raises(BundleError, match="combiner.json is missing"):
        Stack([runs["ova"], broken]).fit(out)
    assert not out.exists()
    # a run whose config.json predates the typed config (flat flags) is refused by name
    old = tmp_path / "old"
    shutil.copytree(runs["ovo"], old)
    doc = json.loads((old / "config.json").read_text())
    flat = {k: v for section in doc.pop("config").values() for k, v in section.items()}
    (old / "config.json").write_text(json.dumps({**doc, **flat}))
    with pytest.raises(ValueError, match="holds no run config"):
        Stack([runs["ova"], old]).fit(out)
    assert not out.exists()


def test_stack_cli_plans_each_backbone_with_its_family_defaults(tmp_path):
    """Without --runs: the training flags parsed once per backbone (its family's defaults for
    the flags not given), one config per strategy, run folders <stack-out>/<s>-<backbone>."""
    planned, target = stack.plan_members(["ova", "cascade"], ["simple_cnn", "resnet50"],
                                         ["--epochs", "2", "--seed", "3", "--overwrite"],
                                         tmp_path)
    assert [p for _, p in planned] == [tmp_path / f"{s}-{b}" for b in ("simple_cnn", "resnet50")
                                       for s in ("ova", "cascade")]
    assert target.overwrite and not target.resume
    for config, run_dir in planned:
        strategy, backbone = run_dir.name.split("-")
        assert config.ensemble.strategy == strategy and config.model.backbone == backbone
        assert config.training.epochs == 2 and config.training.seed == 3
        family = FAMILY_DEFAULTS[{"simple_cnn": "custom_cnn", "resnet50": "imagenet"}[backbone]]
        assert (config.data.count, config.training.batch_size) == (family["count"],
                                                                   family["batch_size"])


def test_stack_cli_refuses_bad_input_before_training(runs, stacked, tmp_path, capsys):
    def refused(argv, message):
        assert stack.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err

    both = ["--runs", str(runs["ova"]), str(runs["ovo"])]
    refused([*both, "--stack-out", str(stacked)], "already holds a stack bundle")
    refused([*both, "--epochs", "3", "--stack-out", str(tmp_path / "a")],
            "training flags (--epochs 3) apply only without --runs")
    refused(["--runs", str(tmp_path / "missing"), "--stack-out", str(tmp_path / "b")],
            "has no outputs.npz")
    out = tmp_path / "train"
    refused(["--strategies", "ova,stack", "--stack-out", str(out)], "not stack itself")
    refused(["--backbone", "resnet50", "--stack-out", str(out)], "--backbones")
    refused(["--out", str(tmp_path / "x"), "--stack-out", str(out)], "give --stack-out")
    refused(["--strategies", "ova,bagging", "--stack-out", str(out)], "'bagging'")
    # a run folder in the way is refused before the first run trains
    (out / "ovo-simple_cnn").mkdir(parents=True)
    (out / "ovo-simple_cnn" / "stray.txt").write_text("x")
    refused(["--strategies", "ova,ovo", "--stack-out", str(out), "--epochs", "1"],
            "ovo-simple_cnn exists and is not empty")
    assert not (out / "ova-simple_cnn").exists()


@pytest.mark.slow
def test_stack_cli_trains_its_runs_then_stacks(tmp_path, capsys):
    out = tmp_path / "stack"
    assert stack.main(["--strategies", "ova,single", "--backbones", "simple_cnn",
                       "--meta-model", "gboost", "--stack-out", str(out), "--image-size", "16",
                       "--count", "120", "--epochs", "1", "--width", "0.25", "--no-progress",
                       "--seed", "1", "--cache-dir", str(tmp_path / "tfds")]) == 0
    members = [out / "ova-simple_cnn", out / "single-simple_cnn"]
    for strategy, run in zip(("ova", "single"), members, strict=True):
        config = RunConfig.from_dict(json.loads((run / "config.json").read_text())["config"])
        assert config.ensemble.strategy == strategy and config.model.width == 0.25
        assert (config.training.epochs, config.training.seed, config.data.count) == (1, 1, 120)
        assert config.training.batch_size == 32      # simple_cnn's family default
        assert (run / "metrics.json").is_file()
    doc = json.loads((out / "config.json").read_text())
    assert doc["runs"] == [str(r) for r in members]
    assert doc["meta_model"] == "gradient_boosting" and doc["bundle"]["meta"] == "meta.skops"
    metrics = json.loads((out / "metrics.json").read_text())
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"test accuracy {metrics['accuracy']:.3f}")
    assert last.endswith(f"report: {out}/report.html")
    assert isinstance(load_bundle(out), StackBundle)
