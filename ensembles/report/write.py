"""Writing a run's report: metrics.json, report.md, the confusion / ROC / reliability plots and
report.html. In a multi-process run only process 0 calls it."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn import metrics as skm

from data_pipeline.atomic import atomic_write
from ensembles.combine.calibration import DEFAULT_BINS, reliability_bins
from ensembles.evaluate.metrics import check_predictions
from ensembles.report.html import Tile, write_html
from ensembles.report.markdown import report_markdown


def _plot_confusion(cm: np.ndarray, names: Sequence[str], path: Path) -> None:
    fig = Figure(figsize=(1.4 * len(names) + 2, 1.2 * len(names) + 1.5))
    ax = fig.add_subplot()
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center",
                color="white" if v > cm.max() / 2 else "black")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=120)


def _plot_roc(y: np.ndarray, proba: np.ndarray, metrics: Mapping, path: Path) -> None:
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    for c, name in enumerate(metrics["class_names"]):
        auc = metrics["per_class"][name]["roc_auc"]
        if auc is None:
            continue
        fpr, tpr, _ = skm.roc_curve(y == c, proba[:, c])
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title("One-vs-rest ROC")
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=120)


def _plot_reliability(y: np.ndarray, proba: np.ndarray, ece: float, path: Path) -> None:
    bins = reliability_bins(y, proba, DEFAULT_BINS)
    edges, width = bins["edges"][:-1], 1.0 / DEFAULT_BINS
    filled = bins["count"] > 0
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    ax.bar(edges[filled], bins["accuracy"][filled], width=width, align="edge",
           edgecolor="black", label="accuracy")
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (max probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability diagram (ECE {ece:.4f})")
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=120)


def _json_default(x):
    """Plain Python numbers for numpy values that callers may add to the metrics."""
    if isinstance(x, (np.generic, np.ndarray)):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def write_report(metrics: Mapping, out_dir, *, y_true, proba, title: str,
                 extra_sections: Mapping[str, str] | None = None,
                 tiles: Sequence[Tile] = (), gallery_note: str = "") -> dict[str, Path]:
    """Write metrics.json, report.md, confusion.png, roc.png, reliability.png and
    report.html (the same report with its figures and the `tiles` gallery) into out_dir.

    `metrics` is evaluate_predictions' output for the same y_true / proba. Returns the paths.
    """
    y, p, _ = check_predictions(y_true, proba, metrics["class_names"], None)
    out = Path(out_dir)
    paths = {name: out / name for name in
             ("metrics.json", "report.md", "confusion.png", "roc.png", "reliability.png",
              "report.html")}
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(paths["metrics.json"]) as fh:
        fh.write(json.dumps(metrics, indent=2, allow_nan=False, default=_json_default) + "\n")
    text = report_markdown(metrics, title, extra_sections)
    with atomic_write(paths["report.md"]) as fh:
        fh.write(text)
    _plot_confusion(np.asarray(metrics["confusion_matrix"]), metrics["class_names"],
                    paths["confusion.png"])
    _plot_roc(y, p, metrics, paths["roc.png"])
    _plot_reliability(y, p, metrics["ece"], paths["reliability.png"])
    write_html(out, text, title=title, tiles=tiles, gallery_note=gallery_note)
    return paths
