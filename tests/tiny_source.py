"""A tiny in-memory source of decoded examples (image i encodes i) and a fixed split, for the
loader and member-data tests."""

from __future__ import annotations

import numpy as np

from data_pipeline.preprocess import PreprocessConfig

SIZE = 16
PRE = PreprocessConfig(image_size=SIZE, channels=1, normalization="unit")


class TinySource:
    """In-memory random-access source of n decoded examples; image i encodes i."""

    def __init__(self, n: int = 40):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        yy, xx = np.mgrid[:24, :24]
        image = ((xx * 7 + yy * 3 + i * 5) % 256).astype(np.uint8)[..., None]
        return {"image": image, "label": i % 4, "patient_id": f"p{i // 2}", "path": f"{i}.png"}

    def __repr__(self) -> str:
        return f"TinySource(n={self.n})"


SOURCE = TinySource()
SPLIT = np.array([3, 5, 8, 13, 21, 22, 30, 31, 34, 39])
