"""The public Python API: an ensemble (a single model is a one-member ensemble) as an estimator.

    from data_pipeline import load_dataset
    from ensembles import Ensemble
    data = load_dataset("synthetic_cxr", count=400, image_size=32)
    ens = Ensemble("ova", backbone="simple_cnn", epochs=5).fit(data, out="runs/my-ova")
    print(ens.evaluate(data, split="test")["macro_f1"])
    proba = ens.predict_proba(images)           # uint8 [N, H, W] or [N, H, W, 1] -> [N, K]
    ens.save("exported/my-ova"); ens = Ensemble.load("exported/my-ova")

`fit` checks everything first (data, strategy, weights, the run folder), then trains every
member through the one engine, fits the combiner (and the optional meta-classifier), evaluates
on the test split and writes the run folder: a self-contained bundle with config.json,
metrics.json, report.md, plots, metrics.jsonl, TensorBoard events and outputs.npz.
Fitted attributes follow scikit-learn: `classes_`, `members_`, `combiner_`, `meta_`,
`thresholds_` (per-class operating thresholds), `metrics_`, `run_dir_`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from backbones.training import distributed
from data_pipeline import leakage, quality_filter
from data_pipeline.datasets import Dataset
from ensembles import bundle as bundle_lib
from ensembles.combine import operating_points as op_lib
from ensembles.combine import rules as rules_lib
from ensembles.combine.calibration import TemperatureScaling
from ensembles.combine.meta import MetaClassifier, make_features
from ensembles.config import (
    META_MODELS,
    RunConfig,
    for_resume,
    join_cluster,
    make_config,
    parse_operating_point,
    resolve,
)
from ensembles.evaluate import operating_points as op_report
from ensembles.evaluate.assess import evaluate_bundle, skipped_section
from ensembles.evaluate.metrics import evaluate_predictions
from ensembles.report.gallery import gallery
from ensembles.report.write import write_report
from ensembles.training import build, fitting, runs
from ensembles.training.stacking import stack_runs

SPLITS = ("train", "val", "test", "all")


class Ensemble:
    """A strategy ("single", "ova", "ovo", "cascade") of one backbone, trained and combined.

    Settings are given by name (any field of ensembles.config's sections: image_size=64,
    epochs=10, pretrained="imagenet", meta="logreg", ...) or as a whole `config`; what is
    not given takes the backbone family's defaults (`ensembles.config.FAMILY_DEFAULTS`).
    """

    def __init__(self, strategy: str = "ova", *, config: RunConfig | None = None,
                 **settings: Any):
        join_cluster(config, **settings)   # before resolve asks JAX for its backend
        if config is None:
            self.config = make_config(strategy, **settings)
        elif "backbone" in settings and settings["backbone"] != config.model.backbone:
            raise ValueError("a resolved config holds its backbone family's defaults: build a "
                             "new one with make_config(strategy, backbone=...) to change it")
        else:
            self.config = resolve(config.replace(**settings) if settings else config)
        self.bundle_: bundle_lib.Bundle | None = None
        self.data_: Dataset | None = None
        self.metrics_: dict | None = None
        self.run_dir_: Path | None = None

    # -- fitted attributes ------------------------------------------------------------------
    def _fitted(self) -> bundle_lib.Bundle:
        if self.bundle_ is None:
            raise ValueError("this Ensemble is not fitted yet: call fit(data) or Ensemble.load")
        return self.bundle_

    @property
    def classes_(self) -> tuple[str, ...]:
        return self._fitted().class_names

    @property
    def members_(self) -> tuple[str, ...]:
        return self._fitted().tasks.names

    @property
    def combiner_(self):
        return self._fitted().combiner

    @property
    def meta_(self) -> MetaClassifier | None:
        return self._fitted().meta

    @property
    def thresholds_(self) -> dict[str, float | None]:
        """Per-class operating thresholds chosen on validation (`config.ensemble.
        operating_point`); empty for a bundle saved before operating points existed."""
        b = self._fitted()
        return dict(zip(b.class_names, b.thresholds or [], strict=False))

    # -- training ---------------------------------------------------------------------------
    def fit(self, data: Dataset | None = None, *, out: str | Path | None = None,
            resume: bool = False, overwrite: bool = False) -> Ensemble:
        """Train, combine, evaluate on the test split and write the run folder `out`
        (default runs/<strategy>-<backbone>-<UTC time>/). `resume` continues the run in
        `out` exactly where its checkpoints end; it is refused, changing no file, when the
        run is missing or was made with other settings. Returns self."""
        cfg = self.config
        strategy, backbone = cfg.ensemble.strategy, cfg.model.backbone
        out = Path(out) if out is not None else runs.default_run_dir(strategy, backbone)
        if resume and (out / runs.CONFIG_FILE).is_file():   # the run's own members
            cfg = self.config = for_resume(cfg, runs.read_config(out).get("config"))
        runs.check_run_dir(out, cfg, resume=resume, overwrite=overwrite)
        data = build.build_data(cfg, data)
        plan = fitting.plan_run(cfg, data)
        runs.open_run_dir(out, resume=resume, overwrite=overwrite)
        self.data_ = data.dataset
        facts = {"experiment": strategy, "dataset": data.dataset.name,
                 "dataset_examples": len(data.dataset.source),
                 "class_names": list(data.class_names), "member_names": list(plan.tasks.names),
                 "split_sizes": {k: len(v) for k, v in data.splits.items()}}
        with runs.locked(out):
            if not resume:
                runs.write_config(out, cfg, **facts)
            trained = fitting.train_members(plan, out)
            self.bundle_, self.metrics_ = _finish(plan, out, trained, facts)
        distributed.barrier(f"wrote {out}")   # process 0 wrote the run folder
        self.run_dir_ = out
        return self

    # -- using a fitted ensemble --------------------------------------------------------------
    def evaluate(self, data: Dataset | None = None, split: str = "test", *,
                 use_meta: bool = False, n_bootstrap: int | None = None) -> dict:
        """The metrics dict (as metrics.json holds) on `split` of `data` (default: the
        dataset fit used, or for a loaded ensemble the one its config describes). "train"/"val"/"test" are the splits fit made (same recipe and
        seed); "all" uses every image (cross-dataset evaluation). Classes are matched by
        name; examples of classes the model lacks are left out and reported."""
        bundle = self._fitted()
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}")
        dataset = data if data is not None else self.data_
        if dataset is None:
            dataset = build.load_data(self.config)
        indices = (np.arange(len(dataset.source)) if split == "all" else
                   build.build_data(self.config, dataset).splits[split])
        return evaluate_bundle(
            bundle, dataset, indices, batch_size=self.config.training.batch_size,
            use_meta=use_meta, seed=self.config.training.seed,
            n_bootstrap=self.config.ensemble.n_bootstrap if n_bootstrap is None
            else n_bootstrap).metrics

    def predict_proba(self, images: np.ndarray, *, use_meta: bool = False) -> np.ndarray:
        """Class probabilities [N, K] (columns in `classes_` order) for raw 8-bit images
        [N, H, W] or [N, H, W, 1] of any size (preprocessed as in training)."""
        return self._predictions(images, use_meta).proba

    def predict(self, images: np.ndarray, *, use_meta: bool = False) -> np.ndarray:
        """Class indices into `classes_`: the strategy's own decision rule (a cascade's
        stages, OvO votes), or the meta-classifier's argmax with `use_meta`."""
        return self._predictions(images, use_meta).decisions

    def _predictions(self, images: np.ndarray, use_meta: bool) -> bundle_lib.Predictions:
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[..., None]              # the loader's examples are [H, W, 1]
        if images.ndim != 4 or images.shape[-1] != 1 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 [N, H, W] or [N, H, W, 1]; got "
                             f"{images.dtype} {list(images.shape)}")
        source = [{"image": image, "label": 0} for image in images]
        return self._fitted().predict(source, np.arange(len(source)), use_meta=use_meta,
                                      batch_size=self.config.training.batch_size)

    def save(self, path: str | Path) -> Path:
        """Copy the bundle (what load needs, plus metrics.json and report.md) into a new
        folder `path` (hard links where possible)."""
        bundle = self._fitted()
        path = Path(path)
        if path.exists() and any(path.iterdir()):
            raise ValueError(f"{path} exists and is not empty")
        pieces = bundle_lib.bundle_pieces(bundle.run_dir)
        extra = [Path(f) for f in ("metrics.json", "report.md")
                 if (bundle.run_dir / f).is_file()]
        bundle_lib.copy_bundle(bundle.run_dir, path, [*pieces, *extra])
        return path

    @classmethod
    def load(cls, path: str | Path) -> Ensemble:
        """A fitted Ensemble from a run folder (or one written by `save`)."""
        bundle = bundle_lib.load_bundle(path)
        if not isinstance(bundle, bundle_lib.Bundle):
            raise bundle_lib.BundleError(f"{path} is a stack run: load it with "
                                         f"ensembles.bundle.load_bundle")
        doc = runs.read_config(Path(path))
        ens = cls.__new__(cls)
        ens.config = RunConfig.from_dict(doc["config"])
        ens.bundle_, ens.run_dir_, ens.data_ = bundle, Path(path), None
        metrics = Path(path) / "metrics.json"
        ens.metrics_ = json.loads(metrics.read_text()) if metrics.is_file() else None
        return ens

    def __repr__(self) -> str:
        state = f"fitted, {self.run_dir_}" if self.bundle_ is not None else "not fitted"
        return (f"Ensemble({self.config.ensemble.strategy!r}, "
                f"backbone={self.config.model.backbone!r}; {state})")


