"""A comparison's analysis from finished run folders, with no retraining.

Every run folder (config.json, metrics.json, outputs.npz, metrics.jsonl) yields its decision
rules on the test split as `Variant`s, each scored on its own (accuracy, macro-F1, per-class
sensitivity / specificity, macro ROC-AUC, ECE before and after temperature scaling):

- an OvO run: "ovo-votes" and "ovo-coupling" (both with the pairwise-coupled probabilities);
- a cascade run: "cascade" (stage-1 threshold 0.5) and "cascade-tuned" (threshold tuned on
  validation member outputs to the run's target sensitivity);
- single / OvA runs: their own rule; a stack run: its saved meta-classifier outputs;
- every ensemble run: "<strategy>+meta", a logistic MetaClassifier fitted on the run's
  validation member outputs (leakage-checked against its training indices), predicting test.

Variants of one (backbone, seed) share the test examples, so each is tested against the
baseline variant there (McNemar, patient-grouped paired bootstrap), and across seeds by an
exact sign-flip test of the per-seed macro-F1 differences; Holm adjusts each family.
`cross_set` evaluates a run's bundle (its own rule) on another dataset, with the leakage
check against the run's training images.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data_pipeline.datasets import Dataset
from ensembles.bundle import load_bundle
from ensembles.combine.calibration import TemperatureScaling, expected_calibration_error
from ensembles.combine.meta import MetaClassifier, make_features
from ensembles.combine.rules import rule_combiner
from ensembles.combine.tasks import make_tasks
from ensembles.config import RunConfig
from ensembles.evaluate.assess import evaluate_bundle
from ensembles.evaluate.metrics import evaluate_predictions
from ensembles.evaluate.stats import holm, mcnemar, paired_bootstrap, sign_flip_test
from ensembles.training import runs
from ensembles.training.fitting import HEAD_PHASE


@dataclasses.dataclass(frozen=True)
class Variant:
    """One decision rule of a run on the test split; `val_proba` (None: not saved) is what
    its temperature is fitted on."""

    name: str
    test_proba: np.ndarray
    test_pred: np.ndarray
    val_proba: np.ndarray | None


def load_outputs(run_dir: Path) -> dict[str, np.ndarray]:
    """Every array of a run's outputs.npz."""
    with np.load(Path(run_dir) / "outputs.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def run_strategy(run_dir: Path) -> str:
    """The run's strategy ("stack" for a stack run)."""
    doc = runs.read_config(Path(run_dir))
    return "stack" if "config" not in doc else doc["config"]["ensemble"]["strategy"]


def own_variant(run_dir: Path) -> str:
    """The name of the variant the run itself computed (its saved test_proba / test_pred)."""
    doc = runs.read_config(Path(run_dir))
    if "config" not in doc:
        return "stack"
    e = RunConfig.from_dict(doc["config"]).ensemble
    return f"ovo-{e.ovo_decision}" if e.strategy == "ovo" else e.strategy


def variants(run_dir: Path) -> list[Variant]:
    """The run's decision rules on test, recomputed from its saved member outputs (a stack
    run: its saved outputs only, validation proba not saved)."""
    run_dir = Path(run_dir)
    z = load_outputs(run_dir)
    doc = runs.read_config(run_dir)
    if "config" not in doc:
        return [Variant("stack", z["test_proba"], z["test_pred"], None)]
    config = RunConfig.from_dict(doc["config"])
    e, names = config.ensemble, [str(c) for c in z["class_names"]]
    tasks = make_tasks(e.strategy, names, healthy=e.healthy)
    n = tasks.num_members
    val = [z[f"val_member_{m}"] for m in range(n)]
    test = [z[f"test_member_{m}"] for m in range(n)]
    if e.strategy == "ovo":
        rules = {f"ovo-{d}": rule_combiner(tasks, ovo_decision=d) for d in ("votes", "coupling")}
    elif e.strategy == "cascade":
        rules = {"cascade": rule_combiner(tasks),
                 "cascade-tuned": rule_combiner(tasks, target_sensitivity=e.target_sensitivity)}
    else:
        rules = {e.strategy: rule_combiner(tasks)}
    out = []
    for name, rule in rules.items():
        rule.fit(val, z["val_label"])
        out.append(Variant(name, rule.predict_proba(test), rule.predict(test),
                           rule.predict_proba(val)))
    meta = fit_meta(e.strategy, val, z["val_label"], z["val_index"], z["train_indices"],
                    len(names), config.training.seed)
    val_meta = meta.predict_proba(meta.features({e.strategy: val}))
    test_meta = meta.predict_proba(meta.features({e.strategy: test}))
    return [*out, Variant(f"{e.strategy}+meta", test_meta, test_meta.argmax(1), val_meta)]


def fit_meta(strategy: str, val_members: Sequence[np.ndarray], y_val: np.ndarray,
             val_index: np.ndarray, train_indices: np.ndarray, n_classes: int,
             seed: int) -> MetaClassifier:
    """A logistic MetaClassifier on validation member outputs (refused if a row was a
    member-training example), as `ensembles.api._fit_meta` without meta_folds."""
    x, layout = make_features({strategy: val_members})
    return MetaClassifier(model="logistic", random_state=seed).fit(
        x, y_val, example_indices=val_index, train_indices=train_indices, layout=layout,
        n_classes=n_classes)


def calibration(variant: Variant, y_val: np.ndarray, y_test: np.ndarray) -> dict:
    """Test ECE before / after a temperature fitted on the variant's validation proba
    (log-probabilities as logits, as the runs do); after and T are None without val proba."""
    def logits(p: np.ndarray) -> np.ndarray:
        return np.log(np.clip(p, 1e-12, 1))
    if variant.val_proba is None:
        return {"ece_before": expected_calibration_error(y_test, variant.test_proba),
                "ece_after": None, "temperature": None}
    report = TemperatureScaling().fit(logits(variant.val_proba), y_val).report(
        logits(variant.test_proba), y_test)
    return {"ece_before": report.ece_before, "ece_after": report.ece_after,
            "temperature": report.temperature}


def training_cost(run_dir: Path) -> dict:
    """Member-epochs (one per member per epoch record: stacked members that stopped early
    still count while their stack trains) and the training seconds summed over epoch
    records (each record's "seconds": the epoch's training loop, validation not included),
    over both phases. A stack run costs what the runs it stacks cost."""
    run_dir = Path(run_dir)
    doc = runs.read_config(run_dir)
    if "config" not in doc:
        parts = [training_cost(Path(r)) for r in doc["runs"]]
        return {k: sum(p[k] for p in parts) for k in ("member_epochs", "train_seconds")}
    records = [r for d in (run_dir, run_dir / HEAD_PHASE) for r in read_records(d)]
    return {"member_epochs": sum(len(r["members"]) for r in records),
            "train_seconds": float(sum(r.get("seconds", 0.0) for r in records))}


def read_records(directory: Path) -> list[dict]:
    """The epoch records of `directory`/metrics.jsonl (none when it is absent)."""
    path = Path(directory) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def learning_curves(run_dir: Path, key: str = "val_macro_f1") -> dict[str, list]:
    """Per member, [(epoch, value)] of `key` from the run's (final phase) metrics.jsonl."""
    curves: dict[str, list] = {}
    for r in read_records(Path(run_dir)):
        for member, value in zip(r["members"], r.get(key) or [], strict=False):
            curves.setdefault(member, []).append((r["epoch"], value))
    return curves


def score(variant: Variant, z: dict[str, np.ndarray], *, seed: int, n_bootstrap: int) -> dict:
    """The variant's test metrics: accuracy, macro-F1, macro ROC-AUC (with 95% CIs when
    n_bootstrap > 0), per-class sensitivity / specificity, calibration."""
    names = [str(c) for c in z["class_names"]]
    m = evaluate_predictions(z["test_label"], variant.test_proba, names, y_pred=variant.test_pred,
                             patient_ids=z.get("test_patient_id"), seed=seed,
                             n_bootstrap=n_bootstrap)
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
            "roc_auc_macro": m["roc_auc_macro"], "ci95": m["ci95"] or {},
            "per_class": {c: {"sensitivity": v["recall"], "specificity": v["specificity"]}
                          for c, v in m["per_class"].items()},
            **calibration(variant, z["val_label"], z["test_label"])}


