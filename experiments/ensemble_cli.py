"""The body shared by `experiments.ova`, `.ovo` and `.cascade` (and `single` members for compare).

One run: check the data and the strategy (before anything is written), train the members as
stacks, combine their outputs with the strategy's rule, evaluate on the test split, and write
a self-contained bundle (see ensembles/bundle.py) with metrics.json, report.md, plots,
metrics.jsonl, curves.png and outputs.npz (held-out member outputs that `experiments.stack`
fits its meta-classifier on). With --head-epochs N the members train in two phases, as
`experiments.single` does: the head alone first (its logs and checkpoints under head/), then
--freeze from the head phase's best weights with a fresh optimizer.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from pathlib import Path

import jax
import numpy as np

import backbones
from backbones import training
from backbones.training.curves import plot_curves
from data_pipeline import augment as augment_lib
from data_pipeline.loader import make_loader
from data_pipeline.splits import kfold_indices
from ensembles import bundle as bundle_lib
from ensembles import members as members_lib
from ensembles import strategy as strategy_lib
from ensembles.calibration import TemperatureScaling
from ensembles.meta import MetaClassifier, make_features
from experiments import common
from experiments.evaluation import evaluate_predictions, write_report

# Defaults per backbone family, measured on this project's 2-core CPU (README, "Measured");
# every one can be overridden on the command line. The custom CNNs learn synthetic_cxr in a
# few minutes (macro-F1 >= 0.8 for ova/ovo/cascade: tests/test_ensemble_accuracy.py); the
# ImageNet architectures get a budget that keeps `python -m experiments.<strategy> --backbone
# resnet50` with no other flag under 10 minutes.
ENSEMBLE_DEFAULTS = {"warmup_epochs": 0.5, "early_stopping_patience": 3}
CUSTOM_CNN_DEFAULTS = {"image_size": 32, "count": 2000, "epochs": 15, "batch_size": 32}
IMAGENET_ARCH_DEFAULTS = {"image_size": 32, "count": 400, "epochs": 3, "batch_size": 16}
META_MODELS = {"logreg": "logistic", "gboost": "gradient_boosting"}


def build_parser(strategy: str, description: str) -> argparse.ArgumentParser:
    """Common flags plus the ensemble's own, with this CLI's defaults."""
    parser = argparse.ArgumentParser(prog=f"python -m experiments.{strategy}",
                                     description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_common_flags(parser)
    group = parser.add_argument_group("ensemble")
    group.add_argument("--backbone", default="simple_cnn", help="backbone of every member")
    group.add_argument("--members", default="auto", choices=("auto", *members_lib.MEMBER_MODES),
                       help="train members together under vmap, or one after another; auto: "
                            "one after another for a custom CNN on CPU (faster there, "
                            "benchmarks/ensemble_throughput.py), stacked otherwise")
    group.add_argument("--meta", default="none", choices=("none", *META_MODELS),
                       help="also fit a meta-classifier on the validation member outputs")
    group.add_argument("--meta-folds", type=int, default=0,
                       help="with --meta: fit it on K-fold out-of-fold member outputs for the "
                            "training examples (K extra member trainings) instead of on the "
                            "validation outputs; 0 = validation")
    group.add_argument("--healthy", default="normal", help="cascade: the healthy class")
    group.add_argument("--ovo-decision", default="votes", choices=("votes", "coupling"),
                       help="OvO: scikit-learn's vote rule or argmax of pairwise coupling")
    group.add_argument("--target-sensitivity", type=float, default=0.95,
                       help="cascade: stage-1 sensitivity the thresholded variant is tuned to")
    group.add_argument("--min-per-class", type=int, default=2,
                       help="fewest training examples per member class")
    parser.set_defaults(**ENSEMBLE_DEFAULTS, **CUSTOM_CNN_DEFAULTS)
    return parser


def parse_args(strategy: str, argv: list[str] | None, description: str = ""
               ) -> argparse.Namespace:
    """The flags, with the defaults of --backbone's family and --members auto resolved."""
    parser = build_parser(strategy, description)
    backbone = parser.parse_known_args(argv)[0].backbone
    if not backbones.is_custom_cnn(backbone):
        parser.set_defaults(**IMAGENET_ARCH_DEFAULTS)
    args = parser.parse_args(argv)
    if args.members == "auto":
        cpu = jax.default_backend() == "cpu"
        args.members = "sequential" if cpu and backbones.is_custom_cnn(backbone) else "stacked"
    return args


