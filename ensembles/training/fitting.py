"""Training every member of a strategy through the one engine, in one or two phases.

`plan_run` checks the data and the strategy before anything is written, and lays out each
member group's steps per epoch, own examples and each phase's optimiser schedule once
(`layouts`); `train_members` trains each group of the plan (`members.train_group` ->
`backbones.training.fit`) and writes the phase's metrics.jsonl, TensorBoard events and
curves.png; `out_of_fold_outputs` trains K-fold members and returns their member outputs on
the rows they never saw, for a meta-classifier fitted out of fold.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from backbones import training
from backbones.training import distributed
from backbones.training.curves import plot_curves
from backbones.training.metric_writer import MetricWriter
from data_pipeline.splits import kfold_indices
from ensembles.bundle import runtime
from ensembles.combine.groups import MemberGroup, plan
from ensembles.combine.tasks import Tasks
from ensembles.config import ConfigError, RunConfig, head_phase
from ensembles.training import build
from ensembles.training import members as members_lib

HEAD_PHASE = "head"  # run sub-directory of the head-only phase of head_epochs


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one member group trains on given training ids: steps per epoch, each member's own
    examples (member_data "own", else None) and each phase's optimiser (schedule sized)."""

    steps: int
    own: list[np.ndarray] | None
    optims: tuple[training.OptimConfig, ...]     # one per phase (`phases`)


@dataclasses.dataclass
class Plan:
    """Everything checked before the run directory is touched."""

    config: RunConfig
    data: build.Data
    tasks: Tasks
    groups: list[MemberGroup]
    layouts: list[Layout]      # per group, on data.train_indices


@dataclasses.dataclass
class Trained:
    """The members one training produced, and with head_epochs those of its head phase;
    `train_indices`: the ids their loaders drew from."""

    groups: list[members_lib.TrainedGroup]
    head: list[members_lib.TrainedGroup] | None = None
    train_indices: np.ndarray | None = None


def phases(config: RunConfig) -> list[RunConfig]:
    """The config of each training phase: the head-only one of head_epochs N, then `config`."""
    head = head_phase(config)
    return [config] if head is None else [head, config]


def plan_run(config: RunConfig, data: build.Data) -> Plan:
    """Tasks and member groups of the strategy on `data`; every bad input raises here."""
    e = config.ensemble
    build.check_weights(config)
    if e.meta != "none" and len(data.splits["val"]) == 0:
        raise ConfigError("a meta-classifier needs held-out (validation) data, and the split "
                          "has none")
    if e.meta_folds:   # a class with fewer patients than folds is refused here
        train = np.unique(data.train_indices)
        kfold_indices(data.dataset.labels[train], data.dataset.patient_ids[train],
                      k=e.meta_folds, seed=config.training.seed)
    train_labels = data.dataset.labels[data.train_indices]
    tasks, stacks = plan(e.strategy, data.class_names, train_labels,
                                      healthy=e.healthy, min_per_class=e.min_per_class,
                                      class_weighted=data.class_weighted)
    model, params = build.param_shapes(config)
    for phase in phases(config):   # each phase's freeze policy fits the model
        training.trainable_modules(params, phase.model.freeze, model)
    layouts = group_layouts(config, data, stacks, data.train_indices)
    check_memory(config, stacks)
    return Plan(config, data, tasks, stacks, layouts)


def group_layouts(config: RunConfig, data: build.Data, stacks: Sequence[MemberGroup],
                  indices: np.ndarray) -> list[Layout]:
    """Each group's layout on training ids `indices`; every phase's schedule is built here
    once (a bad schedule raises before anything trains)."""
    layouts = []
    for stack in stacks:
        steps, own = _own_examples(config, data, stack, indices)
        optims = tuple(build.optim_config(phase, steps) for phase in phases(config))
        for optim in optims:
            training.optim.make_schedule(optim)
        layouts.append(Layout(steps, own, optims))
    return layouts


