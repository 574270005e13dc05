"""Odd files under a data root: each is read or reported with its reason, never an abort.

A corpus generated in tmp dirs (no real data): symlink loops, dangling symlinks, names that
are not UTF-8, unreadable files and folders, a folder named `x.png`, FIFOs, sockets, hidden
entries, files over the pixel budget, a file that vanishes after the scan, ... Build,
inspect, train, evaluate and predict must each end in a counted skip with a reason (or a
one-line `error:` with exit 2), with no traceback, no partial file and nothing silently
dropped. Manifests with a short row, a BOM, conflicting duplicates or rows matching no file
get a one-line error or a reported warning.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import os
import re
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from folder_fixtures import write_image, write_mask
from PIL import Image, ImageFile

from data_pipeline import datasets as datasets_lib
from data_pipeline import decode as decode_lib
from data_pipeline import inspect as inspect_cli
from data_pipeline.datasets import load_dataset
from data_pipeline.decode import DecodeError, decode_image, pixel_budget
from ensembles.bundle import load_bundle
from ensembles.inference import files as inference_files
from experiments import evaluate as evaluate_cli
from experiments import predict as predict_cli
from experiments.ensemble_cli import main as ensemble_main

REPO = Path(__file__).resolve().parents[2]
CLASSES = ("COVID", "Normal")


# -- making odd entries ------------------------------------------------------------------------

def _good(root: Path, per_class: int = 2) -> Path:
    for k, cls in enumerate(CLASSES):
        for i in range(per_class):
            write_image(root / cls / f"ok{i}.png", value=40 + 80 * k + 3 * i)
    return root


def _huge_png_header(path: Path, width: int = 9400, height: int = 9400) -> None:
    """A 16-bit PNG whose header claims width x height over a 4x4 body: decoding would
    allocate for the claimed size, a header check costs nothing."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), np.uint16)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR: after signature, length, type
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))


def _socket(path: Path) -> None:
    cwd = os.getcwd()
    os.chdir(path.parent)  # AF_UNIX paths are limited to ~107 bytes: bind by a short name
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(path.name)
    finally:
        os.chdir(cwd)


def _unreadable(path: Path) -> None:
    path.chmod(0)


@contextlib.contextmanager
def _permissions_enforced():
    """Tests run as root, which reads anything: emulate the kernel's refusal for files and
    folders whose mode grants no read permission (a no-op for another user)."""
    real_read, real_iterdir = Path.read_bytes, Path.iterdir

    def check(path: Path) -> None:
        if not path.stat().st_mode & 0o444:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    def read_bytes(self):
        check(self)
        return real_read(self)

    def iterdir(self):
        check(self)
        return real_iterdir(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Path, "read_bytes", read_bytes)
        mp.setattr(Path, "iterdir", iterdir)
        yield


def _truncated(path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "PNG")
    path.write_bytes(buf.getvalue()[:600])  # of ~4 KB: header intact, data cut


def _copy_good(root: Path, rel: str) -> Path:
    path = root / rel
    path.write_bytes((root / "COVID" / "ok0.png").read_bytes())
    return path