class Stack:
    """A meta-classifier over the members of finished runs (same data split), as a bundle."""

    def __init__(self, runs_: list[str | Path], *, meta: str = "logreg", seed: int = 0):
        if meta not in META_MODELS:
            raise ValueError(f"meta must be one of {', '.join(META_MODELS)}")
        self.runs = [Path(r) for r in runs_]
        self.meta, self.seed = meta, seed
        self.metrics_: dict | None = None
        self.run_dir_: Path | None = None

    def fit(self, out: str | Path) -> Stack:
        """Fit on the runs' validation member outputs, evaluate on test, write `out`."""
        self.run_dir_ = Path(out)
        self.metrics_ = stack_runs(self.runs, self.run_dir_, model=META_MODELS[self.meta],
                                   seed=self.seed)
        return self


def _finish(plan: fitting.Plan, out: Path, trained: fitting.Trained, facts: dict
            ) -> tuple[bundle_lib.Bundle, dict]:
    """Save the members, fit the combiner(s), evaluate on test, write the bundle and report;
    returns the bundle (in memory, as `load_bundle` would read it back) and the metrics."""
    cfg, data, tasks = plan.config, plan.data, plan.tasks
    e, strategy, backbone = cfg.ensemble, cfg.ensemble.strategy, cfg.model.backbone
    stacks = bundle_lib.save_members(out, [t.group for t in trained.groups],   # every
                                     [t.variables for t in trained.groups])   # process: orbax
    model = build.model_options(cfg)
    bundle = bundle_lib.Bundle(
        run_dir=out, backbone=backbone, class_names=data.class_names,
        preprocess=data.preprocess, tasks=tasks, groups=[t.group for t in trained.groups],
        variables=[t.variables for t in trained.groups],
        combiner=rules_lib.rule_combiner(tasks, ovo_decision=e.ovo_decision), meta=None,
        temperature=None, kind="ensemble", model_options=model, segmenter=data.segmenter)
    batch = cfg.training.batch_size
    val_p, y_val, i_val = bundle.member_outputs(data.eval_loader("val", batch))
    test_p, y_test, i_test = bundle.member_outputs(data.eval_loader("test", batch))
    rule = bundle.combiner.fit(val_p, y_val)
    proba, pred = rule.predict_proba(test_p), rule.predict(test_p)
    ids = data.dataset.patient_ids[i_test]
    metrics = evaluate_predictions(y_test, proba, data.class_names, patient_ids=ids,
                                   seed=cfg.training.seed, y_pred=pred,
                                   n_bootstrap=e.n_bootstrap)
    variants = [_variant(f"{strategy} rule", y_test, proba, pred, data.class_names),
                *_rule_variants(plan, val_p, y_val, test_p, y_test, proba)]
    meta, meta_saved = None, None
    if e.meta != "none":
        meta, source = _fit_meta(plan, out, val_p, y_val, i_val)
        mp = meta.predict_proba(meta.features({strategy: test_p}))
        variants.append(_variant(f"meta {e.meta} (fit on {source})", y_test, mp, mp.argmax(1),
                                 data.class_names))
        meta_saved = meta.file_name
        if distributed.is_primary():
            meta.save(out / meta_saved)

    val_proba = rule.predict_proba(val_p)
    point = _operating_point(plan, val_proba, y_val, data.dataset.patient_ids[i_val], proba,
                             y_test, ids)
    scaler = TemperatureScaling().fit(np.log(np.clip(val_proba, 1e-12, 1)), y_val)
    calib = scaler.report(np.log(np.clip(proba, 1e-12, 1)), y_test).as_dict()
    metrics.update(temperature_scaling=calib, variants=variants, strategy=strategy,
                   operating_point=point,
                   backbone=backbone,
                   best_epoch_per_member=fitting.best_epochs(tasks, trained.groups),
                   epochs_trained=max((r["epoch"] for t in trained.groups for r in t.records),
                                      default=0))
    if trained.head is not None:
        metrics["head_phase"] = {"epochs": cfg.model.head_epochs, "freeze": "head",
                                 "best_epoch_per_member": fitting.best_epochs(tasks,
                                                                              trained.head)}
    skipped = list(data.dataset.skipped)
    metrics["skipped_files"] = {"count": len(skipped), "files": skipped}
    metrics["quality_filter"] = data.quality
    bundle = dataclasses.replace(   # what load_bundle reads back from the files below
        bundle, combiner=rule, meta=meta, temperature=calib["temperature"],
        operating_point=point["target"], thresholds=point["thresholds"],
        hashes_file=out / leakage.TRAIN_HASHES_FILE)
    if not distributed.is_primary():    # every process computed the metrics; one writes
        return bundle, metrics
    runs.write_json_atomic(out / bundle_lib.COMBINER_FILE, {
        "rule": rules_lib.combiner_to_json(rule), "temperature": calib["temperature"],
        "operating_point": {"target": point["target"], "thresholds": point["thresholds"]}})
    np.savez(out / "outputs.npz", class_names=np.array(data.class_names),
             train_indices=data.train_indices, val_index=i_val, val_label=y_val,
             test_index=i_test, test_label=y_test, test_proba=proba, test_pred=pred,
             test_patient_id=ids,
             **{f"val_member_{m}": v for m, v in enumerate(val_p)},
             **{f"test_member_{m}": v for m, v in enumerate(test_p)})
    hashes = leakage.save_training_hashes(out, data.dataset, {s: data.splits[s] for s in (
        "train", "val")}, progress=cfg.training.progress)   # for evaluate's leakage check
    section = bundle_lib.bundle_section(
        strategy=strategy, backbone=backbone, model=model, class_names=data.class_names,
        preprocess=data.preprocess, tasks=tasks, stacks=stacks, meta=meta_saved,
        train_hashes=hashes,
        segmenter=data.segmenter.reference() if data.segmenter is not None else None)
    section = bundle_lib.add_manifest(out, section)     # SHA-256 of every piece's file
    title = (f"{strategy} of {backbone} on {data.dataset.name} "
             f"({', '.join(data.class_names)}): test split")
    tiles, note = gallery(bundle, data.dataset.source, i_test, y_test, pred, proba)
    write_report(metrics, out, y_true=y_test, proba=proba, title=title, tiles=tiles,
                 gallery_note=note,
                 extra_sections={**_sections(cfg, tasks, variants, calib),
                                 "Operating points": op_report.markdown(point),
                                 "Skipped files": skipped_section(skipped),
                                 "Quality filter": quality_filter.section(data.quality)})
    runs.write_config(out, cfg, **facts, bundle=section)
    return bundle, metrics