@dataclasses.dataclass
class Prepared:
    """Everything checked before the run directory is touched."""

    args: argparse.Namespace
    data: common.Data
    tasks: object
    stacks: list


def prepare(args: argparse.Namespace, strategy: str) -> Prepared:
    """Load data and plan the members; every bad input raises here, before any write."""
    common.check_args(args, head_epochs=True)
    data = common.build_data(args)
    if args.meta != "none" and len(data.splits["val"]) == 0:
        raise ValueError("--meta needs held-out (validation) data, and the split has none")
    if args.meta_folds and (args.meta == "none" or args.meta_folds < 2):
        raise ValueError("--meta-folds needs --meta and K >= 2 (0 fits on validation outputs)")
    if args.meta_folds:   # a class with fewer patients than folds is refused here
        train = np.unique(data.train_indices)
        kfold_indices(data.dataset.labels[train], data.dataset.patient_ids[train],
                      k=args.meta_folds, seed=args.seed)
    train_labels = data.dataset.labels[data.train_indices]
    model, params = _model_params(args)
    for phase in _phases(args):   # each phase's schedule and freeze policy fit the model
        training.optim.make_schedule(common.optim_config(phase, data.steps_per_epoch))
        training.trainable_modules(params, phase.freeze, model)
    tasks, stacks = strategy_lib.plan(strategy, data.class_names, train_labels,
                                      healthy=args.healthy, min_per_class=args.min_per_class)
    return Prepared(args, data, tasks, stacks)


def _phases(args: argparse.Namespace) -> list[argparse.Namespace]:
    """The flags of each training phase: the head-only one of --head-epochs N, then `args`."""
    head = common.head_phase(args)
    return [args] if head is None else [head, args]


def _model_params(args: argparse.Namespace):
    """A member model (2 classes) and its parameter shapes, for the freeze policy."""
    model = common.build_model(args, args.backbone, num_classes=2)
    shape = (1, args.image_size, args.image_size, args.channels)
    return model, jax.eval_shape(lambda: training.state.initial_variables(
        model, jax.random.PRNGKey(0), shape))["params"]


def _make_state_fn(args: argparse.Namespace, steps_per_epoch: int, *, pretrained: bool = True):
    """make_state(num_classes, key) for train_stack, its schedule sized by `steps_per_epoch`;
    `pretrained=False` skips loading the --pretrained weights (a phase that starts from
    init_variables replaces them anyway)."""
    shape = (1, args.image_size, args.image_size, args.channels)
    cfg = common.optim_config(args, steps_per_epoch)

    def make_state(num_classes: int, key: jax.Array) -> training.TrainState:
        model = common.build_model(args, args.backbone, num_classes=num_classes)
        variables = training.state.initial_variables(model, key, shape)
        if args.pretrained and pretrained:
            variables = common.pretrained_variables(args, args.backbone, variables)
        labels = training.freeze_labels(variables["params"], args.freeze, model)
        tx = training.make_optimizer(cfg, None if args.freeze == "full" else labels)
        return training.create_train_state(model, tx, key, shape, variables=variables)

    return make_state


def _train_step(args: argparse.Namespace, data: common.Data):
    model, params = _model_params(args)
    augment = (None if data.augment is None or not augment_lib.DEFAULT_ON_DEVICE else
               functools.partial(augment_lib.augment_batch, cfg=data.augment))
    return training.make_train_step(
        label_smoothing=args.label_smoothing, freeze_policy=args.freeze,
        trainable=training.trainable_modules(params, args.freeze, model), augment=augment)


@dataclasses.dataclass
class Trained:
    """The members one training produced, and with --head-epochs those of its head phase."""

    stacks: list[members_lib.TrainedStack]
    head: list[members_lib.TrainedStack] | None = None


def train_members(p: Prepared, out: Path, train_indices: np.ndarray | None = None) -> Trained:
    """Train every stack of the plan on `train_indices` (default: the training split).

    With --head-epochs N, phase 1 (common.head_phase: freeze "head", N epochs) trains into
    out/head/, and phase 2 (the flags as given) starts each stack from phase 1's best
    variables with a fresh optimizer and trains into `out`; --resume continues either phase
    (a finished phase 1 is only restored from its checkpoints).
    """
    head_args = common.head_phase(p.args)
    if head_args is None:
        return Trained(_train_phase(p, p.args, out, train_indices))
    head = _train_phase(p, head_args, out / common.HEAD_PHASE, train_indices)
    final = _train_phase(p, p.args, out, train_indices, [t.variables for t in head])
    return Trained(final, head)