# kind -> (make(root), {path relative to root: reason regex}); every skipped path of a build
# must be one of these, with a matching reason. Paths are as reported (non-UTF-8 bytes \xNN).
Maker = Callable[[Path], None]
KINDS: dict[str, tuple[Maker, dict[str, str]]] = {
    "symlink_loop": (
        lambda r: (os.symlink("loop_b.png", r / "COVID/loop_a.png"),
                   os.symlink("loop_a.png", r / "COVID/loop_b.png")),
        {"COVID/loop_a.png": r"^symlink loop$", "COVID/loop_b.png": r"^symlink loop$"}),
    "self_symlink": (
        lambda r: os.symlink("self.png", r / "COVID/self.png"),
        {"COVID/self.png": r"^symlink loop$"}),
    "dangling_symlink": (
        lambda r: os.symlink("gone.png", r / "COVID/dangling.png"),
        {"COVID/dangling.png": r"^dangling symlink \(target gone\.png is missing\)$"}),
    "non_utf8_name": (
        lambda r: Path(os.fsdecode(os.fsencode(r / "COVID") + b"/bad\xff.png")).write_bytes(
            (r / "COVID/ok0.png").read_bytes()),
        {"COVID/bad\\xff.png": r"^name is not valid UTF-8 \(rename it\)$"}),
    "unreadable_file": (
        lambda r: _unreadable(_copy_good(r, "COVID/secret.png")),
        {"COVID/secret.png": r"^cannot read: Permission denied$"}),
    "unreadable_folder": (
        lambda r: (write_image(r / "Lung_Opacity/a.png"), _unreadable(r / "Lung_Opacity")),
        {"Lung_Opacity": r"^(cannot list folder: Permission denied|empty class folder)$"}),
    "folder_named_like_an_image": (
        lambda r: write_image(r / "COVID/x.png/inner.png"),
        {"COVID/x.png": r"^folder not read: .*named like an image \(1 entry inside\)$"}),
    "sub_folder": (
        lambda r: write_image(r / "COVID/extra/e.png"),
        {"COVID/extra": r"^folder not read: a folder inside a class folder \(1 entry"}),
    "symlink_to_an_ancestor": (
        lambda r: os.symlink("..", r / "COVID/up"),
        {"COVID/up": r"^folder not read: .*\(a symlink to \.\.\)$"}),
    "fifo": (
        lambda r: os.mkfifo(r / "COVID/pipe.png"),
        {"COVID/pipe.png": r"^not a regular file \(FIFO\)$"}),
    "socket": (
        lambda r: _socket(r / "COVID/sock.png"),
        {"COVID/sock.png": r"^not a regular file \(socket\)$"}),
    "hidden_file": (
        lambda r: (r / "COVID/.DS_Store").write_bytes(b"\0"),
        {"COVID/.DS_Store": r"^hidden file$"}),
    "hidden_folder": (
        lambda r: write_image(r / "COVID/.thumbs/t.png"),
        {"COVID/.thumbs": r"^hidden folder \(not read\)$"}),
    "zero_bytes": (
        lambda r: (r / "COVID/zero.png").write_bytes(b""),
        {"COVID/zero.png": r"^empty file \(0 bytes\)$"}),
    "text_named_png": (
        lambda r: (r / "COVID/text.png").write_text("hello"),
        {"COVID/text.png": r"^not an image \(Pillow cannot identify it\)$"}),
    "truncated_png": (
        lambda r: _truncated(r / "COVID/cut.png"),
        {"COVID/cut.png": r"^corrupt image: "}),
    "text_extension": (
        lambda r: (r / "COVID/notes.txt").write_text("notes"),
        {"COVID/notes.txt": r"^not an image file type \(\.txt\)$"}),
    "no_extension": (
        lambda r: (r / "COVID/README").write_text("readme"),
        {"COVID/README": r"^not an image file type \(no extension\)$"}),
    "over_the_pixel_budget": (
        lambda r: _huge_png_header(r / "COVID/huge.png"),
        {"COVID/huge.png": r"^too large: 9400x9400 = 88\.4 MP exceeds the pixel budget of 50 MP"}),
    "file_outside_class_folders": (
        lambda r: write_image(r / "loose.png"),
        {"loose.png": r"^not in a class folder$"}),
    "dangling_class_folder": (
        lambda r: os.symlink("missing_dir", r / "Normal_old"),
        {"Normal_old": r"^dangling symlink \(target missing_dir is missing\)$"}),
    "unused_masks_folder": (
        lambda r: write_mask(r / "COVID/masks/ok0.png"),
        {"COVID/masks": r"^folder not read: this layout uses no masks \(1 entry inside\)$"}),
    "file_beside_images": (
        lambda r: (write_image(r / "Viral Pneumonia/images/v.png"),
                   write_image(r / "Viral Pneumonia/stray.png")),
        {"Viral Pneumonia/stray.png": r"^beside images/ "}),
    "folder_inside_images": (
        lambda r: (write_image(r / "Viral Pneumonia/images/v.png"),
                   write_image(r / "Viral Pneumonia/images/old/o.png")),
        {"Viral Pneumonia/images/old": r"^folder not read: a folder inside images/"}),
}
# Kinds that are also examples: the expected count grows by these.
EXTRA_EXAMPLES = {"unreadable_folder": 0, "file_beside_images": 1, "folder_inside_images": 1}


