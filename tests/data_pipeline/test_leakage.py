"""The leakage check (issue 13, part 5): planted exact and near duplicates are found with the
right kind and nothing is reported between disjoint sets; a tiny trained run evaluated on a
folder holding some of its training images reports exactly those (metrics with and without
them), predict marks them in its CSV, a run saved without training hashes still evaluates and
says so; `data_pipeline.inspect --against` finds copies between two folders and the same image
under two classes within one."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline import hashing
from data_pipeline import inspect as inspect_cli
from data_pipeline.datasets import load_dataset
from data_pipeline.decode import decode_image
from data_pipeline.hashing import (
    content_hash,
    duplicate_pairs,
    find_duplicates,
    hamming,
    hash_dataset,
    hash_images,
    perceptual_hash,
)
from data_pipeline.leakage import NO_HASHES, TRAIN_HASHES_FILE
from data_pipeline.synthetic import generate_phantoms
from ensembles import Ensemble, Stack
from ensembles.bundle import BundleError, add_manifest, load_bundle
from ensembles.evaluate.metrics import evaluate_predictions
from ensembles.training import build
from experiments import evaluate, predict

EXACT, NEAR = 5, 2          # training images copied into the evaluation folder


def _png(image: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.reshape(image.shape[:2])).save(path)
    return path


def _jpeg(image: np.ndarray, quality: int = 75) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(image.reshape(image.shape[:2])).save(buf, "JPEG", quality=quality)
    return decode_image(buf.getvalue())


def _brighter(image: np.ndarray, by: int = 8) -> np.ndarray:
    return np.clip(image.astype(int) + by, 0, 255).astype(np.uint8)


def _resized(image: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image.reshape(image.shape[:2])).resize(
        (size, size), Image.LANCZOS))


# -- the hashes and the comparison -----------------------------------------------------------
def test_content_hash_is_exact_on_pixels(tmp_path):
    image = generate_phantoms(1, image_size=32, seed=0)["image"][0]
    again = decode_image(_png(image, tmp_path / "elsewhere" / "copy.png"))   # re-encoded
    assert content_hash(again) == content_hash(image) == content_hash(image[..., 0])
    changed = image.copy()
    changed[5, 5, 0] ^= 1                                   # one pixel, one bit
    assert content_hash(changed) != content_hash(image)
    assert content_hash(image.reshape(16, 64)) != content_hash(image)   # same bytes, shape
    assert perceptual_hash(image).dtype == np.uint64 and perceptual_hash(image).shape == (4,)
    with pytest.raises(ValueError, match="uint8"):
        content_hash(image.astype(np.float32))


def test_hamming_equals_a_bit_by_bit_count():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2**64, (7, hashing.WORDS), dtype=np.uint64)
    b = rng.integers(0, 2**64, (5, hashing.WORDS), dtype=np.uint64)
    naive = [[sum(bin(int(x) ^ int(y)).count("1") for x, y in zip(p, q, strict=True))
              for q in b] for p in a]
    np.testing.assert_array_equal(hamming(a, b), naive)


def test_planted_exact_and_near_duplicates_are_found_with_their_kind(tmp_path):
    """Reference: 12 phantoms at 128 px. Queries: exact copies (PNG re-encoded in another
    folder), near copies (resized, JPEG, brighter, resized + JPEG) and 12 other phantoms;
    exactly the copies match, each to its original, with the right kind."""
    ref = generate_phantoms(12, image_size=128, seed=0)["image"]
    other = generate_phantoms(12, image_size=128, seed=1)["image"]
    planted = {0: ("exact", decode_image(_png(ref[0], tmp_path / "b" / "0.png"))),
               1: ("exact", decode_image(_png(ref[1], tmp_path / "b" / "1.png"))),
               2: ("near", _resized(ref[2], 96)),
               3: ("near", _jpeg(ref[3], 75)),
               4: ("near", _brighter(ref[4], 8)),
               5: ("near", _jpeg(_resized(ref[5], 200), 90))}
    queries = [im for _, im in planted.values()] + list(other)
    q = hash_images(queries, [f"q{i}" for i in range(len(queries))])
    r = hash_images(ref, [f"r{i}" for i in range(len(ref))])
    m = find_duplicates(q, r)
    assert m.query.tolist() == list(range(len(planted)))
    assert m.reference.tolist() == list(planted)
    assert ["exact" if e else "near" for e in m.exact] == [k for k, _ in planted.values()]
    assert (m.distance[~m.exact] > 0).all() and (m.distance <= hashing.MAX_DISTANCE).all()
    assert m.kinds()[:2] == ["exact", "exact"] and m.kinds()[2].startswith("near:")
    # disjoint sets: different phantoms report nothing, nor do the sets within themselves
    assert len(find_duplicates(hash_images(other, ["o"] * 12), r)) == 0
    assert len(duplicate_pairs(r)) == 0
    # within one set: the exact copy and the JPEG copy pair with their originals
    both = hash_images([*ref[:4], queries[0], queries[3]], list("abcdef"))
    pairs = duplicate_pairs(both)
    assert list(zip(pairs.query.tolist(), pairs.reference.tolist(), pairs.exact.tolist(),
                    strict=True)) == [(0, 4, True), (3, 5, False)]


def test_hash_dataset_is_cached_per_build(tmp_path, monkeypatch):
    ds = load_dataset("synthetic_cxr", count=12, image_size=16, cache_dir=tmp_path)
    first = hash_dataset(ds, np.array([3, 1, 3]), progress=False)
    assert first.paths.tolist() == [ds.paths[3], ds.paths[1], ds.paths[3]]
    assert first.content[0] == first.content[2] == content_hash(ds.source[3]["image"])
    monkeypatch.setattr(hashing, "_hash_rows", lambda *a: 1 / 0)   # read, never hashed again
    again = hash_dataset(ds, np.array([1, 3]), progress=False)
    assert again.content.tolist() == first.content[[1, 0]].tolist()
    with pytest.raises(ZeroDivisionError):
        hash_dataset(ds, np.array([0]), progress=False)            # not hashed yet: computed


# -- a trained run: evaluate, predict, an old bundle -----------------------------------------
@pytest.fixture(scope="module")
def run(tiny_run) -> Path:
    """The shared tiny OvA run (conftest.tiny_run)."""
    return tiny_run("ova")


@pytest.fixture(scope="module")
def folder(run, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A class-folder tree: EXACT training images (PNG, other names), NEAR altered training
    images and 10 unseen phantoms; {relative path: expected kind} of the copies."""
    root = tmp_path_factory.mktemp("evalfolder")
    cfg = Ensemble.load(run).config
    data = build.build_data(cfg)
    ds = data.dataset
    train = np.sort(data.splits["train"])
    copies = {}
    for k, i in enumerate(train[:EXACT + NEAR]):
        ex = ds.source[int(i)]
        image = ex["image"] if k < EXACT else _brighter(ex["image"], 8)
        rel = f"{ds.class_names[ex['label']]}/copy{k}.png"
        _png(image, root / rel)
        copies[rel] = "exact" if k < EXACT else "near"
    unseen = generate_phantoms(10, image_size=16, seed=5)
    for k, (image, y) in enumerate(zip(unseen["image"], unseen["label"], strict=True)):
        _png(image, root / unseen["class_names"][y] / f"new{k}.png")
    return root, copies


