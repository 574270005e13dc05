"""DICOM input: files generated with pydicom (12-bit stored values, rescale slope/intercept,
windows, VOI LUTs, both photometric interpretations, RLE and JPEG 2000) read to the expected
8-bit images; what cannot be read is a counted skip with its reason; a folder dataset of
DICOM files builds with patient ids from the PatientID tag; predict on such a folder writes
one row per readable file."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    MPEG2MPML,
    BasicTextSRStorage,
    ExplicitVRLittleEndian,
    GrayscaleSoftcopyPresentationStateStorage,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

from data_pipeline import dicom, inspect
from data_pipeline.datasets import load_dataset
from data_pipeline.decode import DecodeError, decode_for_storage, decode_image
from data_pipeline.splits import split_indices
from data_pipeline.synthetic import generate_phantoms
from ensembles.bundle import load_bundle
from ensembles.inference import files as inference_files
from experiments import evaluate, predict

DX = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def phantom12(size: int = 32, seed: int = 0) -> np.ndarray:
    """A phantom radiograph as 12-bit stored values (0..4095, low bits noisy)."""
    image = generate_phantoms(1, image_size=size, seed=seed)["image"][0, ..., 0]
    noise = np.random.default_rng(seed).integers(0, 16, image.shape)
    return (image.astype(np.uint16) * 16 + noise).astype(np.uint16)


def make_ds(stored: np.ndarray | None, *, photometric: str = "MONOCHROME2",
            patient_id: str = "PAT-1", sop: str = DX, **tags) -> Dataset:
    """A DX dataset holding `stored` (12 bits in 16) as native little-endian pixel data."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = sop
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientID = patient_id
    ds.Modality = "DX"
    if stored is not None:
        ds.Rows, ds.Columns = stored.shape[-2:]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelRepresentation = 0
        ds.PixelData = stored.astype("<u2").tobytes()
    for key, value in tags.items():
        setattr(ds, key, value)
    return ds


def save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_dicom(path: Path, stored: np.ndarray | None, **kwargs) -> Path:
    return save(make_ds(stored, **kwargs), path)


def reason(source, **kwargs) -> str:
    with pytest.raises(DecodeError) as info:
        decode_image(source, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


# -- conversion ----------------------------------------------------------------------------

def test_monochrome1_inverted_equals_monochrome2(tmp_path):
    stored = phantom12()
    rescale = {"RescaleSlope": 0.5, "RescaleIntercept": -1024}
    m2 = write_dicom(tmp_path / "m2.dcm", stored, **rescale)
    m1 = write_dicom(tmp_path / "m1.dcm", 4095 - stored, photometric="MONOCHROME1", **rescale)
    a, b = decode_image(m2), decode_image(m1)
    assert a.shape == (32, 32, 1) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    # min-max scaling of the (rescaled) values, by hand
    lo, hi = stored.min(), stored.max()
    expected = np.rint((stored - lo) / (hi - lo) * 255).astype(np.uint8)
    np.testing.assert_array_equal(a[..., 0], expected)
    assert len(np.unique(a)) > 100


def test_12bit_window_gives_the_expected_mapping(tmp_path):
    stored = np.arange(4096, dtype=np.uint16).reshape(64, 64)  # every 12-bit value once
    c, w = 1000.0, 2000.0  # in rescaled units; the second window must be ignored
    path = write_dicom(tmp_path / "w.dcm", stored, RescaleSlope=2, RescaleIntercept=-1000,
                       WindowCenter=[c, 3000], WindowWidth=[w, 500])
    image, meta = dicom.read_dicom(path)
    assert meta["voi"] == "window" and meta["patient_id"] == "PAT-1"
    x = stored.astype(np.float64) * 2 - 1000
    # DICOM PS3.3 C.11.2.1.2.1 (LINEAR), output range 0..255
    below, above = x <= c - 0.5 - (w - 1) / 2, x > c - 0.5 + (w - 1) / 2
    expected = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255
    expected[below], expected[above] = 0, 255
    diff = np.abs(image.astype(int) - np.rint(expected).astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99
    assert below.sum() == 501 and (image[below] == 0).all()
    assert above.sum() == 2596 and (image[above] == 255).all()
    assert image[x == c].item() in (127, 128)


def test_voi_lut_sequence_applies_before_the_window(tmp_path):
    stored = np.arange(1024, dtype=np.uint16).reshape(32, 32) * 4
    lut = (np.sqrt(np.arange(4096) / 4095) * 4095).astype(np.uint16)  # a gamma curve
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 12]
    item.add_new("LUTData", "US", lut.tolist())
    path = write_dicom(tmp_path / "lut.dcm", stored, VOILUTSequence=Sequence([item]),
                       WindowCenter=100, WindowWidth=10)
    image, meta = dicom.read_dicom(path)
    assert meta["voi"] == "lut"
    expected = np.rint(lut[stored] / lut.max() * 255).astype(np.uint8)
    np.testing.assert_array_equal(image, expected)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["rle", "j2k"])
