"""Stacking finished runs: a meta-classifier over the members of several runs, as a bundle.

The meta-classifier (ensembles.meta, logistic regression by default) is fitted on the members'
validation outputs only, with the leakage guard checking them against every run's training
indices, and evaluated on the shared test split. All runs must share the dataset split (same
data, --seed and --split-recipe): the example indices are checked and others refused.

The output folder is a self-contained stack bundle (ensembles/bundle.py): every stacked run's
bundle pieces are hard-linked (else copied) into components/<i>/, the meta-classifier is saved
beside them (meta.json, or meta.skops for gradient boosting), and `experiments.evaluate` /
`experiments.predict --run OUT` rebuild each component's member outputs with its own
preprocessing before applying the meta-classifier.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from ensembles import bundle as bundle_lib
from ensembles.meta import MetaClassifier, make_features
from ensembles.evaluation import evaluate_predictions, write_report


def load_outputs(run: Path) -> dict:
    """The held-out member outputs a run saved (outputs.npz), with its strategy/backbone."""
    path = Path(run) / "outputs.npz"
    if not path.is_file():
        raise ValueError(f"{run} has no outputs.npz: not an ensemble run of this project, or "
                         f"incomplete")
    config = json.loads((Path(run) / "config.json").read_text())
    z = dict(np.load(path))
    members = sorted(int(k.split("_")[-1]) for k in z if k.startswith("val_member_"))
    if not members:
        raise ValueError(f"{run} saved no member outputs (a stack run?): stack ensemble runs")
    if "config" not in config:
        raise ValueError(f"{run}/config.json holds no run config (a run of an older version "
                         f"of this project): retrain it to stack it")
    settings = config["config"]
    return {"name": f"{settings['ensemble']['strategy']}/{settings['model']['backbone']}",
            "backbone": settings["model"]["backbone"], **z,
            "val": [z[f"val_member_{m}"] for m in members],
            "test": [z[f"test_member_{m}"] for m in members]}


def check_compatible(outputs: list[dict]) -> None:
    """Same classes and the same validation / test examples in the same order, or an error."""
    first = outputs[0]
    for o in outputs[1:]:
        for key in ("class_names", "val_index", "test_index"):
            if not np.array_equal(o[key], first[key]):
                raise ValueError(f"runs {first['name']} and {o['name']} differ in {key}: stack "
                                 f"runs trained on the same data split (--seed, --split-recipe)")


def stack_runs(runs: list[Path], out: Path, *, model: str = "logistic", seed: int = 0) -> dict:
    """Fit the meta-classifier on validation member outputs, evaluate on test, and write the
    stack bundle into `out`; every run is checked (outputs, bundle pieces) before a write."""
    outputs = [load_outputs(r) for r in runs]
    check_compatible(outputs)
    pieces = [bundle_lib.bundle_pieces(r) for r in runs]
    if (out / bundle_lib.COMPONENTS_DIR).exists():
        raise ValueError(f"{out} already holds a stack bundle; choose another output folder")
    names = [o["name"] for o in outputs]
    if len(set(names)) != len(names):
        names = [f"{n}#{i}" for i, n in enumerate(names)]
    first = outputs[0]
    class_names = [str(c) for c in first["class_names"]]
    x_val, layout = make_features({n: o["val"] for n, o in zip(names, outputs, strict=True)})
    train = np.unique(np.concatenate([o["train_indices"] for o in outputs]))
    meta = MetaClassifier(model=model, random_state=seed).fit(
        x_val, first["val_label"], example_indices=first["val_index"], train_indices=train,
        layout=layout, n_classes=len(class_names))
    x_test, _ = make_features({n: o["test"] for n, o in zip(names, outputs, strict=True)})
    proba = meta.predict_proba(x_test)
    y = first["test_label"]
    # patient-grouped bootstrap CIs, as the stacked runs' (runs older than the ids: examples)
    ids = first.get("test_patient_id")
    metrics = evaluate_predictions(y, proba, class_names, seed=seed, patient_ids=ids)
    metrics["stack"] = {"runs": [str(r) for r in runs], "members": names, "model": model,
                        "fitted_on": "validation member outputs"}
    out.mkdir(parents=True, exist_ok=True)
    for i, (run, run_pieces) in enumerate(zip(runs, pieces, strict=True)):
        bundle_lib.copy_bundle(run, out / bundle_lib.COMPONENTS_DIR / str(i), run_pieces)
    meta_file = meta.save(out / meta.file_name).name
    np.savez(out / "outputs.npz", class_names=np.array(class_names), train_indices=train,
             val_index=first["val_index"], val_label=first["val_label"],
             test_index=first["test_index"], test_label=y, test_proba=proba,
             test_pred=proba.argmax(1), **({} if ids is None else {"test_patient_id": ids}))
    (out / "config.json").write_text(json.dumps(
        {"experiment": "stack", "strategy": "stack", "backbone": "+".join(sorted(
            {o["backbone"] for o in outputs})), "runs": [str(r) for r in runs],
         "meta_model": model, "class_names": class_names, "argv": sys.argv,
         "bundle": bundle_lib.stack_section(class_names=class_names, names=names,
                                            meta=meta_file)}, indent=2) + "\n")
    write_report(metrics, out, y_true=y, proba=proba, title="stacked meta-classifier",
                 extra_sections={"Stacked runs": "\n".join(f"- {n}: `{r}`" for n, r in
                                                           zip(names, runs, strict=True))})
    return metrics
