"""The BRISQUE quality filter of a run: which examples `quality_max` / `quality_drop_worst`
drop before the splits are made, and how the run reports them (metrics.json, report.md).

Filtering happens before splitting, over the whole dataset (as the study that used it did):
the dropped images are in no split, and the splits are drawn from the rest.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from data_pipeline.datasets import Dataset
from data_pipeline.quality import quality_filter, score_dataset
from ensembles.config import DataConfig


def select(dataset: Dataset, config: DataConfig, *, progress: bool = True
           ) -> tuple[np.ndarray, dict[str, Any]]:
    """(indices kept, the report) for `config`'s quality settings. Without any, every index
    is kept and nothing is scored; with one, every image is scored (cached per build)."""
    every = np.arange(len(dataset.labels))
    report: dict[str, Any] = {"quality_max": config.quality_max,
                              "drop_worst": config.quality_drop_worst, "count": 0, "files": []}
    if config.quality_max is None and config.quality_drop_worst is None:
        return every, report
    scores = score_dataset(dataset, progress=progress)
    keep = quality_filter(scores, quality_max=config.quality_max,
                          drop_worst=config.quality_drop_worst)
    dropped = np.flatnonzero(~keep)
    dropped = dropped[np.argsort(-np.nan_to_num(scores[dropped], nan=np.inf), kind="stable")]
    report["files"] = [{"path": str(dataset.paths[i]),
                        "class": dataset.class_names[dataset.labels[i]],
                        "brisque": None if math.isnan(scores[i]) else round(float(scores[i]), 3)}
                       for i in dropped]
    report["count"] = len(dropped)
    report["kept"] = int(keep.sum())
    return every[keep], report


def section(report: dict[str, Any], shown: int = 50) -> str:
    """Markdown: the filter's settings and the files it dropped, worst first."""
    rules = [f"BRISQUE > {report['quality_max']}" if report["quality_max"] is not None else "",
             f"the worst {report['drop_worst']:.1%}" if report["drop_worst"] is not None else ""]
    if not any(rules):
        return "None: no quality filter (--quality-max / --quality-drop-worst) was set."
    lines = [f"{report['count']} images dropped before splitting "
             f"({' and '.join(r for r in rules if r)}; {report['kept']} kept), worst first:"]
    lines += [f"- `{f['path']}` ({f['class']}): BRISQUE "
              f"{'n/a (flat image)' if f['brisque'] is None else f['brisque']}"
              for f in report["files"][:shown]]
    if report["count"] > shown:
        lines.append(f"- ... and {report['count'] - shown} more (metrics.json lists all)")
    return "\n".join(lines)
