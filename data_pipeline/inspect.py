"""Build a dataset and describe it: `python -m data_pipeline.inspect --dataset NAME [...]`.

Prints class counts, source split sizes, patient count and skipped files (or one JSON object
with --json), and optionally writes a sample grid. Errors print `error: <message>` to stderr
and exit with code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.datasets import DATASETS, Dataset, load_dataset


def summarize(ds: Dataset) -> dict[str, Any]:
    """Counts per class (canonical names, in label order), per source split, patients, skips."""
    counts = np.bincount(ds.labels, minlength=len(ds.class_names))
    known = ds.patient_ids[ds.patient_ids != ""]
    return {
        "dataset": ds.name,
        "classes": {name: int(n) for name, n in zip(ds.class_names, counts)},
        "num_examples": len(ds),
        "source_splits": dict(sorted(Counter(s or "none" for s in ds.source_splits).items())),
        "num_patients": len(set(known.tolist())),
        "examples_without_patient_id": int(len(ds) - len(known)),
        "has_masks": ds.has_masks,
        "skipped": ds.skipped,
        "build_dir": str(ds.build_dir),
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The human-readable report."""
    masks = "yes" if summary["has_masks"] else "no"
    lines = [f"dataset {summary['dataset']}: {summary['num_examples']} examples (masks: {masks})",
             "classes:"]
    lines += [f"  {k:<22}{v:>8}" for k, v in summary["classes"].items()]
    lines.append("source splits:")
    lines += [f"  {k:<22}{v:>8}" for k, v in summary["source_splits"].items()]
    lines.append(f"patients: {summary['num_patients']} "
                 f"({summary['examples_without_patient_id']} examples without an id)")
    lines.append(f"skipped: {len(summary['skipped'])}")
    lines += [f"  {s['path']}: {s['reason']}" for s in summary["skipped"]]
    lines.append(f"built in: {summary['build_dir']}")
    return "\n".join(lines)


def save_grid(ds: Dataset, path: str | Path, *, per_class: int = 4, seed: int = 0) -> Path:
    """Write a PNG grid: one row per class, up to `per_class` random images each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    rows = len(ds.class_names)
    fig, axes = plt.subplots(rows, per_class, figsize=(2 * per_class, 2 * rows), squeeze=False)
    for k, name in enumerate(ds.class_names):
        members = np.flatnonzero(ds.labels == k)
        picks = rng.choice(members, size=min(per_class, len(members)), replace=False)
        for j, ax in enumerate(axes[k]):
            ax.axis("off")
            if j < len(picks):
                ax.imshow(ds.source[int(picks[j])]["image"][..., 0], cmap="gray", vmin=0, vmax=255)
        axes[k][0].set_title(name, loc="left", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.inspect", description=__doc__)
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--data-dir", help="source folder (not needed for synthetic_cxr)")
    p.add_argument("--classes", help="comma-separated canonical classes to keep, in order")
    p.add_argument("--cache-dir", help="where built datasets live (default: ~/.cache/...)")
    p.add_argument("--num-classes", type=int, choices=(2, 3),
                   help="chest_xray_pneumonia: 2 (normal/pneumonia) or 3 (default)")
    p.add_argument("--keep-lateral", action="store_true",
                   help="folder sources: read DICOM lateral views too (skipped by default)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--grid", metavar="FILE.png", help="write a sample grid image")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    options = {"num_classes": args.num_classes} if args.num_classes else {}
    if args.keep_lateral:
        options["skip_lateral"] = False
    classes = [c for c in args.classes.split(",") if c.strip()] if args.classes else None
    try:
        with contextlib.redirect_stdout(sys.stderr):  # TFDS build chatter; stdout stays clean
            ds = load_dataset(args.dataset, data_dir=args.data_dir, classes=classes,
                              cache_dir=args.cache_dir, **options)
        summary = summarize(ds)
        if args.grid:
            summary["grid"] = str(save_grid(ds, args.grid))
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