def check_memory(config: RunConfig, stacks: Sequence[MemberGroup]) -> None:
    """ValueError, before anything compiles, when one train step would not fit in memory."""
    available = build.available_memory_bytes()
    if available is None:
        return
    stacked = config.training.members == "stacked"
    need = max(build.training_memory_bytes(config, s.num_classes, s.size if stacked else 1)
               for s in stacks)
    if need > available:
        t, d = config.training, config.data
        raise ConfigError(
            f"one training step needs about {need / 2**30:.1f} GiB (parameters, optimizer "
            f"state and activations at batch {t.batch_size}, {d.image_size} px"
            f"{', members stacked' if stacked else ''}), more than the "
            f"{available / 2**30:.1f} GiB available; lower the image size or batch size"
            f"{' or train members sequentially' if stacked else ''}")


def train_members(plan: Plan, out: Path, train_indices: np.ndarray | None = None) -> Trained:
    """Train every member group of the plan on `train_indices` (default: the training split).

    With head_epochs N, phase 1 (freeze "head", N epochs) trains into out/head/, and phase 2
    starts each member group from phase 1's best variables with a fresh optimizer and trains into
    `out`; a rerun over the same folder resumes either phase exactly (a finished phase only
    restores its checkpoints).
    """
    if train_indices is None:
        indices, layouts = plan.data.train_indices, plan.layouts
    else:
        indices = np.asarray(train_indices)
        layouts = group_layouts(plan.config, plan.data, plan.groups, indices)
    head = head_phase(plan.config)
    if head is None:
        return Trained(_train_phase(plan, plan.config, out, indices, layouts, 0),
                       train_indices=indices)
    first = _train_phase(plan, head, out / HEAD_PHASE, indices, layouts, 0)
    final = _train_phase(plan, plan.config, out, indices, layouts, 1,
                         [t.variables for t in first])
    return Trained(final, first, train_indices=indices)


def _train_phase(plan: Plan, config: RunConfig, out: Path, indices: np.ndarray,
                 layouts: Sequence[Layout], phase: int, init: list[dict] | None = None
                 ) -> list[members_lib.TrainedGroup]:
    """Phase `phase`: every group trained under `config` on `indices` as `layouts` say
    (from `init[s]` when given). Writes out/metrics.jsonl (the restored records and the new
    ones: one line per member-record), out/tensorboard/ and out/curves.png."""
    data, t = plan.data, config.training
    out.mkdir(parents=True, exist_ok=True)
    parallel = training.data_parallel(t.parallel)
    parallel.check_batch_size(t.batch_size)
    trained = []
    with MetricWriter(out) as writer:
        for s, (stack, layout) in enumerate(zip(plan.groups, layouts, strict=True)):
            steps, shared, own = _stack_data(config, data, stack, indices, layout)
            trained.append(members_lib.train_group(
                stack, make_state=build.make_state_fn(config, optim=layout.optims[phase],
                                                      pretrained=init is None),
                train_step=build.make_train_step(config, data),
                eval_step=training.make_eval_step(), parallel=parallel,
                train_data=shared, member_data=own,
                val_data=data.eval_loader("val", t.batch_size),
                config=build.fit_config(config, steps), key=jax.random.PRNGKey(t.seed),
                member_names=plan.tasks.names, mode=t.members,
                checkpoint_dir=out / "checkpoints" / f"stack-{s}",
                on_record=writer.write, init_variables=None if init is None else init[s]))
        writer.rewrite([r for ts in trained for r in ts.records])
    members = sum(len(t.group.members) for t in trained)
    if distributed.is_primary():
        plot_curves(mean_history(trained), out / "curves.png",
                    subtitle=f"{config.ensemble.strategy}, {config.model.backbone}: mean over "
                             f"{members} member(s), each on its own task")
    return trained


def _own_examples(config: RunConfig, data: build.Data, stack: MemberGroup,
                  indices: np.ndarray) -> tuple[int, list[np.ndarray] | None]:
    """Steps per epoch, and each member's own examples with member_data "own" (else None)."""
    batch = config.training.batch_size
    if config.training.member_data != "own":
        return len(indices) // batch, None
    own, steps = members_lib.own_examples(stack, indices, data.dataset.labels, batch)
    return steps, own