def test_compressed_equals_uncompressed(tmp_path, syntax):
    stored = phantom12(64, seed=1)
    tags = {"WindowCenter": 2000, "WindowWidth": 3000}
    plain = write_dicom(tmp_path / "plain.dcm", stored, **tags)
    ds = make_ds(stored, **tags)
    ds.compress(syntax)
    packed = save(ds, tmp_path / "packed.dcm")
    assert pydicom.dcmread(packed).file_meta.TransferSyntaxUID == syntax
    assert packed.stat().st_size != plain.stat().st_size
    np.testing.assert_array_equal(decode_image(packed), decode_image(plain))


def test_dicom_is_found_by_content_and_stored_as_png(tmp_path):
    stored = phantom12()
    named = write_dicom(tmp_path / "a.dcm", stored)
    bare = (tmp_path / "1.2.840.113619.2.55").with_suffix(".320")  # a UID-style name
    bare.write_bytes(named.read_bytes())
    assert dicom.is_dicom(named) and dicom.is_dicom(bare) and dicom.is_dicom(bare.read_bytes())
    png = tmp_path / "x.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(png)
    assert not dicom.is_dicom(png) and not dicom.is_dicom(tmp_path / "missing")
    image, stored_png = decode_for_storage(bare)
    np.testing.assert_array_equal(image, decode_image(named))
    np.testing.assert_array_equal(decode_image(stored_png), image)
    # without the preamble (an old raw file) a .dcm name still reads it
    raw = make_ds(stored)
    del raw.file_meta
    raw.save_as(tmp_path / "raw.dcm", enforce_file_format=False, implicit_vr=True,
                little_endian=True)
    assert not dicom.has_preamble((tmp_path / "raw.dcm").read_bytes())
    np.testing.assert_array_equal(decode_image(tmp_path / "raw.dcm"), image)


def test_oversized_dicom_is_shrunk_like_any_image(tmp_path, monkeypatch):
    monkeypatch.setattr("data_pipeline.decode.MAX_SIDE", 16)
    path = write_dicom(tmp_path / "big.dcm", phantom12(32))
    full, _ = dicom.read_dicom(path)
    small = decode_image(path)
    assert small.shape == (16, 16, 1)
    box = full.reshape(16, 2, 16, 2).mean(axis=(1, 3))
    assert np.abs(small[..., 0].astype(int) - np.rint(box)).max() <= 1


# -- refusals ------------------------------------------------------------------------------

def test_refusals_have_one_line_reasons(tmp_path, monkeypatch):
    stored = phantom12(16)
    good = write_dicom(tmp_path / "good.dcm", stored)
    data = good.read_bytes()
    (tmp_path / "cut_pixels.dcm").write_bytes(data[:-100])
    assert "truncated" in reason(tmp_path / "cut_pixels.dcm")
    (tmp_path / "cut_header.dcm").write_bytes(data[:300])
    assert "truncated" in reason(tmp_path / "cut_header.dcm")
    (tmp_path / "empty.dcm").write_bytes(b"")
    assert reason(tmp_path / "empty.dcm") == "empty file (0 bytes)"

    sr = write_dicom(tmp_path / "sr.dcm", None, sop=BasicTextSRStorage)
    assert reason(sr) == "not an image: a DICOM Basic Text SR Storage object (no pixel data)"
    pr = write_dicom(tmp_path / "pr.dcm", None, sop=GrayscaleSoftcopyPresentationStateStorage)
    assert reason(pr).startswith("not an image: a DICOM Grayscale Softcopy Presentation")

    rgb = make_ds(stored)
    rgb.SamplesPerPixel, rgb.PhotometricInterpretation, rgb.PlanarConfiguration = 3, "RGB", 0
    rgb.BitsAllocated, rgb.BitsStored, rgb.HighBit = 8, 8, 7
    rgb.PixelData = np.zeros((16, 16, 3), np.uint8).tobytes()
    assert reason(save(rgb, tmp_path / "rgb.dcm")).startswith(
        "colour DICOM image (PhotometricInterpretation RGB, 3 sample(s) per pixel)")
    frames = write_dicom(tmp_path / "frames.dcm", np.stack([stored, stored]), NumberOfFrames=2)
    assert reason(frames).startswith("multi-frame DICOM image (2 frames)")

    lateral = write_dicom(tmp_path / "lat.dcm", stored, ViewPosition="LL")
    assert reason(lateral).startswith("lateral view (ViewPosition LL)")
    assert decode_image(lateral, skip_lateral=False).shape == (16, 16, 1)
    pa = write_dicom(tmp_path / "pa.dcm", stored, ViewPosition="PA")
    assert decode_image(pa).shape == (16, 16, 1)

    assert reason(good, max_pixels=255) == ("too large: 16x16 = 0.0 MP exceeds the pixel "
                                            "budget of 0.000255 MP ($CXR_ENSEMBLES_MAX_PIXELS)")
    mpeg = make_ds(stored)
    mpeg.file_meta.TransferSyntaxUID = MPEG2MPML
    mpeg.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])
    assert reason(save(mpeg, tmp_path / "mpeg.dcm")).startswith(
        "cannot decode transfer syntax MPEG2 Main Profile / Main Level")
    bad_window = write_dicom(tmp_path / "w0.dcm", stored, WindowCenter=10, WindowWidth=0)
    assert reason(bad_window).startswith("cannot apply the DICOM LUTs / window")


