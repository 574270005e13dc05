"""Build a dataset and describe it: `python -m data_pipeline.inspect --dataset NAME [...]`.

Prints class counts, source split sizes, patient count and skipped files (or one JSON object
with --json), and optionally writes a sample grid. Errors print `error: <message>` to stderr
and exit with code 2.

Duplicates (data_pipeline.hashing: exact = same pixels, near = perceptual hash within
--max-distance bits): the same image twice in the dataset under two classes, and with
`--against B [--against-data-dir DIR]` every image of the dataset that is also in B (public
chest X-ray collections copy each other: a model trained on one and tested on the other is
partly tested on its training images).

Image quality (data_pipeline.quality, BRISQUE: about 0 pristine, higher = more distorted;
scored once per build and cached): `--quality` prints each class's score quantiles,
`--quality-hist FILE.png` draws their histograms per class, `--worst-grid FILE.png` shows the
worst-scored images of each class with their scores (candidates for --quality-max).
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
from data_pipeline.hashing import (
    MAX_DISTANCE,
    duplicate_pairs,
    find_duplicates,
    hash_dataset,
)
from data_pipeline.quality import score_dataset

SHOWN = 50   # duplicates listed in the text report (--json lists all)


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


def _pair(ds: Dataset, i: int) -> tuple[str, str]:
    return str(ds.paths[i]), ds.class_names[ds.labels[i]]


def duplicates(ds: Dataset, against: Dataset | None = None, *,
               max_distance: int = MAX_DISTANCE, progress: bool = True) -> dict[str, Any]:
    """Duplicates within `ds` (all pairs, and those under two classes, listed) and, with
    `against`, each image of `ds` that duplicates one of `against` (listed, with both
    classes). Hashes come from `hash_dataset` (cached per build)."""
    hashes = {name: hash_dataset(d, progress=progress) for name, d in
              (("dataset", ds), ("against", against)) if d is not None}
    out: dict[str, Any] = {"max_distance": max_distance, "within": []}
    for name, d in (("dataset", ds), ("against", against)):
        if d is None:
            continue
        pairs = duplicate_pairs(hashes[name], max_distance=max_distance)
        cross = [dict(zip(("path", "class", "other_path", "other_class"),
                          (*_pair(d, i), *_pair(d, j)), strict=True),
                      kind="exact" if e else "near", distance=int(dist))
                 for i, j, dist, e in zip(pairs.query, pairs.reference, pairs.distance,
                                          pairs.exact, strict=True)
                 if d.labels[i] != d.labels[j]]
        out["within"].append({"of": name, "dataset": d.name, "examples": len(d),
                              "pairs": len(pairs),
                              "exact": int(pairs.exact.sum()),
                              "near": int((~pairs.exact).sum()), "cross_class": cross})
    if against is not None:
        m = find_duplicates(hashes["dataset"], hashes["against"], max_distance=max_distance)
        listed = [dict(zip(("path", "class", "other_path", "other_class"),
                           (*_pair(ds, i), *_pair(against, j)), strict=True),
                       kind="exact" if e else "near", distance=int(dist))
                  for i, j, dist, e in zip(m.query, m.reference, m.distance, m.exact,
                                           strict=True)]
        out["against"] = {"dataset": against.name, "examples": len(against),
                          "duplicated": len(m), "exact": int(m.exact.sum()),
                          "near": int((~m.exact).sum()),
                          "other_class": sum(d["class"] != d["other_class"] for d in listed),
                          "matches": listed}
    return out


def format_duplicates(report: dict[str, Any], shown: int = SHOWN) -> str:
    """The duplicates part of the human-readable report."""
    lines = [f"duplicates (exact: same pixels; near: perceptual hash within "
             f"{report['max_distance']} of 256 bits):"]

    def table(rows: list[dict]) -> None:
        for d in rows[:shown]:
            kind = "exact" if d["kind"] == "exact" else f"near:{d['distance']}"
            lines.append(f"    {kind:<8} {d['path']} ({d['class']})  =  {d['other_path']} "
                         f"({d['other_class']})")
        if len(rows) > shown:
            lines.append(f"    ... and {len(rows) - shown} more (--json lists all)")

    for w in report["within"]:
        which = "--against " if w["of"] == "against" else ""
        lines.append(f"  within {which}{w['dataset']} ({w['examples']} images): {w['pairs']} "
                     f"duplicate pair(s) ({w['exact']} exact, {w['near']} near); "
                     f"{len(w['cross_class'])} under two classes")
        table(w["cross_class"])
    a = report.get("against")
    if a is not None:
        lines.append(f"  against {a['dataset']} ({a['examples']} images): {a['duplicated']} of "
                     f"this dataset's images are in it ({a['exact']} exact, {a['near']} near; "
                     f"{a['other_class']} under another class there)")
        table(a["matches"])
    return "\n".join(lines)


def quality(ds: Dataset, scores: np.ndarray, *, worst: int = 5) -> dict[str, Any]:
    """Per class: how many images, BRISQUE median, 90th percentile and maximum, how many
    have no score (flat images), and the `worst` highest-scored files (path, score)."""
    out = {}
    for k, name in enumerate(ds.class_names):
        members = np.flatnonzero(ds.labels == k)
        s = scores[members]
        known = s[~np.isnan(s)]
        order = members[np.argsort(-np.nan_to_num(s, nan=np.inf), kind="stable")][:worst]
        out[name] = {"count": len(members), "unscored": int(len(s) - len(known)),
                     **{q: (round(float(f(known)), 2) if len(known) else None) for q, f in
                        (("median", np.median), ("p90", lambda x: np.percentile(x, 90)),
                         ("max", np.max))},
                     "worst": [{"path": str(ds.paths[i]), "brisque": None if np.isnan(scores[i])
                                else round(float(scores[i]), 2)} for i in order]}
    return out


def format_quality(report: dict[str, Any]) -> str:
    """The quality part of the human-readable report: one line per class."""
    lines = ["BRISQUE (lower is better):"]
    for name, q in report.items():
        flat = f", {q['unscored']} flat (no score)" if q["unscored"] else ""
        lines.append(f"  {name:<22}median {q['median']}, p90 {q['p90']}, max {q['max']} "
                     f"({q['count']} images{flat})")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    _pyplot().close(fig)
    return path


def save_grid(ds: Dataset, path: str | Path, *, per_class: int = 4, seed: int = 0,
              scores: np.ndarray | None = None) -> Path:
    """Write a PNG grid: one row per class, up to `per_class` random images each; with
    `scores` (BRISQUE per example) the class's worst-scored images, each titled by its score."""
    plt = _pyplot()
    rng = np.random.default_rng(seed)
    rows = len(ds.class_names)
    fig, axes = plt.subplots(rows, per_class, figsize=(2 * per_class, 2 * rows), squeeze=False)
    for k, name in enumerate(ds.class_names):
        members = np.flatnonzero(ds.labels == k)
        if scores is None:
            picks = rng.choice(members, size=min(per_class, len(members)), replace=False)
        else:
            worst = np.nan_to_num(scores[members], nan=np.inf)
            picks = members[np.argsort(-worst, kind="stable")][:per_class]
        for j, ax in enumerate(axes[k]):
            ax.axis("off")
            if j < len(picks):
                ax.imshow(ds.source[int(picks[j])]["image"][..., 0], cmap="gray", vmin=0, vmax=255)
                if scores is not None:
                    ax.set_title(f"{scores[picks[j]]:.1f}", loc="right", fontsize=8)
        axes[k][0].set_title(name, loc="left", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def save_quality_histogram(ds: Dataset, scores: np.ndarray, path: str | Path) -> Path:
    """Write a PNG of the BRISQUE score histogram of each class (shared bins)."""
    plt = _pyplot()
    known = scores[~np.isnan(scores)]
    bins = np.histogram_bin_edges(known if len(known) else [0.0], bins=30)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k, name in enumerate(ds.class_names):
        s = scores[(ds.labels == k) & ~np.isnan(scores)]
        ax.hist(s, bins=bins, histtype="step", linewidth=1.5, label=f"{name} ({len(s)})")
    ax.set_xlabel("BRISQUE (lower is better)")
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


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
    p.add_argument("--against", choices=DATASETS,
                   help="also find this dataset's images in another dataset")
    p.add_argument("--against-data-dir", help="source folder of --against")
    p.add_argument("--max-distance", type=int, default=MAX_DISTANCE,
                   help=f"near-duplicate threshold, bits of the 256-bit perceptual hash "
                        f"(default {MAX_DISTANCE})")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--grid", metavar="FILE.png", help="write a sample grid image")
    p.add_argument("--quality", action="store_true",
                   help="BRISQUE quality per class (scored once per build, cached)")
    p.add_argument("--quality-hist", metavar="FILE.png",
                   help="write the per-class BRISQUE histograms (implies --quality)")
    p.add_argument("--worst-grid", metavar="FILE.png",
                   help="write a grid of each class's worst BRISQUE images (implies --quality)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    options = {"num_classes": args.num_classes} if args.num_classes else {}
    if args.keep_lateral:
        options["skip_lateral"] = False
    classes = [c for c in args.classes.split(",") if c.strip()] if args.classes else None
    try:
        if not 0 <= args.max_distance <= 256:
            raise ValueError(f"--max-distance must be in [0, 256], got {args.max_distance}")
        if args.against_data_dir and not args.against:
            raise ValueError("--against-data-dir needs --against")
        with contextlib.redirect_stdout(sys.stderr):  # TFDS build chatter; stdout stays clean
            ds = load_dataset(args.dataset, data_dir=args.data_dir, classes=classes,
                              cache_dir=args.cache_dir, **options)
            other = (load_dataset(args.against, data_dir=args.against_data_dir,
                                  cache_dir=args.cache_dir) if args.against else None)
        summary = summarize(ds)
        summary["duplicates"] = duplicates(ds, other, max_distance=args.max_distance)
        if args.grid:
            summary["grid"] = str(save_grid(ds, args.grid))
        if args.quality or args.quality_hist or args.worst_grid:
            scores = score_dataset(ds)
            summary["quality"] = quality(ds, scores)
            if args.quality_hist:
                summary["quality_hist"] = str(save_quality_histogram(ds, scores,
                                                                     args.quality_hist))
            if args.worst_grid:
                summary["worst_grid"] = str(save_grid(ds, args.worst_grid, scores=scores))
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = format_summary(summary) + "\n" + format_duplicates(summary["duplicates"])
    if "quality" in summary:
        text += "\n" + format_quality(summary["quality"])
    print(json.dumps(summary, indent=2) if args.json else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