def _stack_data(config: RunConfig, data: build.Data, stack: MemberGroup,
                indices: np.ndarray, layout: Layout | None = None
                ) -> tuple[int, object, list | None]:
    """Steps per epoch, then the shared loader, or one loader per member over its own
    examples (`steps` batches an epoch) with member_data "own"."""
    steps, own = ((layout.steps, layout.own) if layout is not None else
                  _own_examples(config, data, stack, indices))
    if own is None:
        return steps, data.train_loader(config, indices), None
    records = steps * config.training.batch_size
    return steps, None, [data.train_loader(config, o, epoch_records=records) for o in own]


def mean_history(trained: Sequence[members_lib.TrainedGroup]) -> list[dict]:
    """Per epoch, every metric averaged over all members (for the learning curves)."""
    keys = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_macro_f1")
    by_epoch: dict[int, dict[str, list]] = {}
    for t in trained:
        for r in t.records:
            e = by_epoch.setdefault(r["epoch"], {k: [] for k in keys})
            for k in keys:
                if r.get(k) is not None:
                    e[k].extend(np.atleast_1d(r[k]).tolist())
    return [{"epoch": e, **{k: float(np.mean(v)) if v else None for k, v in d.items()}}
            for e, d in sorted(by_epoch.items())]


def best_epochs(tasks: Tasks, trained: Sequence[members_lib.TrainedGroup]) -> dict[str, int]:
    """Each member's best epoch (1-based; 0: never improved) by member name."""
    return {tasks.names[m]: int(e) for t in trained
            for m, e in zip(t.group.members, t.best_epoch, strict=True)}


@dataclasses.dataclass
class OutOfFold:
    """Member outputs for training examples from members that never saw them."""

    members: list[np.ndarray]      # per member [N, C_m] probabilities
    labels: np.ndarray
    indices: np.ndarray
    fold: np.ndarray               # the fold of each row
    fold_train: list[np.ndarray]   # the ids each fold's members trained on (their loaders')


def out_of_fold_outputs(plan: Plan, out: Path) -> OutOfFold:
    """K-fold out-of-fold member outputs over the (unique) training examples.

    The examples are split into meta_folds stratified, patient-grouped folds; fold f's members
    train on the other folds (early stopping on the validation split, as the final members)
    and predict fold f, through the same models and predict loop a bundle uses
    (`bundle.runtime.member_probabilities`). Each fold's logs and checkpoints go under
    out/oof/fold-<f>/, so a rerun resumes them too.
    """
    config, data = plan.config, plan.data
    train = np.unique(data.train_indices)
    folds = kfold_indices(data.dataset.labels[train], data.dataset.patient_ids[train],
                          k=config.ensemble.meta_folds, seed=config.training.seed)
    say = members_lib.printer(config.training.progress)
    outputs, labels, ids, fold_of, fold_train = [], [], [], [], []
    for f, (fit, held) in enumerate(folds):
        say(f"out-of-fold members: fold {f + 1} of {len(folds)}")
        trained = train_members(plan, out / "oof" / f"fold-{f}", train[fit])
        probs, y, idx = fold_outputs(plan, trained.groups,
                                     data.loader(train[held], config.training.batch_size))
        outputs.append(probs)
        labels.append(y)
        ids.append(idx)
        fold_of.append(np.full(len(idx), f))
        fold_train.append(np.asarray(trained.train_indices))
    members = [np.concatenate([o[m] for o in outputs]) for m in range(len(outputs[0]))]
    return OutOfFold(members, np.concatenate(labels), np.concatenate(ids),
                     np.concatenate(fold_of), fold_train)


def fold_outputs(plan: Plan, trained: Sequence[members_lib.TrainedGroup], loader
                 ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Member probabilities of freshly trained members over `loader`, through the models a
    bundle of this run rebuilds (`bundle.runtime`)."""
    stacks = [t.group for t in trained]
    applies = runtime.member_applies(plan.config.model.backbone,
                                     build.model_options(plan.config), stacks)
    return runtime.member_probabilities(applies, [t.variables for t in trained], stacks,
                                        loader)