def test_a_missing_plugin_is_named(tmp_path, monkeypatch):
    class Unavailable:
        is_available = False
        missing_dependencies = ["pylibjpeg - requires numpy, pylibjpeg and pylibjpeg-rle"]

    ds = make_ds(phantom12(16))
    ds.compress(RLELossless)
    path = save(ds, tmp_path / "rle.dcm")
    monkeypatch.setattr(dicom, "get_decoder", lambda uid: Unavailable())
    assert reason(path) == ("cannot decode transfer syntax RLE Lossless: missing plugin "
                            "(pylibjpeg - requires numpy, pylibjpeg and pylibjpeg-rle)")


# -- a folder dataset and predict -----------------------------------------------------------

def dicom_folder(root: Path) -> dict[str, str]:
    """covid/ and normal/ DICOM phantoms of 3 patients (.dcm, extension-less and UID-named
    files, MONOCHROME1 and RLE among them) plus files that must be skipped; returns the
    expected skip reasons by path."""
    for i in range(6):
        cls = ("covid", "normal")[i % 2]
        stored = phantom12(24, seed=10 + i)
        kwargs = {"patient_id": f"P{i % 3}", "ViewPosition": "PA",
                  "RescaleSlope": 1, "RescaleIntercept": 0}
        if i == 1:
            kwargs["photometric"], stored = "MONOCHROME1", 4095 - stored
        ds = make_ds(stored, **kwargs)
        if i == 2:
            ds.compress(RLELossless)
        name = {3: f"IMG{i}", 4: f"1.2.840.99.{i}"}.get(i, f"img{i}.dcm")
        save(ds, root / cls / name)
    write_dicom(root / "covid" / "side.dcm", phantom12(24, seed=20), patient_id="P0",
                ViewPosition="LL")
    good = (root / "covid" / "img0.dcm").read_bytes()
    (root / "covid" / "cut.dcm").write_bytes(good[:-200])
    write_dicom(root / "normal" / "report.dcm", None, sop=BasicTextSRStorage, patient_id="P1")
    (root / "normal" / "README").write_text("not dicom")
    return {"covid/side.dcm": "lateral view (ViewPosition LL)",
            "covid/cut.dcm": "truncated or damaged DICOM pixel data",
            "normal/report.dcm": "not an image: a DICOM Basic Text SR Storage object",
            "normal/README": "not an image file type (no extension)"}


def test_image_folder_of_dicom_builds_with_patient_ids(tmp_path):
    root = tmp_path / "data"
    expected_skips = dicom_folder(root)
    (root / "manifest.csv").write_text("file,label,patient_id\nimg0.dcm,covid,FROM-MANIFEST\n")
    ds = load_dataset("image_folder", data_dir=root, cache_dir=tmp_path / "tfds")
    paths = list(ds.paths)
    assert sorted(paths) == sorted(["covid/img0.dcm", "covid/img2.dcm", "covid/1.2.840.99.4",
                                    "normal/img1.dcm", "normal/IMG3", "normal/img5.dcm"])
    pid = dict(zip(paths, ds.patient_ids, strict=True))
    assert pid == {"covid/img0.dcm": "FROM-MANIFEST", "normal/img1.dcm": "P1",
                   "covid/img2.dcm": "P2", "normal/IMG3": "P0", "covid/1.2.840.99.4": "P1",
                   "normal/img5.dcm": "P2"}
    skipped = {s["path"]: s["reason"] for s in ds.skipped}
    assert set(skipped) == set(expected_skips)
    for path, start in expected_skips.items():
        assert skipped[path].startswith(start), (path, skipped[path])
    for k, path in enumerate(paths):
        np.testing.assert_array_equal(ds.source[k]["image"], decode_image(root / path))
    # MONOCHROME1 img1 reads as its phantom, like the MONOCHROME2 files
    stored = phantom12(24, seed=11)
    lo, hi = stored.min(), stored.max()
    np.testing.assert_array_equal(ds.source[paths.index("normal/img1.dcm")]["image"][..., 0],
                                  np.rint((stored - lo) / (hi - lo) * 255).astype(np.uint8))
    splits = split_indices(ds.labels, ds.patient_ids, ratios=(0.5, 0.0, 0.5), seed=0)
    groups = [set(ds.patient_ids[splits[s]]) for s in ("train", "test")]
    assert groups[0] and groups[1] and not groups[0] & groups[1]

    kept = load_dataset("image_folder", data_dir=root, cache_dir=tmp_path / "tfds",
                        skip_lateral=False)
    assert "covid/side.dcm" in set(kept.paths) and len(kept) == 7
    assert "covid/side.dcm" not in {s["path"] for s in kept.skipped}