def _operating_point(plan: fitting.Plan, val_proba, y_val, val_ids, test_proba, y_test,
                     test_ids) -> dict:
    """Per-class thresholds chosen on validation for the run's operating point, and the
    sensitivity / specificity their flags reach on validation and on test."""
    e, names = plan.config.ensemble, plan.data.class_names
    point = parse_operating_point(e.operating_point)
    thresholds = op_lib.choose_thresholds(y_val, val_proba, point)
    boot = {"seed": plan.config.training.seed, "n_bootstrap": e.n_bootstrap}
    return {"target": str(point), "chosen_on": "val", "thresholds": thresholds,
            "val": op_report.rates(y_val, val_proba, thresholds, names, patient_ids=val_ids,
                                **boot),
            "test": op_report.rates(y_test, test_proba, thresholds, names, patient_ids=test_ids,
                                 **boot)}


def _rule_variants(plan: fitting.Plan, val_p, y_val, test_p, y_test, proba) -> list[dict]:
    """The strategy's other decision rules on test: OvO's other vote rule, the cascade
    with its stage-1 threshold tuned on validation to the target sensitivity."""
    e, tasks, names = plan.config.ensemble, plan.tasks, plan.data.class_names
    if e.strategy == "ovo":
        other = "coupling" if e.ovo_decision == "votes" else "votes"
        alt = rules_lib.rule_combiner(tasks, ovo_decision=other)
        return [_variant(f"ovo {other}", y_test, proba, alt.predict(test_p), names)]
    if e.strategy == "cascade":
        tuned = rules_lib.rule_combiner(tasks, target_sensitivity=e.target_sensitivity)
        tuned.fit(val_p, y_val)
        return [_variant(f"cascade thresholded (stage-1 sensitivity >= {e.target_sensitivity} "
                         f"on val, t={tuned.threshold_:.3f})", y_test,
                         tuned.predict_proba(test_p), tuned.predict(test_p), names)]
    return []


