"""Helpers for per-example fields computed once per dataset build (hashes, quality scores):
reading examples in batches, and saving the cached arrays whole or not at all."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.atomic import atomic_write

CHUNK = 256        # examples read per `__getitems__` call


def get_examples(source, indices: Sequence[int]) -> list[dict[str, Any]]:
    """source[i] for each index: one batched `__getitems__` read where the source has it."""
    indices = [int(i) for i in indices]
    if hasattr(source, "__getitems__"):
        return source.__getitems__(indices)
    return [source[i] for i in indices]


def chunks(source, rows: np.ndarray, chunk: int = CHUNK
           ) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """(offset into rows, the examples source[rows[offset:offset + chunk]]) in order."""
    for start in range(0, len(rows), chunk):
        yield start, get_examples(source, rows[start:start + chunk])


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """np.savez into `path` (its folder created), whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as fh:
        np.savez(fh, **arrays)
