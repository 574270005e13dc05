"""One typed run configuration: data, model, training and ensemble settings.

Every run, from the CLIs or from Python, is described by a `RunConfig`; `config.json` is that
config serialised (`to_dict`) and a run can be recreated from it (`from_dict`). Settings left
as None take the default of the backbone's family from `FAMILY_DEFAULTS` (the one table of
per-family defaults) or, for the "auto" preprocessing fields, follow --pretrained.

    cfg = make_config("ova", backbone="resnet50", epochs=5, pretrained="imagenet")
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

import backbones
from backbones import pretrained as pretrained_lib
from backbones import training
from backbones.training import distributed
from data_pipeline.datasets import DATASETS
from data_pipeline.preprocess import NORMALIZATIONS as _ALL_NORMALIZATIONS
from data_pipeline.splits import SPLIT_RECIPES

STRATEGIES = ("single", "ova", "ovo", "cascade")
MEMBER_MODES = ("stacked", "sequential")
MEMBER_DATA = ("own", "shared")
BALANCE_MODES = ("none", "downsample", "oversample", "class_weights")
NORMALIZATIONS = _ALL_NORMALIZATIONS   # "dataset": the training split's mean/std (build_data)
# none; the masks the dataset ships; masks predicted by a segmenter run (ensembles.segmenter)
LUNG_MASKS = ("none", "dataset", "auto")
META_MODELS = {"logreg": "logistic", "gboost": "gradient_boosting"}
# The preprocessing each Keras application was trained with (keras.applications.*.
# preprocess_input); pretrained runs use it unless a normalization is given.
PRETRAINED_NORMALIZATION = {"resnet50": "caffe", "vgg16": "caffe", "vgg19": "caffe",
                            "xception": "tf", "inception_v3": "tf", "densenet121": "torch"}

# Defaults per backbone family, measured on this project's 2-core CPU (README, "Measured").
# The custom CNNs learn synthetic_cxr in a few minutes (macro-F1 >= 0.8 for ova/ovo/cascade:
# tests/test_ensemble_accuracy.py); the ImageNet architectures get the budget
# benchmarks/first_run.py measures: the README's main command (ResNet50 from scratch) learns
# synthetic_cxr in a few minutes, augmentation off for the phantoms.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "custom_cnn": {"image_size": 32, "count": 2000, "epochs": 15, "batch_size": 32},
    "imagenet": {"image_size": 32, "count": 1200, "epochs": 5, "batch_size": 16},
}
# Changes to a family's defaults for one strategy, measured the same way: a cascade trains 2
# ImageNet-architecture members where OvA trains 4, so in less wall time its members get twice
# the epochs (at 5 they were still improving and 2 of 3 seeds ended under macro-F1 0.8). OvO's
# 6 members one after another on CPU: at 5 epochs 4 of 6 still had their best validation loss
# at the last epoch (seeds 0-2: 0.802-0.811 under YNNPACK convolutions, seed 0 0.773 under the
# Eigen default); at 6 epochs 0.817-0.839 in 8.2-8.4 min; a 6th epoch costs about a minute.
STRATEGY_DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    ("imagenet", "cascade"): {"epochs": 10},
    ("imagenet", "ovo"): {"epochs": 6},
}


OPERATING_TARGETS = ("sensitivity", "specificity", "youden")


@dataclasses.dataclass(frozen=True)
class OperatingPoint:
    """What the per-class thresholds aim for: a target sensitivity or specificity, or Youden."""

    target: str = "youden"
    value: float | None = None

    def __str__(self) -> str:
        return self.target if self.value is None else f"{self.target}={self.value:g}"


def parse_operating_point(text: str) -> OperatingPoint:
    """`sensitivity=0.95`, `specificity=0.9` or `youden` -> OperatingPoint; ValueError else."""
    name, _, value = text.strip().partition("=")
    if name == "youden" and not value:
        return OperatingPoint("youden")
    if name in ("sensitivity", "specificity") and value:
        try:
            v = float(value)
        except ValueError:
            v = float("nan")
        if 0 < v <= 1:
            return OperatingPoint(name, v)
    raise ValueError(f"operating point {text!r} must be sensitivity=S or specificity=S with S "
                     f"in (0, 1], or youden")


def family(backbone: str) -> str:
    """"custom_cnn" or "imagenet": the row of FAMILY_DEFAULTS a backbone takes."""
    return "custom_cnn" if backbones.is_custom_cnn(backbone) else "imagenet"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which images, how they are split, balanced, preprocessed and augmented."""

    dataset: str = "synthetic_cxr"
    data_dir: str | None = None
    cache_dir: str | None = None
    count: int | None = None                 # synthetic_cxr examples (family default)
    classes: tuple[str, ...] | None = None   # canonical classes to keep, in order
    image_size: int | None = None            # family default
    channels: int | None = None              # auto: 3 when pretrained, else 1
    normalization: str | None = None         # auto: the backbone's preset when pretrained
    clahe: bool = False
    lung_mask: str = "none"                  # none | dataset (its masks) | auto (segmenter)
    segmenter: str | None = None             # segmenter run folder, with lung_mask auto
    split_recipe: str = "70/15/15"
    balance: str = "class_weights"
    augment: bool | None = None              # auto: on, except for synthetic_cxr (see resolve)
    workers: int = 0
    quality_max: float | None = None         # drop images with a BRISQUE score above it
    quality_drop_worst: float | None = None  # drop this fraction of worst BRISQUE scores


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The backbone every member uses, its head, weights and freeze policy."""

    backbone: str = "simple_cnn"
    head: str = "auto"
    width: float | None = None
    pretrained: str | None = None            # "imagenet" or a Keras .h5 file
    freeze: str = "full"
    head_epochs: int = 0
    precision: str = "auto"


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """Optimisation, early stopping, checkpoints and how members and devices are used."""

    epochs: int | None = None                # family default
    batch_size: int | None = None            # global; family default
    lr: float = 1e-3
    optimizer: str = "adam"
    schedule: str = "warmup_cosine"
    warmup_epochs: float = 0.5
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    clip_norm: float | None = None
    monitor: str = "val_loss"
    early_stopping_patience: int = 3
    parallel: str = "shard_map"
    members: str = "auto"                    # stacked | sequential | auto
    member_data: str = "auto"                # own | shared | auto (see resolve)
    keep_checkpoints: int = 2
    seed: int = 0
    progress: bool = True
    coordinator: str | None = None           # HOST:PORT of process 0 (several processes)
    num_processes: int | None = None
    process_id: int | None = None


@dataclasses.dataclass(frozen=True)
class EnsembleConfig:
    """The strategy, its combiner options and the optional stacking meta-classifier."""

    strategy: str = "ova"
    meta: str = "none"                       # none | logreg | gboost
    meta_folds: int = 0
    healthy: str = "normal"
    ovo_decision: str = "votes"
    target_sensitivity: float = 0.95
    operating_point: str = "youden"          # per-class thresholds: youden | sensitivity=S |
                                             # specificity=S (ensembles.operating_points)
    min_per_class: int = 2
    n_bootstrap: int = 1000


SECTIONS = {"data": DataConfig, "model": ModelConfig, "training": TrainingConfig,
            "ensemble": EnsembleConfig}
# Settings that say how a run executes, not what it computes (a resume may change them).
RUN_ONLY = {("data", "cache_dir"), ("data", "workers"), ("training", "progress"),
            ("training", "coordinator"), ("training", "num_processes"),
            ("training", "process_id")}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that defines one run."""

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    ensemble: EnsembleConfig = EnsembleConfig()

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """JSON-ready sections (tuples as lists)."""
        return {name: {k: list(v) if isinstance(v, tuple) else v
                       for k, v in dataclasses.asdict(getattr(self, name)).items()}
                for name in SECTIONS}

    @classmethod
    def from_dict(cls, doc: dict) -> RunConfig:
        """Rebuild a config written by `to_dict` (unknown keys are an error)."""
        sections = {}
        for name, kind in SECTIONS.items():
            values = dict(doc.get(name, {}))
            fields = {f.name for f in dataclasses.fields(kind)}
            unknown = sorted(set(values) - fields)
            if unknown:
                raise ValueError(f"config section {name!r} has unknown settings {unknown}")
            if name == "training":   # written before member_data existed: shared batches
                values.setdefault("member_data", "shared")
            if name == "data" and values.get("classes") is not None:
                values["classes"] = tuple(values["classes"])
            sections[name] = kind(**values)
        return cls(**sections)

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with settings changed by name, whichever section holds them."""
        return _apply(self, changes)

    def differences(self, other: RunConfig) -> list[str]:
        """`section.name: theirs vs ours` (the other config's value first) for every
        computed setting that differs."""
        a, b = self.to_dict(), other.to_dict()
        return [f"{s}.{k}: {b[s][k]!r} vs {a[s][k]!r}" for s in SECTIONS for k in a[s]
                if (s, k) not in RUN_ONLY and a[s][k] != b[s][k]]


def _apply(config: RunConfig, changes: dict[str, Any]) -> RunConfig:
    updates: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for key, value in changes.items():
        owners = [n for n, kind in SECTIONS.items()
                  if key in {f.name for f in dataclasses.fields(kind)}]
        if not owners:
            raise ValueError(f"unknown setting {key!r}")
        updates[owners[0]][key] = value
    return RunConfig(**{name: dataclasses.replace(getattr(config, name), **updates[name])
                        for name in SECTIONS})


def make_config(strategy: str = "ova", **settings: Any) -> RunConfig:
    """A checked, fully resolved config: `settings` by name (any section's field), the
    backbone family's defaults for the rest, the auto fields filled in."""
    return resolve(_apply(RunConfig(ensemble=EnsembleConfig(strategy=strategy)), settings))


def defaults_for(backbone: str, strategy: str | None = None) -> dict[str, Any]:
    """The settings a run of `strategy` with `backbone` uses where none is given."""
    kind = family(backbone)
    return {**FAMILY_DEFAULTS[kind], **STRATEGY_DEFAULTS.get((kind, strategy), {})}


def resolve(config: RunConfig) -> RunConfig:
    """Join the processes the config names (before anything asks JAX for its backend), fill
    family defaults, the auto preprocessing and --members auto; then `check`."""
    t = config.training
    distributed.initialize(t.coordinator, t.num_processes, t.process_id)
    backbone = config.model.backbone
    if backbone not in backbones.names():
        raise ValueError(f"unknown backbone {backbone!r}; choose one of "
                         f"{', '.join(backbones.names())}")
    fill = {k: v for k, v in defaults_for(backbone, config.ensemble.strategy).items()
            if getattr(config.data, k, getattr(config.training, k, None)) is None}
    config = _apply(config, fill)
    pretrained = bool(config.model.pretrained) and backbone in PRETRAINED_NORMALIZATION
    channels = config.data.channels or (3 if pretrained else 1)
    normalization = config.data.normalization
    if normalization is None:
        preset = PRETRAINED_NORMALIZATION[backbone] if pretrained else "unit"
        if channels == 1 and preset in ("caffe", "torch"):
            raise ValueError(f"pretrained {backbone} with 1 channel: its preset {preset!r} has "
                             f"per-channel constants; use 3 channels or give a normalization "
                             f"(tf, unit or xray)")
        normalization = preset
    members, member_data = config.training.members, config.training.member_data
    ovo = config.ensemble.strategy == "ovo"
    if members == "auto":
        # On CPU every backbone trains its members one after another: vmapped members become
        # grouped convolutions there, slower than K plain steps (ResNet50, 32 px, batch 16, on
        # 2026-12-03's Xeon: stacked 0.79x / 0.73x / 0.61x the sequential speed for K = 2, 4,
        # 6; `benchmarks/ensemble_throughput.py`). Accelerators keep the stacked members.
        members = "sequential" if jax.default_backend() == "cpu" else "stacked"
    if member_data == "auto":
        # A custom CNN's OvO members trained one after another draw only their own pair's
        # examples: half the compute of masking half of every shared batch. The ImageNet
        # architectures keep shared batches: on their own pairs, ResNet50's first-run OvO
        # reached macro-F1 0.767 in 5.2 min (seed 0) against 0.802 in 7.6 min with shared
        # batches (`benchmarks/first_run.py`; stacked own batches of 8: 0.729-0.806).
        member_data = ("own" if ovo and members == "sequential"
                       and backbones.is_custom_cnn(backbone) else "shared")
    # The phantoms are drawn under random exposure, gamma, noise, blur and patient pose
    # already; augmenting them only slows the short first run. Real radiographs are augmented
    # unless told otherwise.
    augment = (config.data.dataset != "synthetic_cxr" if config.data.augment is None
               else config.data.augment)
    config = _apply(config, {"channels": channels, "normalization": normalization,
                             "members": members, "member_data": member_data,
                             "augment": augment})
    check(config)
    return config


def check(config: RunConfig) -> None:
    """One-line ValueError for any setting that cannot run, before anything is written."""
    d, m, t, e = config.data, config.model, config.training, config.ensemble
    for name, value in (("epochs", t.epochs), ("batch_size", t.batch_size),
                        ("image_size", d.image_size), ("count", d.count)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1")
    choices = {"dataset": (d.dataset, DATASETS),
               "split_recipe": (d.split_recipe, SPLIT_RECIPES),
               "balance": (d.balance, BALANCE_MODES),
               "normalization": (d.normalization, NORMALIZATIONS),
               "lung_mask": (d.lung_mask, LUNG_MASKS),
               "channels": (d.channels, (1, 3)), "head": (m.head, ("auto", *backbones.HEADS)),
               "precision": (m.precision, training.PRECISIONS),
               "optimizer": (t.optimizer, training.OPTIMIZERS),
               "schedule": (t.schedule, training.SCHEDULES),
               "monitor": (t.monitor, tuple(training.MONITORS)),
               "parallel": (t.parallel, training.PARALLEL_MODES),
               "members": (t.members, MEMBER_MODES), "member_data": (t.member_data, MEMBER_DATA),
               "strategy": (e.strategy, STRATEGIES),
               "meta": (e.meta, ("none", *META_MODELS)),
               "ovo_decision": (e.ovo_decision, ("votes", "coupling"))}
    for name, (value, allowed) in choices.items():
        if value is not None and value not in allowed:
            raise ValueError(f"{name} {value!r} is not one of {', '.join(map(str, allowed))}")
    training.parse_policy(m.freeze)
    parse_operating_point(e.operating_point)
    for name, value, ok, rule in _RANGES(config):
        if value is not None and not ok(value):
            raise ValueError(f"{name} must be {rule}; got {value}")
    if (d.lung_mask == "auto") != (d.segmenter is not None):
        raise ValueError("lung_mask auto and segmenter RUN go together (the segmenter predicts "
                         "the masks)")
    if e.meta_folds and (e.meta == "none" or e.meta_folds < 2):
        raise ValueError("meta_folds needs a meta-classifier and K >= 2 (0 fits it on the "
                         "validation outputs)")
    if m.pretrained and m.backbone not in pretrained_lib.KERAS:
        raise ValueError(f"pretrained: {m.backbone} has no ImageNet weights; Keras publishes "
                         f"them for {', '.join(pretrained_lib.KERAS)}")


def _RANGES(config: RunConfig) -> list[tuple[str, Any, Any, str]]:  # noqa: N802
    """(setting, value, test, rule) for every numeric setting with a meaningful range."""
    d, m, t, e = config.data, config.model, config.training, config.ensemble
    return [
        ("image_size", d.image_size, lambda v: 8 <= v <= 2048, "in [8, 2048] pixels"),
        ("workers", d.workers, lambda v: v >= 0, ">= 0"),
        ("quality_drop_worst", d.quality_drop_worst, lambda v: 0 <= v < 1, "in [0, 1)"),
        ("width", m.width, lambda v: v > 0, "> 0"),
        ("head_epochs", m.head_epochs, lambda v: v >= 0, ">= 0"),
        ("lr", t.lr, lambda v: 0 < v <= 10, "in (0, 10]"),
        ("warmup_epochs", t.warmup_epochs, lambda v: v >= 0, ">= 0"),
        ("weight_decay", t.weight_decay, lambda v: v >= 0, ">= 0"),
        ("label_smoothing", t.label_smoothing, lambda v: 0 <= v < 1, "in [0, 1)"),
        ("clip_norm", t.clip_norm, lambda v: v > 0, "> 0 (or unset)"),
        ("early_stopping_patience", t.early_stopping_patience, lambda v: v >= 0,
         ">= 0 (0: never stop)"),
        ("keep_checkpoints", t.keep_checkpoints, lambda v: v >= 1, ">= 1 (resume needs one)"),
        ("meta_folds", e.meta_folds, lambda v: v >= 0, ">= 0"),
        ("target_sensitivity", e.target_sensitivity, lambda v: 0 < v <= 1, "in (0, 1]"),
        ("min_per_class", e.min_per_class, lambda v: v >= 1, ">= 1"),
        ("n_bootstrap", e.n_bootstrap, lambda v: v >= 0, ">= 0"),
    ]


def head_phase(config: RunConfig) -> RunConfig | None:
    """The config of the head-only first phase of head_epochs N (None when N is 0):
    everything as given except freeze "head", N epochs, warm-up at most half of them."""
    epochs = config.model.head_epochs
    if not epochs:
        return None
    return config.replace(freeze="head", epochs=epochs, head_epochs=0,
                          warmup_epochs=min(config.training.warmup_epochs, epochs / 2))