def analyse_run(run_dir: Path, *, backbone: str, seed: int, n_bootstrap: int) -> list[dict]:
    """One row per variant of the run: its scores and cost, with the test arrays the paired
    tests need (y, proba, pred, ids)."""
    z = load_outputs(run_dir)
    run = {"strategy": run_strategy(run_dir), "backbone": backbone, "seed": seed,
           "run": str(run_dir), **training_cost(run_dir)}
    return [{**run, "variant": v.name, **score(v, z, seed=seed, n_bootstrap=n_bootstrap),
             "y": z["test_label"], "proba": v.test_proba, "pred": v.test_pred,
             "ids": z.get("test_patient_id")} for v in variants(run_dir)]


def paired_tests(rows: list[dict], baseline: str, *, n_bootstrap: int = 500) -> list[dict]:
    """Each variant vs `baseline` on the same (backbone, seed) test examples: McNemar and
    the paired bootstrap of macro-F1 (patients resampled when ids exist), with Holm-adjusted
    p-values over the family of every (variant, seed) compared on that backbone."""
    index = {(r["variant"], r["backbone"], r["seed"]): r for r in rows}
    tests = []
    for r in rows:
        base = index.get((baseline, r["backbone"], r["seed"]))
        if base is None or r["variant"] == baseline:
            continue
        m = mcnemar(r["y"], r["pred"], base["pred"])
        b = paired_bootstrap(r["y"], r["proba"], base["proba"], metric="macro_f1",
                             patient_ids=r["ids"], n_bootstrap=n_bootstrap, seed=r["seed"],
                             pred_a=r["pred"], pred_b=base["pred"])
        tests.append({"variant": r["variant"], "baseline": baseline, "backbone": r["backbone"],
                      "seed": r["seed"], "mcnemar_p": m["p_value"],
                      "macro_f1_diff": b["difference"], "diff_ci95": b["ci95"],
                      "bootstrap_p": b["p_value"], "unit": b["unit"]})
    return holm_by_backbone(tests, ("mcnemar_p", "bootstrap_p"))


