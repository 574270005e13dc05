"""Bad input: odd image modes decode, broken files are counted skips, bad roots fail early."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from folder_fixtures import (
    make_flat,
    make_kaggle_v4,
    make_kermany,
    write_image,
    write_mask,
)
from PIL import Image

from data_pipeline import builders
from data_pipeline import inspect as inspect_cli
from data_pipeline.datasets import load_dataset
from data_pipeline.decode import (
    DecodeError,
    decode_for_storage,
    decode_image,
    decode_mask,
)

REPO = Path(__file__).resolve().parents[2]


def _png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_sixteen_bit_is_stretched_over_its_own_range():
    values = np.linspace(1000, 3000, 64).astype(np.uint16).reshape(8, 8)
    out = decode_image(_png(Image.fromarray(values)))
    assert out.shape == (8, 8, 1) and out.dtype == np.uint8
    assert out.min() == 0 and out.max() == 255
    assert np.all(np.diff(out.ravel().astype(int)) >= 0)  # order preserved


@pytest.mark.parametrize("img", [
    Image.new("RGBA", (6, 5), (200, 100, 50, 0)),       # fully transparent: alpha dropped
    Image.new("P", (6, 5), 3),                           # palette entry 3 set below
])
def test_colour_alpha_and_palette_become_luminance(img):
    if img.mode == "P":
        img.putpalette([0, 0, 0] * 3 + [200, 100, 50] + [0, 0, 0] * 252)
    expected = Image.new("RGB", (1, 1), (200, 100, 50)).convert("L").getpixel((0, 0))
    out = decode_image(_png(img))
    assert out.shape == (5, 6, 1) and np.all(out == expected)


def test_la_and_cmyk():
    assert np.all(decode_image(_png(Image.new("LA", (4, 4), (77, 0)))) == 77)
    white = decode_image(_png(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), "JPEG"))
    assert white.shape == (8, 8, 1) and white.min() >= 250


def test_broken_files_raise_decode_error_with_reason(tmp_path):
    good = _png(Image.new("L", (32, 32), 9))
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not a picture")
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])
    for name, reason in [("zero.png", "empty file"), ("text.png", "not an image"),
                         ("cut.png", "corrupt image")]:
        with pytest.raises(DecodeError, match=reason):
            decode_image(tmp_path / name)


@pytest.mark.parametrize("side", [12, 16])  # 144 px: warning range; 256 px: over 2x the limit
def test_decompression_bomb_is_a_decode_error(monkeypatch, side):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(DecodeError, match="decompression bomb"):
        decode_image(_png(Image.new("L", (side, side))))


def test_storage_keeps_gray_png_bytes_and_re_encodes_the_rest():
    gray = _png(Image.new("L", (5, 4), 33))
    image, stored = decode_for_storage(gray)
    assert stored is gray and image.shape == (4, 5, 1)
    rgb = _png(Image.new("RGB", (5, 4), (33, 33, 33)), "JPEG")
    image, stored = decode_for_storage(rgb)
    assert stored != rgb and np.array_equal(decode_image(stored), image)


def test_mask_is_binarised_and_resized(tmp_path):
    mask = decode_mask(write_mask(tmp_path / "m.png", 12), (20, 30))
    assert mask.shape == (20, 30, 1) and set(np.unique(mask)) == {0, 255}


def _folder_with_bad_files(root: Path) -> Path:
    make_flat(root, {"COVID": 3, "Normal": 2})
    (root / "COVID" / "zero.png").write_bytes(b"")
    (root / "COVID" / "text.png").write_text("hello")
    good = (root / "Normal" / "img0.png").read_bytes()
    (root / "Normal" / "cut.png").write_bytes(good[: len(good) // 2])
    (root / "Normal" / "notes.txt").write_text("scan notes")
    (root / "Normal" / ".DS_Store").write_bytes(b"\0")  # hidden: not read, but reported
    Image.fromarray(np.arange(256, dtype=np.uint16).reshape(16, 16) * 16).save(
        root / "Normal" / "deep.png")  # 16-bit: decodes fine
    return root


def test_bad_files_are_counted_skips_and_survive_the_cache(tmp_path, monkeypatch, capsys):
    root = _folder_with_bad_files(tmp_path / "f")
    ds = load_dataset("image_folder", data_dir=root, cache_dir=tmp_path / "c")
    assert len(ds) == 6 and int((ds.labels == 1).sum()) == 3
    reasons = {s["path"]: s["reason"] for s in ds.skipped}
    assert set(reasons) == {"COVID/zero.png", "COVID/text.png", "Normal/cut.png",
                            "Normal/notes.txt", "Normal/.DS_Store"}
    assert reasons["COVID/zero.png"].startswith("empty file")
    assert reasons["Normal/.DS_Store"] == "hidden file"
    assert reasons["Normal/notes.txt"] == "not an image file type (.txt)"

    monkeypatch.setattr(builders.ImageFolder, "_examples", lambda self: 1 / 0)  # no rebuild
    capsys.readouterr()  # drop the first build's TFDS chatter
    rc = inspect_cli.main(["--dataset", "image_folder", "--data-dir", str(root),
                           "--cache-dir", str(tmp_path / "c"), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["num_examples"] == 6
    assert sorted(s["path"] for s in out["skipped"]) == sorted(reasons)


def test_empty_class_folder_warns_and_is_reported(tmp_path):
    root = make_flat(tmp_path / "f", {"COVID": 2, "Normal": 1})
    (root / "Viral Pneumonia").mkdir()
    with pytest.warns(UserWarning, match="Viral Pneumonia has no images"):
        ds = load_dataset("covid19_radiography", data_dir=root, cache_dir=tmp_path / "c")
    assert ds.class_names == ("covid", "normal")
    assert {"path": "Viral Pneumonia", "reason": "empty class folder"} in ds.skipped


def test_unknown_class_folder(tmp_path):
    root = make_flat(tmp_path / "f", {"COVID": 1, "Normal": 1, "Fracture": 1})
    with pytest.raises(ValueError, match="class folder .*Fracture.*unknown class name"):
        load_dataset("image_folder", data_dir=root, cache_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists()  # failed before writing anything
    ds = load_dataset("covid19_radiography", data_dir=root, cache_dir=tmp_path / "c")
    assert len(ds) == 2
    assert {"path": "Fracture", "reason": "ignored: not a known class folder"} in ds.skipped


def test_kermany_odd_folders_and_names(tmp_path):
    base = make_kermany(tmp_path / "k")
    (base / "__MACOSX").mkdir()
    write_image(base / "train" / "PNEUMONIA" / "scan_42.jpeg", fmt="JPEG")
    three = load_dataset("chest_xray_pneumonia", data_dir=base, cache_dir=tmp_path / "c")
    assert len(three) == 12
    assert {"path": "__MACOSX", "reason": "ignored: not a train/test/val folder"} in three.skipped
    assert {"path": "train/PNEUMONIA/scan_42.jpeg",
            "reason": "cannot tell bacterial from viral pneumonia by name"} in three.skipped
    two = load_dataset("chest_xray_pneumonia", data_dir=base, cache_dir=tmp_path / "c",
                       num_classes=2)
    assert len(two) == 13 and two.patient_ids[two.paths == "train/PNEUMONIA/scan_42.jpeg"] == ""


def test_missing_and_corrupt_masks_are_skips(tmp_path):
    root = make_kaggle_v4(tmp_path / "v4", {"COVID": 3, "Normal": 2}, masks=["COVID", "Normal"])
    (root / "COVID" / "masks" / "COVID-2.png").unlink()
    (root / "Normal" / "masks" / "Normal-1.png").write_text("broken")
    ds = load_dataset("covid19_radiography", data_dir=root, cache_dir=tmp_path / "c")
    assert ds.has_masks and len(ds) == 3
    reasons = {s["path"]: s["reason"] for s in ds.skipped}
    assert reasons["COVID/images/COVID-2.png"] == "no mask with this name in masks/"
    assert reasons["Normal/images/Normal-1.png"].startswith("mask Normal-1.png: not an image")


@pytest.mark.parametrize("case, error, message", [
    ("missing", FileNotFoundError, "does not exist"),
    ("empty", ValueError, "is empty"),
    ("file", NotADirectoryError, "is not a folder"),
    ("no_class_folders", ValueError, "no class folders found"),
    ("unset", ValueError, "needs data_dir"),
])
def test_bad_roots_fail_before_writing(tmp_path, case, error, message):
    root = tmp_path / "root"
    if case == "empty":
        root.mkdir()
    elif case == "file":
        root.write_text("x")
    elif case == "no_class_folders":
        write_image(root / "loose.png")
    data_dir = None if case == "unset" else root
    with pytest.raises(error, match=message):
        load_dataset("image_folder", data_dir=data_dir, cache_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_only_empty_class_folders_is_an_error(tmp_path):
    (tmp_path / "root" / "COVID").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images found"), pytest.warns(UserWarning):
        load_dataset("image_folder", data_dir=tmp_path / "root", cache_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_kermany_without_splits_is_an_error(tmp_path):
    root = make_flat(tmp_path / "f", {"NORMAL": 1})
    with pytest.raises(ValueError, match="no train/test/val folders"):
        load_dataset("chest_xray_pneumonia", data_dir=root, cache_dir=tmp_path / "c")


def test_cli_error_is_one_line_exit_2(tmp_path):
    missing = tmp_path / "nowhere"
    proc = subprocess.run(
        [sys.executable, "-m", "data_pipeline.inspect", "--dataset", "image_folder",
         "--data-dir", str(missing), "--cache-dir", str(tmp_path / "c")],
        capture_output=True, text=True, cwd=REPO, timeout=120, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == f"error: data_dir {missing} does not exist"


def test_cli_error_in_process(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc = inspect_cli.main(["--dataset", "covid19_radiography", "--data-dir",
                           str(tmp_path / "empty"), "--cache-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert rc == 2 and err == f"error: data_dir {tmp_path / 'empty'} is empty\n"
