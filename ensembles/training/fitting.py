"""Training every member of a strategy through the one engine, in one or two phases.

`plan_run` checks the data and the strategy before anything is written; `train_members`
trains each stack of the plan (`ensembles.members.train_stack` -> `backbones.training.fit`)
and writes the phase's metrics.jsonl, TensorBoard events and curves.png;
`out_of_fold_outputs` trains K-fold members for a meta-classifier fitted out of fold.
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
from ensembles.training import build
from ensembles.training import members as members_lib
from ensembles.combine.groups import MemberGroup, plan
from ensembles.config import RunConfig, head_phase
from ensembles.combine.tasks import Tasks

HEAD_PHASE = "head"  # run sub-directory of the head-only phase of head_epochs


@dataclasses.dataclass
class Plan:
    """Everything checked before the run directory is touched."""

    config: RunConfig
    data: build.Data
    tasks: Tasks
    stacks: list[MemberGroup]


@dataclasses.dataclass
class Trained:
    """The members one training produced, and with head_epochs those of its head phase."""

    stacks: list[members_lib.TrainedStack]
    head: list[members_lib.TrainedStack] | None = None


def phases(config: RunConfig) -> list[RunConfig]:
    """The config of each training phase: the head-only one of head_epochs N, then `config`."""
    head = head_phase(config)
    return [config] if head is None else [head, config]


def plan_run(config: RunConfig, data: build.Data) -> Plan:
    """Tasks and stacks of the strategy on `data`; every bad input raises here."""
    e = config.ensemble
    build.check_weights(config)
    if e.meta != "none" and len(data.splits["val"]) == 0:
        raise ValueError("a meta-classifier needs held-out (validation) data, and the split "
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
    for stack in stacks:
        steps, _ = _own_examples(config, data, stack, data.train_indices)
        for phase in phases(config):   # each phase's schedule and freeze policy fit the model
            training.optim.make_schedule(build.optim_config(phase, steps))
            training.trainable_modules(params, phase.model.freeze, model)
    check_memory(config, stacks)
    return Plan(config, data, tasks, stacks)


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
        raise ValueError(
            f"one training step needs about {need / 2**30:.1f} GiB (parameters, optimizer "
            f"state and activations at batch {t.batch_size}, {d.image_size} px"
            f"{', members stacked' if stacked else ''}), more than the "
            f"{available / 2**30:.1f} GiB available; lower the image size or batch size"
            f"{' or train members sequentially' if stacked else ''}")


def train_members(plan: Plan, out: Path, train_indices: np.ndarray | None = None) -> Trained:
    """Train every stack of the plan on `train_indices` (default: the training split).

    With head_epochs N, phase 1 (freeze "head", N epochs) trains into out/head/, and phase 2
    starts each stack from phase 1's best variables with a fresh optimizer and trains into
    `out`; a rerun over the same folder resumes either phase exactly (a finished phase only
    restores its checkpoints).
    """
    head = head_phase(plan.config)
    if head is None:
        return Trained(_train_phase(plan, plan.config, out, train_indices))
    first = _train_phase(plan, head, out / HEAD_PHASE, train_indices)
    final = _train_phase(plan, plan.config, out, train_indices, [t.variables for t in first])
    return Trained(final, first)


def _train_phase(plan: Plan, config: RunConfig, out: Path, train_indices: np.ndarray | None,
                 init: list[dict] | None = None) -> list[members_lib.TrainedStack]:
    """One phase: every stack trained under `config` (from `init[s]` when given). Writes
    out/metrics.jsonl (the restored records and the new ones: one line per member-record),
    out/tensorboard/ and out/curves.png."""
    data, t = plan.data, config.training
    out.mkdir(parents=True, exist_ok=True)
    indices = data.train_indices if train_indices is None else train_indices
    parallel = training.data_parallel(t.parallel)
    parallel.check_batch_size(t.batch_size)
    trained = []
    with MetricWriter(out) as writer:
        for s, stack in enumerate(plan.stacks):
            steps, shared, own = _stack_data(config, data, stack, indices)
            trained.append(members_lib.train_stack(
                stack, make_state=build.make_state_fn(config, steps, pretrained=init is None),
                train_step=build.make_train_step(config, data),
                eval_step=training.make_eval_step(), parallel=parallel,
                train_data=shared, member_data=own,
                val_data=data.eval_loader("val", t.batch_size),
                config=build.fit_config(config, steps), key=jax.random.PRNGKey(t.seed),
                member_names=plan.tasks.names, mode=t.members,
                checkpoint_dir=out / "checkpoints" / f"stack-{s}",
                on_record=writer.write, init_variables=None if init is None else init[s]))
        writer.rewrite([r for ts in trained for r in ts.records])
    members = sum(len(t.stack.members) for t in trained)
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
                indices: np.ndarray) -> tuple[int, object, list | None]:
    """Steps per epoch, then the shared loader, or one loader per member over its own
    examples (`steps` batches an epoch) with member_data "own"."""
    steps, own = _own_examples(config, data, stack, indices)
    if own is None:
        return steps, data.train_loader(config, indices), None
    records = steps * config.training.batch_size
    return steps, None, [data.train_loader(config, o, epoch_records=records) for o in own]


def mean_history(trained: Sequence[members_lib.TrainedStack]) -> list[dict]:
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


def best_epochs(tasks: Tasks, trained: Sequence[members_lib.TrainedStack]) -> dict[str, int]:
    """Each member's best epoch (1-based; 0: never improved) by member name."""
    return {tasks.names[m]: int(e) for t in trained
            for m, e in zip(t.stack.members, t.best_epoch, strict=True)}


@dataclasses.dataclass
class OutOfFold:
    """Member outputs for training examples from members that never saw them."""

    members: list[np.ndarray]      # per member [N, C_m]
    labels: np.ndarray
    indices: np.ndarray
    fold: np.ndarray               # the fold of each row
    fold_train: list[np.ndarray]   # each fold's training ids


def out_of_fold_outputs(plan: Plan, out: Path, member_outputs) -> OutOfFold:
    """K-fold out-of-fold member outputs over the (unique) training examples.

    The examples are split into meta_folds stratified, patient-grouped folds; fold f's members
    train on the other folds (early stopping on the validation split, as the final members) and
    `member_outputs(trained, loader)` predicts fold f. Each fold's logs and checkpoints go
    under out/oof/fold-<f>/, so a rerun resumes them too.
    """
    config, data = plan.config, plan.data
    train = np.unique(data.train_indices)
    folds = kfold_indices(data.dataset.labels[train], data.dataset.patient_ids[train],
                          k=config.ensemble.meta_folds, seed=config.training.seed)
    outputs, labels, ids, fold_of, fold_train = [], [], [], [], []
    for f, (fit, held) in enumerate(folds):
        trained = train_members(plan, out / "oof" / f"fold-{f}", train[fit]).stacks
        probs, y, idx = member_outputs(trained, data.loader(train[held],
                                                            config.training.batch_size))
        outputs.append(probs)
        labels.append(y)
        ids.append(idx)
        fold_of.append(np.full(len(idx), f))
        fold_train.append(train[fit])
    members = [np.concatenate([o[m] for o in outputs]) for m in range(len(outputs[0]))]
    return OutOfFold(members, np.concatenate(labels), np.concatenate(ids),
                     np.concatenate(fold_of), fold_train)