def _odd_root(root: Path, kinds) -> Path:
    _good(root)
    for kind in kinds:
        KINDS[kind][0](root)
    return root


def _check_skips(skipped: list[dict[str, str]], expected: dict[str, str]) -> None:
    got = {s["path"] for s in skipped}
    assert got == set(expected), f"skipped {sorted(got)}, expected {sorted(expected)}"
    for s in skipped:
        assert re.search(expected[s["path"]], s["reason"]), (s, expected[s["path"]])
        assert "\n" not in s["reason"] and s["reason"].isprintable()


def _inspect(root: Path, cache: Path, capsys, dataset: str = "image_folder") -> tuple[int, dict,
                                                                                      str]:
    capsys.readouterr()
    rc = inspect_cli.main(["--dataset", dataset, "--data-dir", str(root), "--cache-dir",
                           str(cache), "--json"])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, (json.loads(out) if rc == 0 else {}), err


# -- build and inspect: one kind at a time -----------------------------------------------------

@pytest.mark.filterwarnings("ignore:class folder .* has no images")
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_each_odd_kind_is_a_counted_skip(kind, tmp_path, capsys):
    root = _odd_root(tmp_path / "root", [kind])
    with _permissions_enforced():
        rc, summary, err = _inspect(root, tmp_path / "c", capsys)
    assert rc == 0, err
    assert summary["num_examples"] == 2 * len(CLASSES) + EXTRA_EXAMPLES.get(kind, 0)
    _check_skips(summary["skipped"], KINDS[kind][1])


def test_file_gone_between_scan_and_decode(tmp_path, monkeypatch):
    root = _good(tmp_path / "root", per_class=3)
    real = datasets_lib._builder

    def scan_then_delete(*args, **kwargs):
        builder = real(*args, **kwargs)
        (root / "COVID" / "ok1.png").unlink()
        return builder

    monkeypatch.setattr(datasets_lib, "_builder", scan_then_delete)
    ds = load_dataset("image_folder", data_dir=root, cache_dir=tmp_path / "c")
    assert len(ds) == 5
    _check_skips(ds.skipped, {"COVID/ok1.png": r"^cannot read: No such file or directory$"})


def test_mask_without_an_image_and_odd_masks(tmp_path):
    root = tmp_path / "v4"
    for cls in CLASSES:
        for i in range(2):
            write_image(root / cls / "images" / f"{cls}-{i}.png", size=20)
            write_mask(root / cls / "masks" / f"{cls}-{i}.png")
    write_mask(root / "COVID" / "masks" / "orphan.png")
    os.symlink("nowhere.png", root / "Normal" / "masks" / "broken.png")
    ds = load_dataset("covid19_radiography", data_dir=root, cache_dir=tmp_path / "c")
    assert len(ds) == 4 and ds.has_masks
    _check_skips(ds.skipped, {
        "COVID/masks/orphan.png": r"^mask with no image of this name$",
        "Normal/masks/broken.png": r"^dangling symlink"})


def test_kermany_entries_beside_the_splits_are_reported(tmp_path):
    base = tmp_path / "k" / "chest_xray"
    for split in ("train", "test"):
        write_image(base / split / "NORMAL" / "IM-0001-0001.jpeg", fmt="JPEG")
        write_image(base / split / "PNEUMONIA" / "person1_virus_1.jpeg", fmt="JPEG")
    write_image(tmp_path / "k" / "__MACOSX" / "x.jpeg", fmt="JPEG")
    (base / "train" / "notes.txt").write_text("x")
    (base / "README.md").write_text("x")
    ds = load_dataset("chest_xray_pneumonia", data_dir=tmp_path / "k", cache_dir=tmp_path / "c")
    assert len(ds) == 4
    _check_skips(ds.skipped, {"__MACOSX": r"^ignored: beside chest_xray/",
                              "chest_xray/README.md": r"^not in a train/test/val folder$",
                              "chest_xray/train/notes.txt": r"^not in a class folder$"})