def _train_phase(p: Prepared, args: argparse.Namespace, out: Path,
                 train_indices: np.ndarray | None, init: list[dict] | None = None
                 ) -> list[members_lib.TrainedStack]:
    """One phase: every stack trained under `args` (from `init[s]` when given);
    out/metrics.jsonl gets one record per stack and epoch, checkpoints go under out/."""
    data = p.data
    out.mkdir(parents=True, exist_ok=True)
    train_indices = data.train_indices if train_indices is None else train_indices
    parallel = training.data_parallel(args.parallel)
    parallel.check_batch_size(args.batch_size)
    host_augment = None if augment_lib.DEFAULT_ON_DEVICE else data.augment

    def train_batches(epoch: int):
        return make_loader(data.dataset.source, train_indices, batch_size=args.batch_size,
                           preprocess=data.preprocess, augment=host_augment, shuffle=True,
                           seed=args.seed + epoch, num_epochs=1, drop_remainder=True,
                           worker_count=args.workers)

    def val_batches():
        return data.eval_loader("val", args.batch_size)

    log = out / "metrics.jsonl"
    if not args.resume and log.exists():
        log.unlink()
    trained = []
    for s, stack in enumerate(p.stacks):
        def on_epoch(record, s=s, stack=stack):
            names = [p.tasks.names[m] for m in ([record["member"]] if "member" in record
                                                  else stack.members)]
            record = {"stack": s, "members": names, **record}
            with log.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if args.progress:
                print(f"stack {s} epoch {record['epoch']}: train_loss "
                      f"{np.mean(record['train_loss']):.4f} val_loss "
                      f"{np.mean(record['val_loss']):.4f} ({record['images_per_s']:.0f} img/s)",
                      file=sys.stderr)
        trained.append(members_lib.train_stack(
            stack, make_state=_make_state_fn(args, len(train_indices) // args.batch_size,
                                             pretrained=init is None),
            train_step=_train_step(args, data),
            eval_step=training.make_eval_step(), parallel=parallel,
            train_batches=train_batches, val_batches=val_batches, epochs=args.epochs,
            patience=args.early_stopping_patience, key=jax.random.PRNGKey(args.seed),
            mode=args.members, checkpoint_dir=out / "checkpoints" / f"stack-{s}",
            on_epoch=on_epoch, progress=args.progress,
            init_variables=None if init is None else init[s]))
    return trained


def _model(args: argparse.Namespace) -> dict:
    return {"head": backbones.resolve_head(args.head, args.backbone), "width": args.width}


def _bundle(p: Prepared, out: Path, trained: list[members_lib.TrainedStack]
            ) -> bundle_lib.Bundle:
    """The in-memory bundle of trained members (with the unfitted rule combiner)."""
    args, data = p.args, p.data
    return bundle_lib.Bundle(out, args.backbone, data.class_names, data.preprocess, p.tasks,
                             [t.stack for t in trained], [t.variables for t in trained],
                             strategy_lib.rule_combiner(p.tasks, ovo_decision=args.ovo_decision),
                             None, None, "ensemble", bundle_lib._model_options(_model(args)))


def out_of_fold_outputs(p: Prepared, out: Path):
    """Member outputs for every training example from members trained without its fold.

    The (unique) training examples are split into --meta-folds stratified, patient-grouped
    folds; fold f's members train on the other folds (early stopping on the validation split,
    as the final members) and predict fold f. Returns member outputs, labels, example ids,
    the fold of each row and each fold's training ids: what `MetaClassifier.fit` needs to
    check that no row was predicted by a member that trained on it. Each fold's logs and
    checkpoints go under out/oof/fold-<f>/ (so --resume resumes them too; with --head-epochs
    each fold's members train in the same two phases, the first under fold-<f>/head/).
    """
    args, data = p.args, p.data
    train = np.unique(data.train_indices)
    folds = kfold_indices(data.dataset.labels[train], data.dataset.patient_ids[train],
                          k=args.meta_folds, seed=args.seed)
    outputs, labels, ids, fold_of, fold_train = [], [], [], [], []
    for f, (fit, held) in enumerate(folds):
        fold_dir = out / "oof" / f"fold-{f}"
        trained = train_members(p, fold_dir, train[fit]).stacks
        loader = make_loader(data.dataset.source, train[held], batch_size=args.batch_size,
                             preprocess=data.preprocess, shuffle=False, num_epochs=1,
                             drop_remainder=False)
        probs, y, idx = _bundle(p, fold_dir, trained).member_outputs(loader)
        outputs.append(probs)
        labels.append(y)
        ids.append(idx)
        fold_of.append(np.full(len(idx), f))
        fold_train.append(train[fit])
    members = [np.concatenate([o[m] for o in outputs]) for m in range(len(outputs[0]))]
    return (members, np.concatenate(labels), np.concatenate(ids), np.concatenate(fold_of),
            fold_train)


