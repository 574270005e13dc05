"""Stacking finished runs: a meta-classifier over the members of several runs, as a bundle.

The meta-classifier (ensembles.combine.meta, logistic regression by default) is fitted on the members'
validation outputs only, with the leakage guard checking them against every run's training
indices, and evaluated on the shared test split. All runs must share the dataset split (same
data, --seed and --split-recipe): the example indices are checked and others refused.

The output folder is a self-contained stack bundle (ensembles/bundle/): every stacked run's
bundle pieces are checked (schema, paths, SHA-256 digests) and hard-linked (else copied) into
components/<i>/, where each copy is checked again; the meta-classifier is saved beside them
(meta.json, or meta.skops for gradient boosting); config.json, written last, holds the SHA-256
manifest of the meta file and of every file under components/; and `experiments.evaluate` /
`experiments.predict --run OUT` rebuild each component's member outputs with its own
preprocessing before applying the meta-classifier.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import numpy as np

from ensembles import bundle as bundle_lib
from ensembles.bundle.schema import BundleError
from ensembles.combine.meta import MetaClassifier, make_features
from ensembles.config import ConfigError
from ensembles.evaluate.metrics import evaluate_predictions
from ensembles.report.write import write_report
from ensembles.training.runs import read_config, write_json_atomic

OUTPUT_KEYS = ("class_names", "train_indices", "val_index", "val_label", "test_index",
               "test_label")


def load_outputs(run: Path) -> dict:
    """The held-out member outputs a run saved (outputs.npz), with its strategy/backbone."""
    path = Path(run) / "outputs.npz"
    if not path.is_file():
        raise BundleError(f"{run} has no outputs.npz: not an ensemble run of this project, or "
                         f"incomplete")
    config = read_config(Path(run))
    try:
        with np.load(path, allow_pickle=False) as saved:
            z = {k: saved[k] for k in saved.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise BundleError(f"{path} is not a readable outputs file ({error})") from None
    if not isinstance(config, dict):
        raise BundleError(f"{run}/config.json must hold a JSON object")
    members = sorted(int(k.split("_")[-1]) for k in z if k.startswith("val_member_"))
    if not members:
        raise BundleError(f"{run} saved no member outputs (a stack run?): stack ensemble runs")
    if "config" not in config:
        raise BundleError(f"{run}/config.json holds no run config (a run of an older version "
                         f"of this project): retrain it to stack it")
    missing = sorted(set(OUTPUT_KEYS) - set(z))
    if missing:
        raise BundleError(f"{path} lacks {', '.join(missing)}: not an ensemble run's outputs")
    try:
        strategy = str(config["config"]["ensemble"]["strategy"])
        backbone = str(config["config"]["model"]["backbone"])
    except (KeyError, TypeError):
        raise BundleError(f"{run}/config.json: its run config names no ensemble.strategy and "
                         f"model.backbone") from None
    return {"name": f"{strategy}/{backbone}", "backbone": backbone, **z,
            "val": [z[f"val_member_{m}"] for m in members],
            "test": [z[f"test_member_{m}"] for m in members]}


def check_compatible(outputs: list[dict]) -> None:
    """Same classes and the same validation / test examples in the same order, or an error."""
    first = outputs[0]
    for o in outputs[1:]:
        for key in ("class_names", "val_index", "test_index"):
            if not np.array_equal(o[key], first[key]):
                raise BundleError(f"runs {first['name']} and {o['name']} differ in {key}: stack "
                                 f"runs trained on the same data split (--seed, --split-recipe)")


def stack_runs(runs: list[Path], out: Path, *, model: str = "logistic", seed: int = 0) -> dict:
    """Fit the meta-classifier on validation member outputs, evaluate on test, and write the
    stack bundle into `out`; every run is checked (outputs, bundle pieces) before a write."""
    outputs = [load_outputs(r) for r in runs]
    check_compatible(outputs)
    pieces = [bundle_lib.bundle_pieces(r) for r in runs]
    if (out / bundle_lib.COMPONENTS_DIR).exists():
        raise ConfigError(f"{out} already holds a stack bundle; choose another output folder")
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
    write_report(metrics, out, y_true=y, proba=proba, title="stacked meta-classifier",
                 extra_sections={"Stacked runs": "\n".join(f"- {n}: `{r}`" for n, r in
                                                           zip(names, runs, strict=True))})
    section = bundle_lib.stack_section(class_names=class_names, names=names, meta=meta_file)
    # the manifest covers the meta file and every file of the components (their config.json
    # too); config.json, written last and atomically, holds it
    write_json_atomic(out / bundle_lib.CONFIG_FILE, {
        "experiment": "stack", "strategy": "stack", "backbone": "+".join(sorted(
            {o["backbone"] for o in outputs})), "runs": [str(r) for r in runs],
        "meta_model": model, "class_names": class_names, "argv": sys.argv,
        "bundle": bundle_lib.add_manifest(out, section)})
    return metrics
