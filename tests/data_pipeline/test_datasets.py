"""load_dataset over every layout: counts, labels, masks, patient ids, selection, cache, CLI."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from folder_fixtures import (
    KERMANY_FILES,
    make_flat,
    make_kaggle_v4,
    make_kermany,
    write_image,
    write_manifest,
)
from PIL import Image

from data_pipeline import builders, layouts
from data_pipeline import inspect as inspect_cli
from data_pipeline.datasets import DATASETS, load_dataset


def _counts(ds) -> dict[str, int]:
    return {name: int((ds.labels == k).sum()) for k, name in enumerate(ds.class_names)}


def test_dataset_names():
    assert DATASETS == ("synthetic_cxr", "covid19_radiography", "chest_xray_pneumonia",
                        "image_folder")


def test_kaggle_v4_masks_manifest_and_source(tmp_path):
    root = make_kaggle_v4(tmp_path / "v4", {"COVID": 3, "Normal": 2, "Viral Pneumonia": 2,
                                            "Lung_Opacity": 1},
                          masks=["COVID", "Normal", "Viral Pneumonia", "Lung_Opacity"])
    write_manifest(root, [("COVID/images/COVID-1.png", "COVID", "p-a"),
                          ("Normal-2.png", "Normal", "p-b")])  # full path and bare name
    ds = load_dataset("covid19_radiography", data_dir=root, cache_dir=tmp_path / "cache")
    assert ds.class_names == ("covid", "normal", "viral_pneumonia", "lung_opacity")
    assert _counts(ds) == {"covid": 3, "normal": 2, "viral_pneumonia": 2, "lung_opacity": 1}
    assert ds.has_masks and ds.skipped == []
    pid = dict(zip(ds.paths, ds.patient_ids))
    assert pid["COVID/images/COVID-1.png"] == "p-a"
    assert pid["Normal/images/Normal-2.png"] == "p-b"
    assert pid["COVID/images/COVID-2.png"] == ""
    for i in range(len(ds.source)):
        ex = ds.source[i]
        assert ex["label"] == ds.labels[i] and ex["path"] == ds.paths[i]
        assert isinstance(ex["patient_id"], str)
        original = np.asarray(Image.open(root / ex["path"]))
        np.testing.assert_array_equal(ex["image"][..., 0], original)
        # 12x12 mask (left half lung) resized to the 20x20 image by nearest neighbour
        assert ex["mask"].shape == (20, 20, 1) and set(np.unique(ex["mask"])) == {0, 255}
        assert ex["mask"][:, :9].min() == 255 and ex["mask"][:, 11:].max() == 0


def test_masks_dropped_unless_every_selected_class_has_them(tmp_path):
    root = make_kaggle_v4(tmp_path / "v4", {"COVID": 2, "Normal": 2}, masks=["COVID"])
    ds = load_dataset("covid19_radiography", data_dir=root, cache_dir=tmp_path / "c")
    assert not ds.has_masks and "mask" not in ds.source[0]
    covid_only = load_dataset("covid19_radiography", data_dir=root, cache_dir=tmp_path / "c",
                              classes=["covid"])
    assert covid_only.has_masks and covid_only.source[0]["mask"].shape == (20, 20, 1)


def test_kaggle_v1_flat_and_bacterial_folder(tmp_path):
    root = make_flat(tmp_path / "v1", {"COVID-19": 2, "NORMAL": 3, "Viral Pneumonia": 1,
                                       "Bacterial Pneumonia": 2})
    ds = load_dataset("covid19_radiography", data_dir=root, cache_dir=tmp_path / "c")
    assert _counts(ds) == {"covid": 2, "normal": 3, "viral_pneumonia": 1,
                           "bacterial_pneumonia": 2}
    assert not ds.has_masks
    assert sorted(set(ds.paths[ds.labels == 0])) == ["COVID-19/img0.png", "COVID-19/img1.png"]


@pytest.mark.parametrize("point_at_parent", [True, False])
def test_kermany_three_classes(tmp_path, point_at_parent):
    base = make_kermany(tmp_path / "k")
    data_dir = base.parent if point_at_parent else base
    ds = load_dataset("chest_xray_pneumonia", data_dir=data_dir, cache_dir=tmp_path / "c")
    assert ds.class_names == ("normal", "viral_pneumonia", "bacterial_pneumonia")
    assert _counts(ds) == {"normal": 5, "viral_pneumonia": 3, "bacterial_pneumonia": 4}
    splits = {s: int((ds.source_splits == s).sum()) for s in ("train", "test", "val")}
    assert splits == {s: sum(len(v) for (sp, _), v in KERMANY_FILES.items() if sp == s)
                      for s in splits}
    prefix = "chest_xray/" if point_at_parent else ""
    pid = dict(zip(ds.paths, ds.patient_ids))
    assert pid[f"{prefix}train/PNEUMONIA/person1_virus_6.jpeg"] == "kermany-person1"
    assert pid[f"{prefix}train/PNEUMONIA/person1_bacteria_1.jpeg"] == "kermany-person1"
    assert pid[f"{prefix}train/NORMAL/NORMAL2-IM-1427-0001.jpeg"] == "kermany-normal-IM1427"
    k = ds.class_names.index("viral_pneumonia")
    assert all("_virus_" in p for p in ds.paths[ds.labels == k])


def test_kermany_two_classes(tmp_path):
    base = make_kermany(tmp_path / "k")
    ds = load_dataset("chest_xray_pneumonia", data_dir=base, cache_dir=tmp_path / "c",
                      num_classes=2)
    assert _counts(ds) == {"normal": 5, "pneumonia": 7}


@pytest.mark.parametrize("name, expected", [
    ("person1011_bacteria_2942.jpeg", "kermany-person1011"),
    ("person7_virus_17.jpeg", "kermany-person7"),
    ("IM-0115-0001.jpeg", "kermany-normal-IM115"),
    ("NORMAL2-IM-0393-0001.jpeg", "kermany-normal-IM393"),
    ("scan.jpeg", ""),
])
def test_kermany_patient_id(name, expected):
    assert layouts.kermany_patient_id(name) == expected


def test_image_folder_harmonises_and_selects(tmp_path):
    root = make_flat(tmp_path / "f", {"covid-19": 2, "Healthy": 3, "viral": 1, "bacteria": 2},
                     ext="jpg")
    write_manifest(root, [("img0.jpg", "?", "shared-name")])
    ds = load_dataset("image_folder", data_dir=root, cache_dir=tmp_path / "c")
    assert _counts(ds) == {"covid": 2, "normal": 3, "viral_pneumonia": 1,
                           "bacterial_pneumonia": 2}
    assert (ds.patient_ids == "shared-name").sum() == 4  # bare name matches in every folder
    picked = load_dataset("image_folder", data_dir=root, cache_dir=tmp_path / "c",
                          classes=["normal", "covid"])
    assert picked.class_names == ("normal", "covid")
    assert _counts(picked) == {"normal": 3, "covid": 2}
    assert all(p.startswith("Healthy/") for p in picked.paths[picked.labels == 0])
    with pytest.raises(ValueError, match="lung_opacity not in this dataset"):
        load_dataset("image_folder", data_dir=root, cache_dir=tmp_path / "c",
                     classes=["lung_opacity"])


def test_synthetic_builder(tmp_path):
    ds = load_dataset("synthetic_cxr", cache_dir=tmp_path, count=8, image_size=32, seed=3)
    assert ds.class_names == ("covid", "normal", "viral_pneumonia", "bacterial_pneumonia")
    assert _counts(ds) == {c: 2 for c in ds.class_names}
    ex = ds.source[5]
    assert ex["image"].shape == (32, 32, 1) and ex["mask"].shape == (32, 32, 1)
    assert ex["label"] == ds.labels[5] and ex["patient_id"] == ds.patient_ids[5] != ""
    two = load_dataset("synthetic_cxr", cache_dir=tmp_path, count=4, image_size=16,
                       classes=["normal", "covid"])
    assert two.class_names == ("normal", "covid") and _counts(two) == {"normal": 2, "covid": 2}


def test_source_pickles_for_grain_workers(tmp_path):
    root = make_flat(tmp_path / "f", {"COVID": 2, "Normal": 1})
    ds = load_dataset("image_folder", data_dir=root, cache_dir=tmp_path / "c")
    clone = pickle.loads(pickle.dumps(ds.source))
    assert len(clone) == 3
    np.testing.assert_array_equal(clone[2]["image"], ds.source[2]["image"])
    assert [e["label"] for e in ds.source.__getitems__([0, 2])] == [0, 1]


def test_cache_hit_then_rebuild_on_change(tmp_path, monkeypatch):
    root = make_flat(tmp_path / "f", {"COVID": 2, "Normal": 2})
    first = load_dataset("image_folder", data_dir=root, cache_dir=tmp_path / "c")

    def no_rebuild(self):
        raise AssertionError("a cached dataset was rebuilt")

    monkeypatch.setattr(builders.ImageFolder, "_examples", no_rebuild)
    again = load_dataset("image_folder", data_dir=root, cache_dir=tmp_path / "c")
    assert again.build_dir == first.build_dir and len(again) == 4
    monkeypatch.undo()
    write_image(root / "Normal" / "new.png")
    changed = load_dataset("image_folder", data_dir=root, cache_dir=tmp_path / "c")
    assert changed.build_dir != first.build_dir and _counts(changed) == {"covid": 2, "normal": 3}


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_ENSEMBLES_CACHE", str(tmp_path / "env-cache"))
    root = make_flat(tmp_path / "f", {"COVID": 1, "Normal": 1})
    ds = load_dataset("image_folder", data_dir=root)
    assert ds.build_dir.is_relative_to(tmp_path / "env-cache")


def test_interrupted_build_is_not_reused(tmp_path, monkeypatch):
    root = make_flat(tmp_path / "f", {"COVID": 3, "Normal": 3})
    calls = {"n": 0}
    real_decode = builders.decode_for_storage

    def crash_on_fourth(path, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # like Ctrl-C half-way through the build
        return real_decode(path, **kwargs)

    monkeypatch.setattr(builders, "decode_for_storage", crash_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        load_dataset("image_folder", data_dir=root, cache_dir=tmp_path / "c")
    assert not list((tmp_path / "c").rglob("dataset_info.json"))
    monkeypatch.undo()
    ds = load_dataset("image_folder", data_dir=root, cache_dir=tmp_path / "c")
    assert len(ds) == 6 and len(list((tmp_path / "c").rglob("dataset_info.json"))) == 1


def test_unknown_dataset_and_option(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="unknown option.*num_classes for image_folder"):
        load_dataset("image_folder", data_dir=tmp_path, num_classes=3)
    with pytest.raises(ValueError, match="num_classes must be 2 or 3"):
        load_dataset("chest_xray_pneumonia", data_dir=make_kermany(tmp_path / "k"),
                     cache_dir=tmp_path / "c", num_classes=4)


def test_cli_json_and_grid(tmp_path, capsys):
    root = make_kermany(tmp_path / "k")
    grid = tmp_path / "grid.png"
    rc = inspect_cli.main(["--dataset", "chest_xray_pneumonia", "--data-dir", str(root),
                           "--cache-dir", str(tmp_path / "c"), "--classes",
                           "bacterial_pneumonia,normal", "--json", "--grid", str(grid)])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dataset"] == "chest_xray_pneumonia"
    assert out["classes"] == {"bacterial_pneumonia": 4, "normal": 5}
    assert out["num_examples"] == 9 and out["skipped"] == []
    assert out["source_splits"] == {"test": 2, "train": 5, "val": 2}
    assert out["num_patients"] == 9  # persons 1, 2, 100, 200 and five normal IM numbers
    with Image.open(grid) as img:
        assert img.size[0] > 100 and img.size[1] > 100


def test_cli_text_report(tmp_path, capsys):
    root = make_flat(tmp_path / "f", {"COVID": 2, "Normal": 1})
    assert inspect_cli.main(["--dataset", "image_folder", "--data-dir", str(root),
                             "--cache-dir", str(tmp_path / "c")]) == 0
    text = capsys.readouterr().out
    assert "3 examples" in text and "skipped: 0" in text
    assert any(line.split() == ["covid", "2"] for line in text.splitlines())


def test_cache_inside_the_data_folder_still_hits(tmp_path, monkeypatch):
    root = make_flat(tmp_path / "f", {"COVID": 1, "Normal": 1})
    first = load_dataset("image_folder", data_dir=root, cache_dir=root / ".cache",
                         classes="normal,covid")  # one comma-separated string works too
    assert first.class_names == ("normal", "covid")
    monkeypatch.setattr(builders.ImageFolder, "_examples", lambda self: 1 / 0)
    again = load_dataset("image_folder", data_dir=root, cache_dir=root / ".cache",
                         classes=["normal", "covid"])
    assert again.build_dir == first.build_dir


def test_progress_false_silences_the_tfds_build_bars(tmp_path, capfd):
    load_dataset("synthetic_cxr", cache_dir=tmp_path / "quiet", count=4, image_size=16,
                 progress=False)
    assert "Generating splits" not in capfd.readouterr().err
    # the switch is tfds's global one: it is back on for the next build
    load_dataset("synthetic_cxr", cache_dir=tmp_path / "loud", count=4, image_size=16)
    assert "Generating splits" in capfd.readouterr().err