def test_odd_but_valid_files_are_read(tmp_path, monkeypatch):
    root = _good(tmp_path / "root")
    write_image(root / "COVID" / "new\nline, comma.png")
    os.symlink("ok0.png", root / "COVID" / "link.png")
    write_image(root / "COVID" / "really_a_png.jpg")   # decoded by content, not by name
    write_image(root / "COVID" / "UPPER.PNG")
    Image.fromarray(np.arange(1600, dtype=np.uint16).reshape(40, 40) * 40).save(
        root / "Normal" / "deep16.png")
    write_image(root / "Normal" / "big.jpeg", size=40, fmt="JPEG")
    write_image(root / "Normal" / "palette.png", size=40, mode="P")
    monkeypatch.setattr(decode_lib, "MAX_SIDE", 20)  # 40 px: shrunk by 2 while decoding
    ds = load_dataset("image_folder", data_dir=root, cache_dir=tmp_path / "c")
    assert ds.skipped == [] and len(ds) == 11
    shapes = {p: ds.source[i]["image"].shape for i, p in enumerate(ds.paths)}
    for name in ("deep16.png", "big.jpeg", "palette.png"):
        assert shapes[f"Normal/{name}"] == (20, 20, 1)
    assert shapes["COVID/new\nline, comma.png"] == shapes["COVID/link.png"] == (16, 16, 1)


# -- the whole corpus: nothing silently dropped ------------------------------------------------

# all but the kinds that add a class folder (a class of one image cannot be split to train)
COMBINED = sorted(set(KINDS) - {"unreadable_folder", "file_beside_images", "folder_inside_images"})
AS_ROOT = os.geteuid() == 0  # root reads a chmod-000 file: a fresh process reads secret.png


