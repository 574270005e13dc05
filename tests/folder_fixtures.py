"""Write tiny source folders (Kaggle v1/v4, Kermany, image_folder) with Pillow for the tests."""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, *, size: int = 16, value: int = 128, mode: str = "L",
                fmt: str | None = None) -> Path:
    """Write a flat image of `value` (a small gradient in the first row to make it non-constant)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    gray = np.full((size, size), value, np.uint8)
    gray[0] = np.linspace(0, 255, size).astype(np.uint8)
    img = Image.fromarray(gray)
    if mode != "L":
        img = img.convert(mode)
    img.save(path, format=fmt)
    return path


def write_mask(path: Path, size: int = 12) -> Path:
    """A lung-style mask: left half 255, right half 0, saved as RGB like Kaggle's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros((size, size), np.uint8)
    m[:, : size // 2] = 255
    Image.fromarray(m).convert("RGB").save(path)
    return path


def make_kaggle_v4(root: Path, counts: dict[str, int], *, masks: Iterable[str] = (),
                   size: int = 20, mask_size: int = 12) -> Path:
    """`<Class>/images/<Class>-<n>.png` (+ `masks/` for classes in `masks`)."""
    masks = set(masks)
    for folder, n in counts.items():
        (root / folder / "images").mkdir(parents=True, exist_ok=True)
        for i in range(1, n + 1):
            write_image(root / folder / "images" / f"{folder}-{i}.png", size=size, value=10 * i)
            if folder in masks:
                write_mask(root / folder / "masks" / f"{folder}-{i}.png", mask_size)
    return root


def make_flat(root: Path, counts: dict[str, int], *, ext: str = "png", size: int = 16) -> Path:
    """v1 / image_folder style `<Class>/<n>.<ext>`."""
    for folder, n in counts.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            write_image(root / folder / f"img{i}.{ext}", size=size, value=5 * i + 1)
    return root


def write_manifest(root: Path, rows: list[tuple[str, str, str]]) -> Path:
    """manifest.csv with columns file,label,patient_id."""
    with (root / "manifest.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "label", "patient_id"])
        w.writerows(rows)
    return root / "manifest.csv"


KERMANY_FILES = {
    ("train", "NORMAL"): ["IM-0115-0001.jpeg", "NORMAL2-IM-1427-0001.jpeg", "IM-0117-0001.jpeg"],
    ("train", "PNEUMONIA"): ["person1_bacteria_1.jpeg", "person1_virus_6.jpeg",
                             "person2_bacteria_3.jpeg", "person3_virus_7.jpeg"],
    ("test", "NORMAL"): ["IM-0001-0001.jpeg"],
    ("test", "PNEUMONIA"): ["person100_bacteria_5.jpeg", "person101_virus_9.jpeg"],
    ("val", "NORMAL"): ["NORMAL2-IM-1430-0001.jpeg"],
    ("val", "PNEUMONIA"): ["person200_bacteria_1.jpeg"],
}


def make_kermany(parent: Path) -> Path:
    """`parent/chest_xray/{train,test,val}/{NORMAL,PNEUMONIA}/` with Kermany-style names."""
    base = parent / "chest_xray"
    for (split, cls), names in KERMANY_FILES.items():
        for i, name in enumerate(names):
            write_image(base / split / cls / name, size=16, value=20 + i, fmt="JPEG")
    return base