def _curves(trained: list[members_lib.TrainedStack], path: Path) -> None:
    """Learning curves averaged over all members (stacked records; sequential ones merged)."""
    by_epoch: dict[int, dict[str, list]] = {}
    for t in trained:
        for r in t.records:
            e = by_epoch.setdefault(r["epoch"], {"train_loss": [], "train_accuracy": [],
                                                 "val_loss": []})
            for k in e:
                e[k].extend(np.atleast_1d(r[k]).tolist())
    history = [{"epoch": e, **{k: float(np.mean(v)) for k, v in d.items()}}
               for e, d in sorted(by_epoch.items())]
    plot_curves(history, path)


def _variant(name: str, y, proba, pred, class_names) -> dict:
    m = evaluate_predictions(y, proba, class_names, y_pred=pred, n_bootstrap=0)
    return {"name": name, "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
            "roc_auc_macro": m["roc_auc_macro"]}


def run(strategy: str, argv: list[str] | None = None, description: str = "") -> Path:
    """Train, combine, evaluate and save one ensemble run; returns the run directory."""
    args = parse_args(strategy, argv, description)
    p = prepare(args, strategy)
    out = common.make_run_dir(args, strategy, args.backbone)
    data, tasks = p.data, p.tasks
    common.write_config(out, args, class_names=list(data.class_names), strategy=strategy,
                        member_names=list(tasks.names))
    result = train_members(p, out)
    trained = result.stacks
    _curves(trained, out / "curves.png")
    if result.head is not None:
        _curves(result.head, out / common.HEAD_PHASE / "curves.png")

    model = _model(args)
    stacks = bundle_lib.save_members(out, [t.stack for t in trained],
                                     [t.variables for t in trained])
    bundle = _bundle(p, out, trained)
    val_p, y_val, i_val = bundle.member_outputs(data.eval_loader("val", args.batch_size))
    test_p, y_test, i_test = bundle.member_outputs(data.eval_loader("test", args.batch_size))

    rule = bundle.combiner.fit(val_p, y_val)
    proba, pred = rule.predict_proba(test_p), rule.predict(test_p)
    ids = data.dataset.patient_ids[i_test]
    metrics = evaluate_predictions(y_test, proba, data.class_names, patient_ids=ids,
                                   seed=args.seed, y_pred=pred)
    variants = [_variant(f"{strategy} rule", y_test, proba, pred, data.class_names)]
    if strategy == "ovo":
        other = "coupling" if args.ovo_decision == "votes" else "votes"
        alt = strategy_lib.rule_combiner(tasks, ovo_decision=other)
        variants.append(_variant(f"ovo {other}", y_test, proba, alt.predict(test_p),
                                 data.class_names))
    if strategy == "cascade":
        tuned = strategy_lib.rule_combiner(tasks, target_sensitivity=args.target_sensitivity)
        tuned.fit(val_p, y_val)
        v = _variant(f"cascade thresholded (stage-1 sensitivity >= {args.target_sensitivity} "
                     f"on val, t={tuned.threshold_:.3f})", y_test, tuned.predict_proba(test_p),
                     tuned.predict(test_p), data.class_names)
        variants.append(v)
    meta_saved = None
    if args.meta != "none":
        meta = MetaClassifier(model=META_MODELS[args.meta], random_state=args.seed)
        if args.meta_folds:
            fit_p, y_fit, i_fit, fold, fold_train = out_of_fold_outputs(p, out)
            source = f"{args.meta_folds}-fold out-of-fold member outputs"
        else:
            fit_p, y_fit, i_fit, fold, fold_train = val_p, y_val, i_val, None, data.train_indices
            source = "validation member outputs"
        x_fit, layout = make_features({strategy: fit_p})
        meta.fit(x_fit, y_fit, example_indices=i_fit, train_indices=fold_train, fold=fold,
                 layout=layout, n_classes=len(data.class_names))
        mp = meta.predict_proba(meta.features({strategy: test_p}))
        variants.append(_variant(f"meta {args.meta} (fit on {source})",
                                 y_test, mp, mp.argmax(1), data.class_names))
        meta_saved = meta.save(out / meta.file_name).name

    scaler = TemperatureScaling().fit(np.log(np.clip(rule.predict_proba(val_p), 1e-12, 1)),
                                      y_val)
    calib = scaler.report(np.log(np.clip(proba, 1e-12, 1)), y_test).as_dict()
    metrics["temperature_scaling"] = calib
    metrics["variants"] = variants
    metrics["strategy"], metrics["backbone"] = strategy, args.backbone
    metrics["best_epoch_per_member"] = _best_epochs(tasks, trained)
    if result.head is not None:
        metrics["head_phase"] = {"epochs": args.head_epochs, "freeze": "head",
                                 "best_epoch_per_member": _best_epochs(tasks, result.head)}

    (out / bundle_lib.COMBINER_FILE).write_text(json.dumps(
        {"rule": strategy_lib.combiner_to_json(rule), "temperature": calib["temperature"]},
        indent=1) + "\n")
    np.savez(out / "outputs.npz", class_names=np.array(data.class_names),
             train_indices=data.train_indices, val_index=i_val, val_label=y_val,
             test_index=i_test, test_label=y_test, test_proba=proba, test_pred=pred,
             test_patient_id=ids,
             **{f"val_member_{m}": v for m, v in enumerate(val_p)},
             **{f"test_member_{m}": v for m, v in enumerate(test_p)})
    section = bundle_lib.bundle_section(
        strategy=strategy, backbone=args.backbone, model=model, class_names=data.class_names,
        preprocess=data.preprocess, tasks=tasks, stacks=stacks, meta=meta_saved)
    write_report(metrics, out, y_true=y_test, proba=proba,
                 title=f"{strategy} ensemble of {args.backbone} on {args.dataset}",
                 extra_sections=_sections(tasks, variants, calib, args))
    common.write_config(out, args, class_names=list(data.class_names), strategy=strategy,
                        member_names=list(tasks.names), bundle=section)
    return out