def across_seed_tests(rows: list[dict], baseline: str) -> list[dict]:
    """Per (variant, backbone), the exact sign-flip test of the per-seed macro-F1
    differences vs `baseline` (seeds where both exist), Holm-adjusted over the variants of
    each backbone."""
    f1 = {(r["variant"], r["backbone"], r["seed"]): r["macro_f1"] for r in rows}
    tests = []
    for v, b in dict.fromkeys((r["variant"], r["backbone"]) for r in rows):
        seeds = sorted(s for (v2, b2, s) in f1 if (v2, b2) == (v, b)
                       and (baseline, b, s) in f1)
        if v == baseline or not seeds:
            continue
        t = sign_flip_test([f1[v, b, s] - f1[baseline, b, s] for s in seeds])
        tests.append({"variant": v, "baseline": baseline, "backbone": b, "seeds": seeds,
                      "mean_diff": t["mean_difference"], "p": t["p_value"], "min_p": t["min_p"]})
    return holm_by_backbone(tests, ("p",))


def holm_by_backbone(tests: list[dict], keys: Sequence[str]) -> list[dict]:
    """`tests` with `<key>_holm` for each p-value key, Holm over each backbone's tests."""
    out = [dict(t) for t in tests]
    for b in dict.fromkeys(t["backbone"] for t in out):
        family = [t for t in out if t["backbone"] == b]
        for key in keys:
            for t, adjusted in zip(family, holm([t[key] for t in family]), strict=True):
                t[f"{key}_holm"] = adjusted
    return out


def summarise(rows: list[dict], metrics: Sequence[str]) -> list[dict]:
    """Per (variant, backbone): each metric's (mean, std) over seeds and seed 0's 95% CI
    (the lowest seed's; None where not bootstrapped); per-class sensitivity / specificity
    and cost as means over seeds."""
    out = []
    for v, b in dict.fromkeys((r["variant"], r["backbone"]) for r in rows):
        group = sorted((r for r in rows if (r["variant"], r["backbone"]) == (v, b)),
                       key=lambda r: r["seed"])
        row = {"variant": v, "strategy": group[0]["strategy"], "backbone": b,
               "seeds": len(group)}
        for k in metrics:
            x = np.array([np.nan if r[k] is None else r[k] for r in group], float)
            row[k] = ((float(np.nanmean(x)), float(np.nanstd(x))) if np.any(~np.isnan(x))
                      else (None, None))
            row[f"{k}_ci95_seed0"] = group[0]["ci95"].get(k)
        row["per_class"] = {c: {s: float(np.mean([r["per_class"][c][s] for r in group]))
                                for s in ("sensitivity", "specificity")}
                            for c in group[0]["per_class"]}
        out.append(row)
    return out


def cross_set(run_dir: Path, dataset: Dataset, *, seed: int, batch_size: int = 32,
              n_bootstrap: int = 1000) -> dict:
    """The run's bundle (its own rule) on every image of `dataset` whose class it knows
    (`ensembles.evaluate.assess.evaluate_bundle`): macro-F1 with its 95% CI, and the images that
    duplicate one of the run's training / validation images (exact or perceptual-hash near),
    and the macro-F1 without them (None when every image is one)."""
    m = evaluate_bundle(load_bundle(run_dir), dataset, np.arange(len(dataset.source)),
                        batch_size=batch_size, seed=seed, n_bootstrap=n_bootstrap).metrics
    leak = m["leakage"]
    without = leak.get("without_duplicates")
    examples = m["evaluated_on"]["examples"]
    return {"dataset": dataset.name, "examples": examples, "accuracy": m["accuracy"],
            "macro_f1": m["macro_f1"], "macro_f1_ci95": (m["ci95"] or {}).get("macro_f1"),
            "leakage_checked": bool(leak.get("checked")),
            "duplicated_images": (examples - (without["n_examples"] if without else 0)
                                  if leak.get("duplicates") else 0),
            "exact": leak.get("exact"), "near": leak.get("near"),
            "macro_f1_without_duplicates": (without["macro_f1"] if without else None)
            if leak.get("duplicates") else m["macro_f1"]}