def _accounted(root: Path, read: set[str], skipped: set[str]) -> list[str]:
    """Entries under root (symlinks not followed) neither read, nor skipped, nor inside a
    skipped folder, nor a folder holding something read, nor the manifest."""
    holders = {str(Path(p).parent) for p in read}
    holders |= {str(Path(h).parent) for h in list(holders)}
    lost = []
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            rel = os.path.relpath(os.path.join(folder, name), root)
            shown = os.fsencode(rel).decode("utf-8", "backslashreplace")
            parents = {str(p) for p in Path(shown).parents}
            if not (shown in read or shown in skipped or parents & skipped or shown in holders
                    or shown == "manifest.csv"):
                lost.append(shown)
    return lost


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Every kind at once beside 24 good images per class (enough to train on)."""
    root = _good(tmp_path_factory.mktemp("corpus") / "root", per_class=24)
    for kind in COMBINED:
        KINDS[kind][0](root)
    return root


def _expected(kinds=COMBINED) -> dict[str, str]:
    return {p: r for k in kinds for p, r in KINDS[k][1].items()}


def test_build_of_the_whole_corpus_reads_or_reports_every_entry(corpus, tmp_path, capsys):
    with _permissions_enforced():
        rc, summary, err = _inspect(corpus, tmp_path / "c", capsys)
    assert rc == 0, err
    assert summary["num_examples"] == 48
    _check_skips(summary["skipped"], _expected())
    ds = load_dataset("image_folder", data_dir=corpus, cache_dir=tmp_path / "c")  # cached
    assert _accounted(corpus, set(ds.paths), {s["path"] for s in ds.skipped}) == []


def test_inspect_cli_on_the_corpus_in_a_fresh_process(corpus, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "data_pipeline.inspect", "--dataset", "image_folder",
         "--data-dir", str(corpus), "--cache-dir", str(tmp_path / "c")],
        capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    count = int(next(line for line in lines if line.startswith("skipped:")).split()[1])
    assert count == len(_expected()) - AS_ROOT
    assert "  COVID/bad\\xff.png: name is not valid UTF-8 (rename it)" in lines


# -- manifests ---------------------------------------------------------------------------------

def _manifest(root: Path, text: str | bytes) -> None:
    data = text.encode() if isinstance(text, str) else text
    (root / "manifest.csv").write_bytes(data)


@pytest.mark.parametrize("content, message", [
    ("file,label,patient_id\nCOVID/ok0.png,COVID,p1\nCOVID/ok1.png,COVID\n",
     r"manifest\.csv line 3: 2 field\(s\), the header has 3$"),
    ("file,label,patient_id\nCOVID/ok0.png,COVID,p1,extra\n",
     r"manifest\.csv line 2: more fields than the 3 of the header$"),
    ("file,label,patient_id\nCOVID/ok0.png,COVID,p1\nCOVID/ok0.png,COVID,p2\n",
     r"manifest\.csv line 3: COVID/ok0\.png has patient id 'p2', but line 2 gives 'p1'$"),
    (b"file,label,patient_id\nCOVID/ok0.png,COVID,p\xe9\n",
     r"manifest\.csv line 2: not UTF-8 text \(byte 0xe9\)$"),
    ("file,label,patient_id\n,COVID,p1\n", r"manifest\.csv line 2: empty `file`$"),
    ("name,patient\nCOVID/ok0.png,p1\n", r"manifest\.csv: missing column\(s\) file, patient_id$"),
], ids=["short_row", "long_row", "conflicting_duplicate", "not_utf8", "empty_file",
        "missing_columns"])
def test_bad_manifest_is_a_one_line_error(content, message, tmp_path, capsys):
    root = _good(tmp_path / "root")
    _manifest(root, content)
    rc, _, err = _inspect(root, tmp_path / "c", capsys)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert re.search(message, err.strip()), err
    assert not (tmp_path / "c").exists()  # refused before anything was written


def test_manifest_with_bom_and_agreeing_duplicate_is_read(tmp_path):
    root = _good(tmp_path / "root")
    _manifest(root, "\ufefffile,label,patient_id\r\nCOVID/ok0.png,COVID,p1\r\n"
                    "ok0.png,COVID,p1\r\nNormal/ok1.png,Normal,p2\r\nNormal/ok1.png,Normal,p2\r\n")
    ds = load_dataset("image_folder", data_dir=root, cache_dir=tmp_path / "c")
    ids = dict(zip(ds.paths, ds.patient_ids))
    assert ids == {"COVID/ok0.png": "p1", "COVID/ok1.png": "", "Normal/ok0.png": "p1",
                   "Normal/ok1.png": "p2"}  # the bare name ok0.png matches in both classes
    assert ds.skipped == []


def test_manifest_rows_matching_no_file_are_a_reported_warning(tmp_path):
    root = _good(tmp_path / "root")
    _manifest(root, "file,label,patient_id\nchest_xray/COVID/ok0.png,COVID,p1\n"
                    "COVID/ok1.png,COVID,p2\nelsewhere.png,COVID,p3\n")
    with pytest.warns(UserWarning, match=r"2 of 3 row\(s\) match no file"):
        ds = load_dataset("image_folder", data_dir=root, cache_dir=tmp_path / "c")
    _check_skips(ds.skipped, {"manifest.csv": r"^2 of 3 row\(s\) match no file under the root "
                                              r"\(first: chest_xray/COVID/ok0\.png\)"})
    assert dict(zip(ds.paths, ds.patient_ids))["COVID/ok1.png"] == "p2"


# -- the pixel budget and bounded decoding -----------------------------------------------------

def test_pixel_budget_is_checked_from_the_header(monkeypatch, tmp_path):
    assert pixel_budget() == 50_000_000
    monkeypatch.setenv("CXR_ENSEMBLES_MAX_PIXELS", "255")
    assert pixel_budget() == 255 and pixel_budget(1000) == 1000
    path = write_image(tmp_path / "a.png", size=16)
    with pytest.raises(DecodeError, match=r"^too large: 16x16 = 0\.0 MP exceeds"):
        decode_image(path)
    assert decode_image(path, max_pixels=256).shape == (16, 16, 1)
    monkeypatch.setenv("CXR_ENSEMBLES_MAX_PIXELS", "lots")
    with pytest.raises(ValueError, match="must be a positive integer, got 'lots'"):
        pixel_budget()
    with pytest.raises(ValueError, match="positive integer"):
        pixel_budget(0)
    monkeypatch.delenv("CXR_ENSEMBLES_MAX_PIXELS")
    # the header says 9400x9400: refused without decoding (no 176 MB allocation)
    _huge_png_header(tmp_path / "huge.png")
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded"))
    with pytest.raises(DecodeError, match="too large: 9400x9400"):
        decode_image(tmp_path / "huge.png")


def test_load_dataset_max_pixels_option(tmp_path):
    root = _good(tmp_path / "root")
    write_image(root / "COVID" / "big.png", size=32)
    ds = load_dataset("image_folder", data_dir=root, cache_dir=tmp_path / "c", max_pixels=500)
    assert len(ds) == 4
    _check_skips(ds.skipped, {"COVID/big.png": r"^too large: 32x32 = 0\.0 MP exceeds the "
                                               r"pixel budget of 0\.0005 MP"})
    assert len(load_dataset("image_folder", data_dir=root, cache_dir=tmp_path / "c")) == 5


_PEAK = """
import importlib.util, resource, sys
spec = importlib.util.spec_from_file_location("decode", "data_pipeline/decode.py")
decode = importlib.util.module_from_spec(spec)
spec.loader.exec_module(decode)  # numpy and Pillow only: no TFDS import to wait for
decode_image = decode.decode_image
path = sys.argv[1]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
image = decode_image(path)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(image.shape[0], image.shape[1], (after - before) // 1024)
"""


def test_large_sixteen_bit_png_decodes_in_bounded_memory(tmp_path):
    """6000x6000 16-bit (36 MP, under the budget): the old decoder made three full-size
    float64 copies (~900 MB); shrinking to <= MAX_SIDE before converting needs ~250 MB."""
    side = 6000
    values = np.zeros((side, side), np.uint16)
    values[::50] = 40000
    Image.fromarray(values).save(tmp_path / "big16.png", compress_level=1)
    del values
    proc = subprocess.run([sys.executable, "-c", _PEAK, str(tmp_path / "big16.png")],
                          capture_output=True, text=True, cwd=REPO, timeout=120, check=True)
    h, w, grown_mb = map(int, proc.stdout.split())
    assert (h, w) == (3000, 3000)  # shrunk by 2: 6000 > MAX_SIDE = 4096
    assert grown_mb < 400, f"decoding grew the process by {grown_mb} MB"


# -- train and evaluate on the corpus ----------------------------------------------------------

@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory, trains) -> tuple[Path, Path]:
    """A tiny single model trained by the CLI on the corpus itself (its odd files skipped)."""
    out = tmp_path_factory.mktemp("runs") / "single"
    cache = tmp_path_factory.mktemp("cache")
    with _permissions_enforced():
        rc = ensemble_main("single", "", [
            "--dataset", "image_folder", "--data-dir", str(corpus), "--cache-dir", str(cache),
            "--backbone", "simple_cnn", "--image-size", "16", "--width", "0.25", "--epochs", "1",
            "--batch-size", "8", "--n-bootstrap", "0", "--no-progress", "--out", str(out)])
    assert rc == 0
    return out, cache


def test_train_and_evaluate_on_the_corpus(run, corpus, tmp_path, capsys):
    out, cache = run
    config = json.loads((out / "config.json").read_text())
    assert config["dataset_examples"] == 48
    trained = json.loads((out / "metrics.json").read_text())["skipped_files"]
    assert trained["count"] == len(_expected()) == len(trained["files"])
    report = (out / "report.md").read_text()
    assert f"{len(_expected())} entries under the data root were not read:" in report
    assert all(f"`{s['path']}`: {s['reason']}" in report for s in trained["files"][:50])
    rc = evaluate_cli.main(["--run", str(out), "--dataset", "image_folder", "--data-dir",
                            str(corpus), "--cache-dir", str(cache), "--n-bootstrap", "0",
                            "--out", str(tmp_path / "eval")])
    assert rc == 0 and "Traceback" not in capsys.readouterr().err
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["evaluated_on"]["skipped_files"] == len(_expected())
    assert metrics["evaluated_on"]["skipped"] == trained["files"]
    assert "entries under the data root were not read" in (tmp_path / "eval" /
                                                            "report.md").read_text()


# -- predict -----------------------------------------------------------------------------------

def _predict(argv: list[str], capsys) -> tuple[int, list[str], str]:
    capsys.readouterr()
    rc = predict_cli.main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out.splitlines(), err


def _skip_lines(err: str) -> dict[str, str]:
    return dict(line[len("skipped "):].split(": ", 1) for line in err.splitlines()
                if line.startswith("skipped ") and ": " in line)


def test_predict_reads_or_reports_every_entry(run, corpus, tmp_path, capsys):
    out = tmp_path / "p.csv"
    with _permissions_enforced():
        rc, _, err = _predict(["--run", str(run[0]), str(corpus), "--csv", str(out)], capsys)
    assert rc == 0, err
    rows = list(csv.reader(out.open(encoding="utf-8")))
    read = {os.path.relpath(r[0], corpus) for r in rows[1:]}
    skips = {os.path.relpath(p, corpus): reason for p, reason in _skip_lines(err).items()}
    # predict walks sub-folders, so folders the build leaves out are read here
    walked = {"COVID/x.png/inner.png", "COVID/extra/e.png", "COVID/masks/ok0.png", "loose.png"}
    assert walked <= read and len(read) == 48 + len(walked)
    expected = {p: r for p, r in _expected().items()
                if not any(p == w or w.startswith(p + "/") for w in walked)}
    expected["COVID/up"] = r"^folder already read \(a symlink loop or a second link to it\)$"
    _check_skips([{"path": p, "reason": r} for p, r in skips.items()], expected)
    assert f"predicted {len(read)} image(s), skipped {len(skips)} unreadable" in err
    assert _accounted(corpus, read, set(skips)) == []
    assert [p.name for p in tmp_path.iterdir()] == ["p.csv"]  # no temporary left behind


def test_predict_to_stdout_in_a_fresh_process(run, corpus):
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.predict", "--run", str(run[0]), str(corpus)],
        capture_output=True, cwd=REPO, timeout=300, check=False)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 0 and "Traceback" not in err, err[-2000:]
    rows = list(csv.reader(io.StringIO(proc.stdout.decode("utf-8"))))  # valid UTF-8, whole
    assert len(rows) == 1 + 48 + 4 + AS_ROOT
    assert "skipped " + str(corpus / "COVID") + "/bad\\xff.png: name is not valid UTF-8" in err


def test_predict_exits_2_when_nothing_was_predictable(run, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "notes.txt").write_text("x")
    (folder / "zero.png").write_bytes(b"")
    os.mkfifo(folder / "pipe.png")
    out = tmp_path / "p.csv"
    out.write_text("previous\n")
    rc, stdout, err = _predict(["--run", str(run[0]), str(folder), "--csv", str(out)], capsys)
    assert rc == 2 and stdout == []
    assert err.splitlines()[-1] == "error: nothing to predict: no readable image among the " \
                                   "inputs (3 skipped)"
    assert set(_skip_lines(err)) == {str(folder / n) for n in ("notes.txt", "zero.png",
                                                              "pipe.png")}
    assert out.read_text() == "previous\n"  # untouched
    rc, stdout, err = _predict(["--run", str(run[0]), str(tmp_path / "missing.png")], capsys)
    assert rc == 2 and err == f"error: no such file or folder: {tmp_path / 'missing.png'}\n"


def test_predict_named_odd_inputs_and_pixel_flag(run, corpus, tmp_path, capsys):
    pipe = tmp_path / "pipe.png"
    os.mkfifo(pipe)
    os.symlink("gone.png", tmp_path / "dangling.png")
    write_image(tmp_path / "small.png", size=8)
    rc, stdout, err = _predict(["--run", str(run[0]), str(pipe), str(tmp_path / "dangling.png"),
                                str(corpus / "COVID" / "ok0.png"), str(tmp_path / "small.png"),
                                "--max-pixels", "100"], capsys)
    assert rc == 0
    assert [r[0] for r in csv.reader(stdout[1:])] == [str(tmp_path / "small.png")]
    skips = _skip_lines(err)
    assert skips[str(pipe)] == "not a regular file (FIFO)"
    assert skips[str(tmp_path / "dangling.png")].startswith("dangling symlink")
    assert skips[str(corpus / "COVID" / "ok0.png")].startswith("too large: 16x16")
    rc, _, err = _predict(["--run", str(run[0]), str(pipe), "--max-pixels", "0"], capsys)
    assert rc == 2 and err == "error: max_pixels must be a positive integer, got 0\n"


def test_predict_csv_is_whole_or_untouched(run, corpus, tmp_path, capsys, monkeypatch):
    out = tmp_path / "p.csv"
    out.write_text("previous\n")
    real_writer = csv.writer

    class DiskFull:
        def __init__(self, fh):
            self.inner = real_writer(fh)

        def writerows(self, table):
            self.inner.writerows(table[:3])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(predict_cli.csv, "writer", DiskFull)
    rc, _, err = _predict(["--run", str(run[0]), str(corpus / "Normal"), "--csv", str(out)],
                          capsys)
    assert rc == 2 and err.splitlines()[-1] == "error: [Errno 28] No space left on device"
    assert out.read_text() == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv"]  # temporary removed
    monkeypatch.undo()
    rc, _, err = _predict(["--run", str(run[0]), str(corpus / "Normal"), "--csv",
                           str(tmp_path / "no" / "p.csv")], capsys)
    assert rc == 2 and err == f"error: --csv: folder {tmp_path / 'no'} does not exist\n"


def test_predict_stat_kinds_are_never_opened(tmp_path):
    """find_images classifies by stat: a FIFO among the inputs would block an open()."""
    os.mkfifo(tmp_path / "pipe.png")
    files, skipped = inference_files.find_images([tmp_path])
    assert files == [] and skipped == [{"path": str(tmp_path / "pipe.png"),
                                        "reason": "not a regular file (FIFO)"}]
    assert stat.S_ISFIFO((tmp_path / "pipe.png").stat().st_mode)


def test_predict_holds_a_bounded_number_of_decoded_pixels(run, corpus, monkeypatch):
    bundle = load_bundle(run[0])
    sizes = []
    real = type(bundle).predict

    def spy(self, source, indices, **kwargs):
        sizes.append(len(source))
        return real(self, source, indices, **kwargs)

    monkeypatch.setattr(type(bundle), "predict", spy)
    monkeypatch.setattr(inference_files, "CHUNK_PIXELS", 3 * 256)  # three 16x16 images
    files = sorted((corpus / "Normal").glob("*.png"))
    kept, p, skipped = inference_files.predict_images(bundle, files)
    assert sizes == [3] * 8 and len(kept) == 24 and skipped == []
    assert p.proba.shape == (24, 2)


def test_cache_folder_inside_the_root_is_neither_a_class_nor_a_skip(tmp_path):
    root = _good(tmp_path / "root")
    first = load_dataset("image_folder", data_dir=root, cache_dir=root / "cache")
    write_image(root / "Normal" / "new.png")  # a rebuild: the scan now meets root/cache
    second = load_dataset("image_folder", data_dir=root, cache_dir=root / "cache")
    assert len(first) == 4 and len(second) == 5 and second.skipped == []


def test_decode_never_opens_a_fifo_or_folder(tmp_path):
    """decode_image checks the file type first: opening a FIFO would block until a writer
    comes (a thread plays that writer after 2 s, so a regression fails instead of hanging)."""
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)

    def writer():
        time.sleep(2)
        with contextlib.suppress(OSError):  # ENXIO: nobody is reading, as it should be
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    with pytest.raises(DecodeError, match=r"^not a regular file \(FIFO\)$"):
        decode_image(fifo)
    with pytest.raises(DecodeError, match=r"^not a regular file \(folder\)$"):
        decode_image(tmp_path)
    with pytest.raises(DecodeError, match=r"^cannot read: No such file or directory$"):
        decode_image(tmp_path / "missing.png")
    thread.join()