def _best_epochs(tasks, trained: list[members_lib.TrainedStack]) -> dict[str, int]:
    """Each member's best epoch (1-based; 0: never improved) by member name."""
    return {tasks.names[m]: int(e) + 1 for t in trained
            for m, e in zip(t.stack.members, t.best_epoch, strict=True)}


def _sections(tasks, variants: list[dict], calib: dict, args) -> dict[str, str]:
    def f(x):
        return "n/a" if x is None else f"{x:.3f}"
    rows = ["| combiner | accuracy | macro-F1 | ROC-AUC (macro) |", "|---|---|---|---|"]
    rows += [f"| {v['name']} | {f(v['accuracy'])} | {f(v['macro_f1'])} | "
             f"{f(v['roc_auc_macro'])} |" for v in variants]
    cal = (f"Temperature T = {calib['temperature']:.3f} fitted on validation (combined "
           f"log-probabilities). Test NLL {calib['nll_before']:.4f} -> {calib['nll_after']:.4f}, "
           f"ECE {calib['ece_before']:.4f} -> {calib['ece_after']:.4f}. The headline metrics "
           "above are uncalibrated (T changes confidence, never the decision).")
    members = (f"{len(tasks.names)} members ({', '.join(tasks.names)}), trained "
               f"{args.members} with per-member early stopping on validation loss")
    if args.head_epochs:
        members += (f", in two phases: the head alone for {args.head_epochs} epoch(s) (logs "
                    f"in head/), then --freeze {args.freeze} for up to {args.epochs} epoch(s) "
                    "from each member's best head-phase weights with a fresh optimizer")
    members += "."
    return {"Members": members, "Combiners": "\n".join(rows), "Temperature scaling": cal}


def main(strategy: str, description: str, argv: list[str] | None = None) -> int:
    """CLI entry: run, print where the report is; bad input -> `error: ...`, exit code 2."""
    try:
        out = run(strategy, argv, description)
    except (*common.CLI_ERRORS, bundle_lib.BundleError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"report: {out / 'report.md'}")
    return 0
