"""The BRISQUE quality filter: which examples `quality_max` / `quality_drop_worst` drop, and
how a report lists them (metrics.json, report.md).

A training run filters before splitting, over the whole dataset (as the study that used it
did): the dropped images are in no split, and the splits are drawn from the rest.
`experiments.evaluate` filters the evaluated images the same way before assessing them, and
`experiments.predict` skips each decoded image above `quality_max` (`QualityGate`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from data_pipeline.datasets import Dataset
from data_pipeline.image_source import DataError
from data_pipeline.quality import brisque, quality_filter, score_dataset


def filter_indices(dataset: Dataset, indices: np.ndarray, *, quality_max: float | None = None,
                   drop_worst: float | None = None, progress: bool = True
                   ) -> tuple[np.ndarray, dict[str, Any]]:
    """(the `indices` kept, the report): `quality_filter` over the BRISQUE scores of
    dataset.source[indices] (`drop_worst` a fraction of them). Without a setting every index
    is kept and nothing is scored; with one, the images are scored (cached per build).
    DataError for a setting that cannot filter, before anything is scored."""
    indices = np.asarray(indices, np.int64)
    report: dict[str, Any] = {"quality_max": quality_max, "drop_worst": drop_worst, "count": 0,
                              "files": []}
    if quality_max is None and drop_worst is None:
        return indices, report
    if quality_max is not None and not math.isfinite(quality_max):
        raise DataError(f"quality_max must be a finite BRISQUE score; got {quality_max}")
    if drop_worst is not None and not 0 <= drop_worst < 1:
        raise DataError(f"quality_drop_worst must be in [0, 1); got {drop_worst}")
    scores = score_dataset(dataset, indices, progress=progress)
    keep = quality_filter(scores, quality_max=quality_max, drop_worst=drop_worst)
    dropped = np.flatnonzero(~keep)
    dropped = dropped[np.argsort(-np.nan_to_num(scores[dropped], nan=np.inf), kind="stable")]
    report["files"] = [{"path": str(dataset.paths[indices[r]]),
                        "class": dataset.class_names[dataset.labels[indices[r]]],
                        "brisque": None if math.isnan(scores[r]) else round(float(scores[r]), 3)}
                       for r in dropped]
    report["count"] = len(dropped)
    report["kept"] = int(keep.sum())
    return indices[keep], report


def section(report: dict[str, Any], shown: int = 50, when: str = "before splitting") -> str:
    """Markdown: the filter's settings and the files it dropped (`when`), worst first."""
    rules = [f"BRISQUE > {report['quality_max']}" if report["quality_max"] is not None else "",
             f"the worst {report['drop_worst']:.1%}" if report["drop_worst"] is not None else ""]
    if not any(rules):
        return "None: no quality filter (--quality-max / --quality-drop-worst) was set."
    lines = [f"{report['count']} images dropped {when} "
             f"({' and '.join(r for r in rules if r)}; {report['kept']} kept), worst first:"]
    lines += [f"- `{f['path']}` ({f['class']}): BRISQUE "
              f"{'n/a (flat image)' if f['brisque'] is None else f['brisque']}"
              for f in report["files"][:shown]]
    if report["count"] > shown:
        lines.append(f"- ... and {report['count'] - shown} more (metrics.json lists all)")
    return "\n".join(lines)


class QualityGate:
    """predict's `--quality-max`: scores each decoded image it is shown and refuses those above
    `quality_max` (or without a score: a flat image counts as the worst, as in
    `quality_filter`) with a skip reason; `scores` holds those of the images let through."""

    def __init__(self, quality_max: float):
        if not math.isfinite(quality_max):
            raise DataError(f"quality_max must be a finite BRISQUE score; got {quality_max}")
        self.quality_max = quality_max
        self.scores: list[float] = []
        self.refused = 0

    def __call__(self, image: np.ndarray) -> str | None:
        """None when `image` passes (its score kept), else the reason it is skipped."""
        score = brisque(image)
        if quality_filter(np.array([score]), quality_max=self.quality_max)[0]:
            self.scores.append(score)
            return None
        self.refused += 1
        shown = "n/a (flat image)" if math.isnan(score) else f"{score:.3f}"
        return f"quality: BRISQUE {shown} > {self.quality_max:g}"