def test_run_stores_its_training_hashes(run):
    bundle = load_bundle(run)
    hashes = bundle.training_hashes()
    data = build.build_data(Ensemble.load(run).config)
    assert len(hashes.hashes) == len(data.splits["train"]) + len(data.splits["val"])
    assert sorted(hashes.splits.tolist()) == sorted(["train"] * len(data.splits["train"])
                                                    + ["val"] * len(data.splits["val"]))
    assert set(hashes.hashes.paths) == set(data.dataset.paths[np.concatenate(
        [data.splits["train"], data.splits["val"]])])
    assert not set(hashes.hashes.content) & set(hash_dataset(
        data.dataset, data.splits["test"]).content)
    config = json.loads((run / "config.json").read_text())
    assert config["bundle"]["train_hashes"] == TRAIN_HASHES_FILE
    assert TRAIN_HASHES_FILE in config["bundle"]["files"]      # in the SHA-256 manifest


def test_evaluate_reports_the_training_images_it_was_given(run, folder, tmp_path, capsys):
    root, copies = folder
    out = tmp_path / "eval"
    assert evaluate.main(["--run", str(run), "--dataset", "image_folder", "--data-dir",
                          str(root), "--cache-dir", str(tmp_path / "tfds"), "--out", str(out),
                          "--n-bootstrap", "0"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    leak = metrics["leakage"]
    assert leak["checked"] and leak["evaluated"] == metrics["n_examples"] == len(copies) + 10
    assert (leak["exact"], leak["near"]) == (EXACT, NEAR)
    assert {d["path"]: d["kind"] for d in leak["duplicates"]} == copies
    assert all(d["training_split"] == "train" and d["training_path"].startswith("synthetic/")
               for d in leak["duplicates"])
    # the metrics without them are the metrics of the unseen images alone
    ds = load_dataset("image_folder", data_dir=root, cache_dir=tmp_path / "tfds")
    bundle = load_bundle(run)
    p = bundle.predict(ds.source, np.arange(len(ds)), label_names=ds.class_names)
    keep = np.array([path not in copies for path in ds.paths[p.indices]])
    expected = evaluate_predictions(p.labels[keep], p.proba[keep], bundle.class_names,
                                    y_pred=p.decisions[keep], n_bootstrap=0)
    without = leak["without_duplicates"]
    assert without["n_examples"] == 10
    assert without["accuracy"] == pytest.approx(expected["accuracy"])
    assert without["macro_f1"] == pytest.approx(expected["macro_f1"])
    report = (out / "report.md").read_text()
    assert "Leakage check" in report and "**5 are exact duplicates**" in report
    assert all(f"`{path}`" in report for path in copies)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"LEAKAGE: {EXACT} exact and {NEAR} near duplicate(s)" in line
    assert f"without them: accuracy {without['accuracy']:.3f}" in line
    assert line.endswith(f"report: {out}/report.html")


def test_evaluate_without_progress_draws_no_bar(run, folder, tmp_path, capfd):
    """--no-progress: neither tfds's build bars nor the leakage check's hashing bar."""
    root, _ = folder
    assert evaluate.main(["--run", str(run), "--dataset", "image_folder", "--data-dir",
                          str(root), "--cache-dir", str(tmp_path / "tfds"), "--out",
                          str(tmp_path / "eval"), "--n-bootstrap", "0", "--no-progress"]) == 0
    err = capfd.readouterr().err
    assert "hashing" not in err and "Generating splits" not in err and "it/s" not in err


def test_predict_marks_duplicates_in_the_csv(run, folder, tmp_path, capsys):
    root, copies = folder
    out = tmp_path / "p.csv"
    assert predict.main(["--run", str(run), str(root), "--csv", str(out)]) == 0
    rows = list(csv.reader(out.open()))
    assert rows[0][5] == "prediction" and rows[0][-1] == "duplicate_of_training"
    marks = {str(Path(r[0]).relative_to(root)): r[-1] for r in rows[1:]}
    assert {k: v.split(":")[0] for k, v in marks.items() if v} == copies
    assert all(int(marks[k].split(":")[1]) <= hashing.MAX_DISTANCE for k, v in copies.items()
               if v == "near")
    assert sum(v == "" for v in marks.values()) == 10
    assert f"duplicates of training images: {EXACT} exact, {NEAR} near" in capsys.readouterr().err


def _without_hashes(run: Path, dest: Path) -> Path:
    """A copy of the run as saved before the leakage check: no piece, no section entry."""
    shutil.copytree(run, dest)
    (dest / TRAIN_HASHES_FILE).unlink()
    config = json.loads((dest / "config.json").read_text())
    section = {k: v for k, v in config["bundle"].items() if k not in ("train_hashes", "files")}
    config["bundle"] = add_manifest(dest, section)
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def test_an_older_run_without_hashes_still_evaluates_and_says_so(run, folder, tmp_path,
                                                                  capsys):
    old = _without_hashes(run, tmp_path / "old")
    assert load_bundle(old).training_hashes() is None
    root, _ = folder
    out = tmp_path / "eval"
    assert evaluate.main(["--run", str(old), "--dataset", "image_folder", "--data-dir",
                          str(root), "--cache-dir", str(tmp_path / "tfds"), "--out", str(out),
                          "--n-bootstrap", "0"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["leakage"] == {"checked": False, "reason": NO_HASHES}
    assert f"leakage not checked: {NO_HASHES}" in capsys.readouterr().out
    assert "Not checked: no training hashes in this bundle" in (out / "report.md").read_text()
    csv_out = tmp_path / "p.csv"
    assert predict.main(["--run", str(old), str(root), "--csv", str(csv_out)]) == 0
    assert {r[-1] for r in list(csv.reader(csv_out.open()))[1:]} == {"unknown"}
    assert "duplicates of training images not checked" in capsys.readouterr().err


def test_a_listed_but_missing_or_changed_hashes_file_is_refused(run, tmp_path):
    gone = shutil.copytree(run, tmp_path / "gone")
    (gone / TRAIN_HASHES_FILE).unlink()
    with pytest.raises(BundleError, match=f"incomplete run: .*{TRAIN_HASHES_FILE} is missing"):
        load_bundle(gone)
    changed = shutil.copytree(run, tmp_path / "changed")
    np.savez(changed / TRAIN_HASHES_FILE, content=np.array(["x"]))
    with pytest.raises(BundleError, match="does not match its SHA-256 digest"):
        load_bundle(changed)


def test_a_renamed_or_malformed_hashes_piece_is_refused(run, tmp_path):
    renamed = shutil.copytree(run, tmp_path / "renamed")
    (renamed / TRAIN_HASHES_FILE).rename(renamed / "other.npz")
    config = json.loads((renamed / "config.json").read_text())
    section = {k: v for k, v in config["bundle"].items() if k != "files"}
    config["bundle"] = add_manifest(renamed, {**section, "train_hashes": "other.npz"})
    (renamed / "config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="bundle.train_hashes 'other.npz' must be "
                                          "train_hashes.npz"):
        load_bundle(renamed)
    malformed = shutil.copytree(run, tmp_path / "malformed")   # a forger's valid manifest
    np.savez(malformed / TRAIN_HASHES_FILE, content=np.array(["x"]))
    config = json.loads((malformed / "config.json").read_text())
    section = {k: v for k, v in config["bundle"].items() if k != "files"}
    config["bundle"] = add_manifest(malformed, section)
    (malformed / "config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="not a training-hashes file"):
        load_bundle(malformed).training_hashes()


def test_a_stack_checks_against_every_component(run, tmp_path):
    Stack([run, run]).fit(tmp_path / "stack")
    one = load_bundle(run).training_hashes()
    both = load_bundle(tmp_path / "stack").training_hashes()
    assert len(both.hashes) == 2 * len(one.hashes) and both.dataset == one.dataset


# -- inspect --against --------------------------------------------------------------------
def test_inspect_against_finds_copies_between_and_within_folders(tmp_path, capsys):
    """A: 8 phantoms in covid/normal, one also under the other class (re-encoded). B: two
    exact copies of A images, a JPEG copy filed under another class, 3 unrelated phantoms."""
    a_img = generate_phantoms(8, image_size=64, classes=("covid", "normal"), seed=0)
    b_img = generate_phantoms(3, image_size=64, classes=("covid", "normal"), seed=9)
    names = a_img["class_names"]
    a, b = tmp_path / "a", tmp_path / "b"
    for k, (image, y) in enumerate(zip(a_img["image"], a_img["label"], strict=True)):
        _png(image, a / names[y] / f"a{k}.png")
    y0 = a_img["label"][0]
    _png(a_img["image"][0], a / names[1 - y0] / "a0-again.png")          # within, cross-class
    _png(a_img["image"][1], b / names[a_img["label"][1]] / "b-exact1.png")
    _png(a_img["image"][2], b / names[a_img["label"][2]] / "b-exact2.png")
    _png(_jpeg(a_img["image"][3], 80), b / names[1 - a_img["label"][3]] / "b-jpeg3.png")
    for k, (image, y) in enumerate(zip(b_img["image"], b_img["label"], strict=True)):
        _png(image, b / names[y] / f"b-other{k}.png")
    argv = ["--dataset", "image_folder", "--data-dir", str(a), "--cache-dir",
            str(tmp_path / "c"), "--against", "image_folder", "--against-data-dir", str(b)]
    assert inspect_cli.main([*argv, "--json"]) == 0
    dup = json.loads(capsys.readouterr().out)["duplicates"]
    within_a, within_b = dup["within"]
    assert (within_a["pairs"], within_a["exact"]) == (1, 1)
    assert [(d["path"], d["other_path"]) for d in within_a["cross_class"]] == [
        (f"{names[y0]}/a0.png", f"{names[1 - y0]}/a0-again.png")]
    assert within_b["pairs"] == 0
    against = dup["against"]
    assert (against["duplicated"], against["exact"], against["near"]) == (3, 2, 1)
    assert {(d["path"].split("/")[1], d["other_path"].split("/")[1], d["kind"])
            for d in against["matches"]} == {("a1.png", "b-exact1.png", "exact"),
                                             ("a2.png", "b-exact2.png", "exact"),
                                             ("a3.png", "b-jpeg3.png", "near")}
    assert against["other_class"] == 1
    assert inspect_cli.main(argv) == 0                                   # the text report
    text = capsys.readouterr().out
    assert "against image_folder (6 images): 3 of this dataset's images are in it (2 exact, " \
           "1 near; 1 under another class there)" in text
    assert f"exact    {names[y0]}/a0.png ({names[y0]})  =  {names[1 - y0]}/a0-again.png" in text
    # disjoint folders: nothing
    assert inspect_cli.main(["--dataset", "image_folder", "--data-dir", str(b), "--cache-dir",
                             str(tmp_path / "c"), "--json"]) == 0
    alone = json.loads(capsys.readouterr().out)["duplicates"]
    assert alone["within"][0]["pairs"] == 0 and "against" not in alone


def test_inspect_refuses_a_data_dir_without_against(tmp_path, capsys):
    assert inspect_cli.main(["--dataset", "synthetic_cxr", "--against-data-dir",
                             str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "error: --against-data-dir needs --against"


@pytest.mark.slow
@pytest.mark.real_data
def test_inspect_finds_the_kermany_images_of_cxr_mini_again(shared_data, tmp_path, capsys):
    """cxr-mini-kermany holds cxr-mini's 342 Kermany images again as JPEG; cxr-kermany holds
    other Kermany images (README of ../shared/data)."""
    mini = ["--dataset", "image_folder", "--data-dir", str(shared_data / "cxr-mini"),
            "--cache-dir", str(tmp_path / "c"), "--json", "--against", "chest_xray_pneumonia"]
    assert inspect_cli.main([*mini, "--against-data-dir",
                             str(shared_data / "cxr-mini-kermany" / "chest_xray")]) == 0
    against = json.loads(capsys.readouterr().out)["duplicates"]["against"]
    assert (against["duplicated"], against["near"]) == (342, 342)
    assert inspect_cli.main([*mini, "--against-data-dir",
                             str(shared_data / "cxr-kermany" / "chest_xray")]) == 0
    assert json.loads(capsys.readouterr().out)["duplicates"]["against"]["duplicated"] == 0
