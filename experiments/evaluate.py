"""`python -m experiments.evaluate --run RUN_DIR --dataset NAME --data-dir PATH [--out DIR]`:
evaluate a saved ensemble, stack or single model on another dataset (cross-dataset evaluation).

Every image of the dataset is test data. Classes are matched by canonical name: examples of
a class the model does not know are left out of the metrics (counted, and where the model
put them is reported); classes the model knows but the data lacks get no recall / ROC-AUC.
Both lists are written into the report. A stack run runs each component with its own
preprocessing and decides by the meta-classifier (--meta is implied).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from data_pipeline.datasets import DATASETS, load_dataset
from ensembles.bundle import Bundle, BundleError, StackBundle, load_bundle
from ensembles.evaluation import evaluate_predictions, write_report


def match_classes(model_classes, data_classes) -> dict:
    """Data label -> model label for shared canonical names, plus what each side lacks."""
    mapping = {d: model_classes.index(c) for d, c in enumerate(data_classes)
               if c in model_classes}
    return {"mapping": mapping,
            "model_lacks": [c for c in data_classes if c not in model_classes],
            "data_lacks": [c for c in model_classes if c not in data_classes]}


def evaluate_run(bundle: Bundle | StackBundle, dataset, *, batch_size: int = 32,
                 use_meta: bool = False, seed: int = 0) -> tuple[dict, np.ndarray, np.ndarray]:
    """Metrics of `bundle` on every example of `dataset` whose class the model knows."""
    match = match_classes(list(bundle.class_names), list(dataset.class_names))
    if not match["mapping"]:
        raise ValueError(f"no class in common: model {list(bundle.class_names)}, data "
                         f"{list(dataset.class_names)}")
    p = bundle.predict(dataset.source, np.arange(len(dataset.source)), batch_size=batch_size,
                       use_meta=use_meta)
    proba, pred, labels, indices = p.proba, p.decisions, p.labels, p.indices
    known = np.isin(labels, list(match["mapping"]))
    unknown = {}
    for d, name in enumerate(dataset.class_names):
        if d not in match["mapping"] and np.any(labels == d):
            counts = np.bincount(pred[labels == d], minlength=len(bundle.class_names))
            unknown[name] = {"count": int(np.sum(labels == d)),
                             "predicted_as": dict(zip(bundle.class_names, counts.tolist()))}
    if not known.any():
        raise ValueError("no example of a class the model knows")
    y = np.array([match["mapping"][int(d)] for d in labels[known]])
    metrics = evaluate_predictions(y, proba[known], bundle.class_names,
                                   patient_ids=dataset.patient_ids[indices[known]], seed=seed,
                                   y_pred=pred[known])
    metrics["cross_dataset"] = {"dataset": dataset.name, "run": str(bundle.run_dir),
                                "model_lacks": match["model_lacks"],
                                "data_lacks": match["data_lacks"],
                                "excluded_examples": unknown,
                                "skipped_files": len(dataset.skipped)}
    return metrics, y, proba[known]


def _section(cross: dict) -> str:
    lines = [f"Model: `{cross['run']}`; data: {cross['dataset']} (every image is test data).",
             f"- classes the model lacks (left out of the metrics): "
             f"{', '.join(cross['model_lacks']) or 'none'}",
             f"- classes the data lacks (no recall / ROC-AUC): "
             f"{', '.join(cross['data_lacks']) or 'none'}",
             f"- unreadable files skipped while building the dataset: {cross['skipped_files']}"]
    for name, e in cross["excluded_examples"].items():
        lines.append(f"- {e['count']} `{name}` images predicted as: "
                     + ", ".join(f"{k} {v}" for k, v in e["predicted_as"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory (ensemble, stack or single)")
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--out", default=None, help="report folder (default RUN/eval-<dataset>)")
    parser.add_argument("--meta", action="store_true", help="use the saved meta-classifier")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    try:
        bundle = load_bundle(args.run)
        dataset = load_dataset(args.dataset, data_dir=args.data_dir, cache_dir=args.cache_dir)
        metrics, y, proba = evaluate_run(bundle, dataset, batch_size=args.batch_size,
                                         use_meta=args.meta)
    except (ValueError, FileNotFoundError, BundleError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.run) / f"eval-{args.dataset}"
    out.mkdir(parents=True, exist_ok=True)
    write_report(metrics, out, y_true=y, proba=proba,
                 title=f"{Path(args.run).name} evaluated on {args.dataset}",
                 extra_sections={"Cross-dataset matching": _section(metrics["cross_dataset"])})
    print(json.dumps({k: metrics[k] for k in ("accuracy", "macro_f1", "roc_auc_macro")}))
    print(f"report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