def test_inspect_reads_a_dicom_folder(tmp_path, capsys):
    root = tmp_path / "data"
    dicom_folder(root)
    argv = ["--dataset", "image_folder", "--data-dir", str(root), "--cache-dir",
            str(tmp_path / "tfds"), "--json"]
    for extra, examples, patients in (([], 6, 3), (["--keep-lateral"], 7, 3)):
        assert inspect.main(argv + extra) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["num_examples"] == examples and summary["num_patients"] == patients
        assert summary["classes"] == {"covid": examples - 3, "normal": 3}
        assert len(summary["skipped"]) == 10 - examples


@pytest.fixture(scope="module")
def run(tiny_run):
    """The shared tiny OvA run (conftest.tiny_run)."""
    return tiny_run("ova")


@pytest.mark.slow
def test_predict_on_a_folder_of_dicom_writes_predictions(run, tmp_path, capsys):
    folder = tmp_path / "in"
    expected_skips = dicom_folder(folder)
    out, cams, page = tmp_path / "p.csv", tmp_path / "cams", tmp_path / "page.html"
    assert predict.main(["--run", str(run), str(folder), "--csv", str(out), "--gradcam",
                         str(cams), "--report", str(page)]) == 0
    err = capsys.readouterr().err
    rows = list(csv.reader(out.open()))
    assert rows[0][:6] == ["path", "covid", "normal", "viral_pneumonia", "bacterial_pneumonia",
                           "prediction"]
    names = sorted(Path(r[0]).relative_to(folder).as_posix() for r in rows[1:])
    assert names == sorted(["covid/img0.dcm", "covid/img2.dcm", "covid/1.2.840.99.4",
                            "normal/img1.dcm", "normal/IMG3", "normal/img5.dcm"])
    # one overlay per predicted DICOM, and the page lists every row with its overlay
    assert sorted(f.name for f in cams.iterdir()) == sorted(
        ["img0.png", "img2.png", "1.2.840.99.png", "img1.png", "IMG3.png", "img5.png"])
    assert all(np.asarray(Image.open(f)).shape == (256, 256, 3) for f in cams.iterdir())
    html = page.read_text()
    assert html.count("<tr>") == 1 + 6 and html.count('class="tile"') == 6
    assert all(r[0] in html for r in rows[1:])
    probs = np.array([[float(v) for v in r[1:5]] for r in rows[1:]])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    for path, start in expected_skips.items():
        assert f"skipped {folder / path}: {start}" in err
    assert "predicted 6 image(s), skipped 4" in err
    # the same 8-bit images as PNG files get the same probabilities
    pngs = []
    for r in rows[1:]:
        png = tmp_path / "png" / f"{len(pngs)}.png"
        png.parent.mkdir(exist_ok=True)
        Image.fromarray(decode_image(r[0])[..., 0]).save(png)
        pngs.append(png)
    _, p, skipped = inference_files.predict_images(load_bundle(run), pngs)
    assert not skipped
    np.testing.assert_allclose(p.proba, probs, atol=2e-6)

    assert predict.main(["--run", str(run), str(folder), "--csv", str(out),
                         "--keep-lateral"]) == 0
    assert len(list(csv.reader(out.open()))) == 1 + 7

    for extra, examples in (([], 6), (["--keep-lateral"], 7)):
        report = tmp_path / f"eval{examples}"
        assert evaluate.main(["--run", str(run), "--dataset", "image_folder", "--data-dir",
                              str(folder), "--cache-dir", str(tmp_path / "tfds"), "--out",
                              str(report), "--n-bootstrap", "0", *extra]) == 0
        metrics = json.loads((report / "metrics.json").read_text())
        assert metrics["n_examples"] == metrics["evaluated_on"]["examples"] == examples
        assert metrics["evaluated_on"]["skipped_files"] == 10 - examples
