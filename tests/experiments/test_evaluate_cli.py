"""Issue 14 from evaluate and predict: the BRISQUE quality filter (--quality-max /
--quality-drop-worst) and lung masks from a segmenter (--segmenter) for a bundle trained on
masked images, on a folder of phantoms that ships no masks."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from data_pipeline import load_dataset, quality, quality_filter
from data_pipeline.synthetic import generate_phantoms
from ensembles.bundle import load_bundle
from ensembles.bundle.segmenter import SegmenterConfig
from ensembles.evaluate.assess import evaluate_bundle
from ensembles.training.segmenter import train_segmenter
from experiments import evaluate, predict
from experiments.ensemble_cli import main as ensemble_main

pytestmark = pytest.mark.slow
SEG = SegmenterConfig(image_size=32, width=8, levels=3, epochs=4, batch_size=16, lr=3e-3)


def _argv(out, cache, *extra):
    return ["--backbone", "simple_cnn", "--count", "64", "--image-size", "32", "--width",
            "0.25", "--epochs", "1", "--batch-size", "8", "--n-bootstrap", "0",
            "--cache-dir", str(cache), "--out", str(out), "--no-progress", *extra]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds-cache")


@pytest.fixture(scope="module")
def runs(cache, tmp_path_factory, trains):
    """(a single model trained on unmasked phantoms, one trained on their shipped masks)."""
    base = tmp_path_factory.mktemp("runs")
    assert ensemble_main("single", "", _argv(base / "plain", cache)) == 0
    assert ensemble_main("single", "", _argv(base / "masked", cache, "--lung-mask")) == 0
    return base / "plain", base / "masked"


@pytest.fixture(scope="module")
def segmenter(cache, tmp_path_factory, trains):
    phantoms = load_dataset("synthetic_cxr", count=64, image_size=32, cache_dir=cache)
    out = tmp_path_factory.mktemp("seg") / "run"
    seg, _ = train_segmenter(phantoms, SEG, out=out, progress=False)
    return out, seg


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """24 phantoms (other draws than the training ones) as PNGs in class folders: no masks."""
    ph = generate_phantoms(24, image_size=32, seed=7)
    root = tmp_path_factory.mktemp("hospital") / "images"
    for i, (image, y) in enumerate(zip(ph["image"], ph["label"], strict=True)):
        (root / ph["class_names"][y]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[..., 0]).save(root / ph["class_names"][y] / f"{i:02d}.png")
    return root


def _folder_dataset(folder, cache):
    return load_dataset("image_folder", data_dir=str(folder), cache_dir=str(cache))


def _eval_argv(run, folder, cache, out, *extra):
    return ["--run", str(run), "--dataset", "image_folder", "--data-dir", str(folder),
            "--cache-dir", str(cache), "--out", str(out), "--n-bootstrap", "0",
            "--no-progress", *extra]


def test_evaluate_drops_the_worst_and_reports_them(runs, folder, cache, tmp_path, capsys):
    plain, _ = runs
    out = tmp_path / "eval"
    assert evaluate.main(_eval_argv(plain, folder, cache, out,
                                    "--quality-drop-worst", "0.25")) == 0
    ds = _folder_dataset(folder, cache)
    kept, expected = quality_filter.filter_indices(ds, np.arange(len(ds.labels)),
                                                   drop_worst=0.25, progress=False)
    metrics = json.loads((out / "metrics.json").read_text())
    q = metrics["quality_filter"]
    assert q["count"] == expected["count"] == 6 and q["kept"] == len(kept) == 18
    assert q["files"] == expected["files"]
    assert metrics["n_examples"] == metrics["evaluated_on"]["examples"] == 18
    assert metrics["evaluated_on"]["quality_dropped"] == 6
    assert "quality filter: dropped 6 of 24 images" in capsys.readouterr().err
    report = (out / "report.md").read_text()
    assert "6 images dropped before evaluating (the worst 25.0%; 18 kept)" in report
    assert all(f"`{f['path']}`" in report for f in q["files"])
    assert "18 of a class the model knows are evaluated, after the quality filter dropped 6" \
        in report
    assert "lung masks: none (the model was trained on unmasked images)" in report
    # the filter over given indices: the scores of those, the fraction of those
    rows = np.arange(0, 24, 2)
    sub, part = quality_filter.filter_indices(ds, rows, quality_max=expected["files"][-1]
                                              ["brisque"] - 1e-3, progress=False)
    scores = quality.score_dataset(ds, rows, progress=False)
    np.testing.assert_array_equal(sub, rows[scores <= expected["files"][-1]["brisque"] - 1e-3])
    assert part["count"] == len(rows) - len(sub)
    assert evaluate.main(_eval_argv(plain, folder, cache, tmp_path / "bad",
                                    "--quality-drop-worst", "1")) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: quality_drop_worst must be in [0, 1); got 1.0"


def test_predict_brisque_column_and_quality_skips(runs, folder, cache, tmp_path, capsys,
                                                  monkeypatch):
    plain, _ = runs
    ds = _folder_dataset(folder, cache)
    scores = dict(zip((str(folder / p) for p in ds.paths),   # paths under the data root
                      quality.score_dataset(ds, progress=False), strict=True))
    limit = float(np.median(list(scores.values())))
    out = tmp_path / "p.csv"
    assert predict.main(["--run", str(plain), str(folder), "--csv", str(out),
                         "--quality-max", str(limit)]) == 0
    header, *body = list(csv.reader(out.open()))
    column = header.index("brisque")
    assert header[-1] == "duplicate_of_training"
    assert {r[0] for r in body} == {p for p, s in scores.items() if s <= limit}
    for r in body:
        assert float(r[column]) == pytest.approx(scores[r[0]], abs=5e-4)
    err = capsys.readouterr().err
    above = {p: s for p, s in scores.items() if s > limit}
    assert len(above) == 12
    for p, s in above.items():
        assert f"skipped {p}: quality: BRISQUE {s:.3f} > {limit:g}\n" in err
    assert "and 12 image(s) above BRISQUE" in err
    # without the flag: no column, and no image is scored
    monkeypatch.setattr(quality, "brisque", lambda image: pytest.fail("scored"))
    assert predict.main(["--run", str(plain), str(folder), "--csv", str(out)]) == 0
    header, *body = list(csv.reader(out.open()))
    assert "brisque" not in header and len(body) == 24


def test_dataset_masked_bundle_on_images_without_masks(runs, segmenter, folder, cache,
                                                       tmp_path, capsys):
    _, masked = runs
    seg_dir, seg = segmenter
    ds = _folder_dataset(folder, cache)
    assert not ds.has_masks
    # without --segmenter: refused in one line, by evaluate and by predict
    capsys.readouterr()
    for run in (lambda: evaluate.main(_eval_argv(masked, folder, cache, tmp_path / "no")),
                lambda: predict.main(["--run", str(masked), str(folder)])):
        code = run()
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.count("\n") == 0 and err.startswith("error: ")
        assert "trained on the lung masks its dataset ships" in err and "--segmenter" in err
    out = tmp_path / "eval"
    assert evaluate.main(_eval_argv(masked, folder, cache, out, "--segmenter",
                                    str(seg_dir))) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    note = metrics["evaluated_on"]["lung_masks"]
    assert note == (f"predicted by the segmenter {seg_dir.absolute()} (sha256 "
                    f"{seg.digest[:12]}; given for this evaluation)")
    assert f"- lung masks: {note}" in (out / "report.md").read_text()
    assert metrics["n_examples"] == 24

    # the probabilities are those of the images masked by hand with the segmenter's masks
    bundle = load_bundle(masked)
    images = [ds.source[i]["image"] for i in range(len(ds))]
    masks = seg.masks(images)
    assert all(0 < m.mean() < 255 for m in masks)   # each mask hides part of its image
    by_hand = bundle.predict([{"image": im, "mask": m, "label": 0}
                              for im, m in zip(images, masks, strict=True)],
                             np.arange(len(images))).proba
    got = evaluate_bundle(bundle.with_segmenter(seg), ds, np.arange(len(ds)), n_bootstrap=0,
                          segmenter_given=True)
    np.testing.assert_allclose(got.predictions.proba, by_hand[got.predictions.indices],
                               atol=1e-5)
    full = bundle.predict([{"image": im, "mask": np.full_like(im, 255), "label": 0}
                           for im in images], np.arange(len(images))).proba
    assert np.abs(full - by_hand).max() > 1e-3      # the masks change what the model sees
    # predict: the same masks for the decoded files
    table = tmp_path / "p.csv"
    assert predict.main(["--run", str(masked), str(folder), "--csv", str(table),
                         "--segmenter", str(seg_dir)]) == 0
    assert f"lung masks: predicted by the segmenter {seg_dir.absolute()}" in \
        capsys.readouterr().err
    header, *body = list(csv.reader(table.open()))
    names = list(bundle.class_names)
    row_of = {str(folder / p): i for i, p in enumerate(ds.paths)}
    for r in body:
        np.testing.assert_allclose([float(r[header.index(c)]) for c in names],
                                   by_hand[row_of[r[0]]], atol=2e-6)


def test_segmenter_is_refused_for_an_unmasked_bundle(runs, segmenter, folder, cache,
                                                     tmp_path, capsys):
    plain, _ = runs
    seg_dir, _ = segmenter
    capsys.readouterr()
    for run in (lambda: evaluate.main(_eval_argv(plain, folder, cache, tmp_path / "e",
                                                 "--segmenter", str(seg_dir))),
                lambda: predict.main(["--run", str(plain), str(folder), "--segmenter",
                                      str(seg_dir)])):
        code = run()
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.count("\n") == 0
        assert err.startswith(f"error: --segmenter: {plain} was trained on unmasked images")
    assert not (tmp_path / "e").exists()