def _fit_meta(plan: fitting.Plan, out: Path, val_p, y_val, i_val
              ) -> tuple[MetaClassifier, str]:
    """The meta-classifier fitted on validation member outputs, or with meta_folds on
    out-of-fold outputs of members that never saw the rows (checked by MetaClassifier.fit)."""
    cfg, data = plan.config, plan.data
    e = cfg.ensemble
    meta = MetaClassifier(model=META_MODELS[e.meta], random_state=cfg.training.seed)
    if e.meta_folds:
        oof = fitting.out_of_fold_outputs(plan, out)
        rows = (oof.members, oof.labels, oof.indices, oof.fold, oof.fold_train)
        source = f"{e.meta_folds}-fold out-of-fold member outputs"
    else:
        rows = (val_p, y_val, i_val, None, data.train_indices)
        source = "validation member outputs"
    fit_p, y_fit, i_fit, fold, fold_train = rows
    x_fit, layout = make_features({e.strategy: fit_p})
    meta.fit(x_fit, y_fit, example_indices=i_fit, train_indices=fold_train, fold=fold,
             layout=layout, n_classes=len(data.class_names))
    return meta, source


def _variant(name: str, y, proba, pred, class_names) -> dict:
    m = evaluate_predictions(y, proba, class_names, y_pred=pred, n_bootstrap=0)
    return {"name": name, "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
            "roc_auc_macro": m["roc_auc_macro"]}


