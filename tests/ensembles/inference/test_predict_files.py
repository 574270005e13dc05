"""ensembles.inference.files called from Python, no CLI: discovery with counted skips, and
predict_files on a few tiny images with a bad file among them."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from data_pipeline.synthetic import generate_phantoms
from ensembles.bundle import load_bundle
from ensembles.inference.files import find_images, predict_files, predict_images


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    for i, im in enumerate(generate_phantoms(3, image_size=24, seed=5)["image"]):
        Image.fromarray(im[..., 0]).save(root / ("sub" if i == 2 else ".") / f"x{i}.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "notes.txt").write_text("not an image")
    return root


def test_find_images_counts_what_it_skips(folder):
    files, skipped = find_images([folder])
    assert files == [folder / "broken.png", folder / "sub" / "x2.png", folder / "x0.png",
                     folder / "x1.png"]
    assert skipped == [{"path": str(folder / "notes.txt"),
                        "reason": "not an image file type (.txt)"}]
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        find_images([folder / "absent"])


def test_predict_files_with_a_bad_file(tiny_run, folder, tmp_path):
    run = tiny_run("ova")
    seen = []
    out, cams = tmp_path / "p.csv", tmp_path / "cams"
    result = predict_files(run, [folder], csv_path=out, gradcam=cams, batch_size=2,
                           on_skip=seen.append)
    assert result.files == [folder / "sub" / "x2.png", folder / "x0.png", folder / "x1.png"]
    assert [s["path"] for s in result.skipped] == [str(folder / "notes.txt"),
                                                  str(folder / "broken.png")]
    assert seen == result.skipped                       # every skip reported
    assert result.predictions.proba.shape == (3, len(result.predictions.class_names))
    np.testing.assert_allclose(result.predictions.proba.sum(axis=1), 1.0, atol=1e-5)
    header = result.table[0]
    assert header[0] == "path" and header[-1] == "duplicate_of_training"
    assert [r[0] for r in result.table[1:]] == [str(f) for f in result.files]
    with out.open(newline="") as fh:
        assert list(csv.reader(fh)) == result.table
    assert len(list(cams.iterdir())) == 3
    assert result.summary().startswith("predicted 3 image(s), skipped 2 unreadable or "
                                       "non-image entries")
    # the same as the decoded-files step on a loaded bundle, and a bundle is accepted too
    _, p, _ = predict_images(load_bundle(run), result.files)
    np.testing.assert_allclose(p.proba, result.predictions.proba, atol=1e-6)
    again = predict_files(load_bundle(run), [folder / "x0.png"], on_skip=None)
    np.testing.assert_allclose(again.predictions.proba[0], result.predictions.proba[1],
                               atol=1e-6)
    with pytest.raises(ValueError, match=r"nothing to predict.*\(2 skipped\)"):
        predict_files(run, [folder / "broken.png", folder / "notes.txt"], on_skip=None)
    with pytest.raises(ValueError, match="--batch-size must be >= 1"):
        predict_files(run, [folder], batch_size=0)