def _sections(cfg: RunConfig, tasks, variants: list[dict], calib: dict) -> dict[str, str]:
    def f(x):
        return "n/a" if x is None else f"{x:.3f}"
    rows = ["| combiner | accuracy | macro-F1 | ROC-AUC (macro) |", "|---|---|---|---|"]
    rows += [f"| {v['name']} | {f(v['accuracy'])} | {f(v['macro_f1'])} | "
             f"{f(v['roc_auc_macro'])} |" for v in variants]
    cal = (f"Temperature T = {calib['temperature']:.3f} fitted on validation (combined "
           f"log-probabilities). Test NLL {calib['nll_before']:.4f} -> {calib['nll_after']:.4f}, "
           f"ECE {calib['ece_before']:.4f} -> {calib['ece_after']:.4f}. The headline metrics "
           "above are uncalibrated (T changes confidence, never the decision).")
    t, m = cfg.training, cfg.model
    members = (f"{len(tasks.names)} member(s) ({', '.join(tasks.names)}), trained "
               f"{t.members} with per-member early stopping on {t.monitor} (patience "
               f"{t.early_stopping_patience})")
    if t.member_data == "own":
        members += ("; each member trained only on the classes it separates, the same steps "
                    "per epoch for every member of a member group")
    if m.head_epochs:
        members += (f", in two phases: the head alone for {m.head_epochs} epoch(s) (logs in "
                    f"head/), then freeze {m.freeze} for up to {t.epochs} epoch(s) from each "
                    "member's best head-phase weights with a fresh optimizer")
    return {"Members": members + ".", "Combiners": "\n".join(rows),
            "Temperature scaling": cal}
