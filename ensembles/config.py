"""One typed run configuration: data, model, training and ensemble settings.

Every run, from the CLIs or from Python, is a `RunConfig`; config.json is `to_dict`, read back
by `from_dict`. Each setting is one field declared once with `setting(...)`: its default (per
backbone family where it depends on it), help, choices and valid range; the CLIs generate
their flags from the fields (experiments/common.py) and FAMILY_DEFAULTS is read off them.
`resolve` (in `make_config`) fills the family defaults and every "auto", so config.json
records what ran; precision and members follow the JAX backend (`join_cluster` first).

    cfg = make_config("ova", backbone="resnet50", epochs=5, pretrained="imagenet")
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

import backbones
from backbones import pretrained as pretrained_lib
from backbones import training
from backbones.training import distributed
from data_pipeline import classes as classes_lib
from data_pipeline import layouts
from data_pipeline.datasets import DATASETS
from data_pipeline.preprocess import NORMALIZATIONS as _ALL_NORMALIZATIONS
from data_pipeline.splits import SPLIT_RECIPES


class ConfigError(ValueError):
    """A setting, or what it names, that cannot be used: the user's to fix (CLIs: exit 2)."""


STRATEGIES = ("single", "ova", "ovo", "cascade")
MEMBER_MODES = ("stacked", "sequential")
MEMBER_DATA = ("own", "shared")
BALANCE_MODES = ("none", "downsample", "oversample", "class_weights")
NORMALIZATIONS = _ALL_NORMALIZATIONS   # "dataset": the training split's mean/std (build_data)
LUNG_MASKS = ("none", "dataset", "auto")   # none, the dataset's own, a segmenter's
META_MODELS = {"logreg": "logistic", "gboost": "gradient_boosting"}
# Each Keras application's preprocess_input: pretrained runs use it unless told otherwise.
PRETRAINED_NORMALIZATION = {"resnet50": "caffe", "vgg16": "caffe", "vgg19": "caffe",
                            "xception": "tf", "inception_v3": "tf", "densenet121": "torch"}
FAMILIES = {"custom_cnn": "custom CNNs", "imagenet": "ImageNet backbones"}
LAYOUTS = ("covid19_radiography", "chest_xray_pneumonia", "image_folder")   # dataset_for
LAUNCH = ("coordinator", "num_processes", "process_id")   # which processes take part
HARDWARE_AUTO = ("members", "member_data", "precision")   # auto picked by the JAX backend


def setting(default: Any = None, help: str = "", **meta: Any) -> Any:  # noqa: A002
    """A field: its default, written here once, and what --help and `check` need. meta:
    choices (tuple or function), auto (what None / "auto" becomes), shown (the default in
    words), family ({family: default}; the field's default is then None), strategy
    ({(family, strategy): default}), valid ((test, rule)), flag / metavar / group / const
    (the CLI's spelling), cli=False (no flag)."""
    return dataclasses.field(default=default, metadata={"help": help, **meta})


def _interval(text: str, note: str = "") -> tuple[Callable[[Any], bool], str]:
    lo, hi = (float(x) for x in text[1:-1].split(","))
    return (lambda v: (lo <= v if text[0] == "[" else lo < v)
            and (v <= hi if text[-1] == "]" else v < hi)), f"in {text}{note}"


def _at_least(low: int, note: str = "") -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= low), f">= {low}{note}"


_POSITIVE = ((lambda v: v > 0), "> 0")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which images, how they are split, balanced, preprocessed and augmented."""

    dataset: str | None = setting(None, "which images", choices=DATASETS, auto=(
        "synthetic_cxr, or the layout --data-dir holds: covid19_radiography, "
        "chest_xray_pneumonia or image_folder"))
    data_dir: str | None = setting(None, "source folder of a real dataset")
    cache_dir: str | None = setting(None, "where built datasets are cached",
                                    shown="$CXR_ENSEMBLES_CACHE, else ~/.cache/cxr-ensembles/tfds")
    count: int | None = setting(None, "synthetic_cxr: examples", valid=_at_least(1),
                                family={"custom_cnn": 2000, "imagenet": 1200})
    classes: tuple[str, ...] | None = setting(None, "comma-separated canonical classes to keep",
                                              shown="all found")
    image_size: int | None = setting(None, "image side", family={"custom_cnn": 32, "imagenet": 32},
                                     valid=_interval("[8, 2048]", " pixels"))
    channels: int | None = setting(None, "input channels", choices=(1, 3),
                                   auto="3 with --pretrained, the gray image repeated; else 1")
    normalization: str | None = setting(
        None, "dataset: the training split's mean/std (saved in the bundle)",
        choices=NORMALIZATIONS, auto="the backbone's ImageNet preset with --pretrained, else unit")
    clahe: bool = setting(False, "CLAHE before resizing")
    lung_mask: str = setting("none", "zero the image outside the lungs: with the masks the "
                             "dataset ships (--lung-mask alone), or auto: masks predicted by "
                             "--segmenter", choices=LUNG_MASKS, const="dataset")
    segmenter: str | None = setting(None, "with --lung-mask auto: a run of python -m "
                                    "experiments.segment", metavar="RUN")
    split_recipe: str = setting("70/15/15", "train/val/test shares, patient-grouped; source: the "
                                "dataset's own test folder (Kermany's test/) is the test split, "
                                "the rest 85/15", choices=SPLIT_RECIPES)
    balance: str = setting("class_weights", "class_weights: every member weights its classes "
                           "over its own training examples", choices=BALANCE_MODES)
    augment: bool | None = setting(None, "augment the training images",
                                   auto="on, except for synthetic_cxr, whose phantoms vary already")
    workers: int = setting(0, "Grain worker processes", valid=_at_least(0))
    quality_max: float | None = setting(None, "drop images whose BRISQUE score is above SCORE "
                                        "(0 ~ pristine, higher = more distorted) before "
                                        "splitting", metavar="SCORE")
    quality_drop_worst: float | None = setting(
        None, "drop this fraction of the images with the worst BRISQUE scores before splitting",
        metavar="FRACTION", valid=_interval("[0, 1)"))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The backbone every member uses, its head, weights and freeze policy."""

    backbone: str = setting("simple_cnn", "backbone of every member", choices=backbones.names)
    head: str = setting("auto", "classifier head", choices=lambda: ("auto", *backbones.HEADS),
                        auto="the custom CNNs' published top (imagenet), linear otherwise")
    width: float | None = setting(None, "channel multiplier (custom CNNs only)", shown="1",
                                  valid=_POSITIVE)
    pretrained: str | None = setting(
        None, 'Keras ImageNet weights: "imagenet" (the file in $CXR_ENSEMBLES_WEIGHTS or '
        '~/.cache/cxr-ensembles/weights/) or a file PATH; see docs/transfer_learning.md',
        shown="none, a random initialisation")
    freeze: str = setting("full", "full | head | last:N")
    head_epochs: int = setting(0, "two-phase fine-tuning: first train the head alone for N "
                               "epochs, then --epochs with --freeze and a fresh optimizer",
                               valid=_at_least(0))
    precision: str = setting("auto", "compute dtype", choices=training.PRECISIONS,
                             auto="bf16 on a GPU or TPU, fp32 on CPU")


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """Optimisation, early stopping, checkpoints and how members and devices are used."""

    # Per-family budgets measured on this project's CPU (docs/measured.md, "The figures"): the
    # custom CNNs learn synthetic_cxr in minutes; the ImageNet architectures get the budget of
    # the README's main command (benchmarks/first_run.py), a cascade (2 members, not 4) and OvO
    # (whose 6 members were still improving at 5) more epochs each.
    epochs: int | None = setting(None, "", family={"custom_cnn": 15, "imagenet": 5},
                                 strategy={("imagenet", "cascade"): 10, ("imagenet", "ovo"): 6},
                                 valid=_at_least(1))
    batch_size: int | None = setting(None, "global batch size", valid=_at_least(1),
                                     family={"custom_cnn": 32, "imagenet": 16})
    lr: float = setting(1e-3, "peak learning rate", valid=_interval("(0, 10]"))
    optimizer: str = setting("adam", "", choices=training.OPTIMIZERS)
    schedule: str = setting("warmup_cosine", "", choices=training.SCHEDULES)
    warmup_epochs: float = setting(0.5, "", valid=_at_least(0))
    weight_decay: float = setting(0.0, "", valid=_at_least(0))
    label_smoothing: float = setting(0.0, "", valid=_interval("[0, 1)"))
    clip_norm: float | None = setting(None, "global-norm clipping", shown="off",
                                      valid=((lambda v: v > 0), "> 0 (or unset)"))
    monitor: str = setting("val_loss", "what each member's early stopping and best epoch "
                           "follow", choices=tuple(training.MONITORS))
    early_stopping_patience: int = setting(3, "epochs without improvement before a member "
                                           "stops (0: never)",
                                           valid=_at_least(0, " (0: never stop)"))
    parallel: str = setting("shard_map", "", choices=training.PARALLEL_MODES)
    members: str = setting("auto", "train members together under vmap, or one after another",
                           choices=("auto", *MEMBER_MODES), auto="one after another on CPU, "
                           "where that is faster, stacked on a GPU or TPU")
    member_data: str = setting(
        "auto", "own: each member trains only on the classes it separates (an OvO member on "
        "its pair), the same steps per epoch for all; shared: every member sees every batch, "
        "other classes weighted 0", choices=("auto", *MEMBER_DATA),
        auto="own for a custom CNN's OvO trained one member after another, shared otherwise")
    keep_checkpoints: int = setting(2, "latest epochs kept on disk",
                                    valid=_at_least(1, " (resume needs one)"))
    seed: int = setting(0, "")
    progress: bool = setting(True, "no progress bars", flag="--no-progress", group="run")
    coordinator: str | None = setting(None, "address of process 0, which serves the "
                                      "coordination", metavar="HOST:PORT", group="processes")
    num_processes: int | None = setting(None, "how many processes take part", group="processes")
    process_id: int | None = setting(None, "this process's number, 0 .. N-1", group="processes")


@dataclasses.dataclass(frozen=True)
class EnsembleConfig:
    """The strategy, its combiner options and the optional stacking meta-classifier."""

    strategy: str = setting("ova", "", choices=STRATEGIES, cli=False)   # one per CLI module
    meta: str = setting("none", "also fit a meta-classifier on the validation member outputs",
                        choices=("none", *META_MODELS))
    meta_folds: int = setting(0, "with --meta: fit it on K-fold out-of-fold member outputs for "
                              "the training examples (K extra member trainings); 0 = validation",
                              valid=_at_least(0))
    healthy: str = setting("normal", "cascade: the healthy class")
    ovo_decision: str = setting("votes", "OvO: scikit-learn's vote rule or argmax of pairwise "
                                "coupling", choices=("votes", "coupling"))
    target_sensitivity: float = setting(0.95, "cascade: stage-1 sensitivity the thresholded "
                                        "variant is tuned to", valid=_interval("(0, 1]"))
    operating_point: str = setting("youden", "per-class thresholds chosen on validation, saved "
                                   "in the bundle and applied by predict and evaluate: youden, "
                                   "sensitivity=S or specificity=S")
    min_per_class: int = setting(2, "fewest training examples per member class",
                                 valid=_at_least(1))
    n_bootstrap: int = setting(1000, "bootstrap resamples for the test confidence intervals",
                               valid=_at_least(0))


SECTIONS = {"data": DataConfig, "model": ModelConfig, "training": TrainingConfig,
            "ensemble": EnsembleConfig}
FIELDS = {f.name: (section, f) for section, kind in SECTIONS.items()
          for f in dataclasses.fields(kind)}
# Settings that say how a run executes, not what it computes (a resume may change them).
RUN_ONLY = {("data", "cache_dir"), ("data", "workers"), ("training", "progress"),
            *(("training", k) for k in LAUNCH)}
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    kind: {n: f.metadata["family"][kind] for n, (_, f) in FIELDS.items() if "family" in f.metadata}
    for kind in FAMILIES}
STRATEGY_DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    key: {n: f.metadata["strategy"][key] for n, (_, f) in FIELDS.items()
          if key in f.metadata.get("strategy", {})}
    for key in sorted({k for _, f in FIELDS.values() for k in f.metadata.get("strategy", {})})}


def choices_of(name: str | dataclasses.Field) -> tuple | None:
    """The valid values of a setting (by name or field; None: any)."""
    choices = (FIELDS[name][1] if isinstance(name, str) else name).metadata.get("choices")
    return tuple(choices() if callable(choices) else choices) if choices is not None else None


def unknown_choice(name: str, value: Any, choices: Iterable[Any]) -> str:
    """"unknown backbone 'resnet5O'; did you mean resnet50?" (or the valid names)."""
    names = [str(c) for c in choices]
    close = difflib.get_close_matches(str(value), names, n=1)
    hint = f"did you mean {close[0]}?" if close else f"choose one of {', '.join(names)}"
    return f"unknown {name.strip('-').replace('_', ' ').replace('-', ' ')} {value!r}; {hint}"


@dataclasses.dataclass(frozen=True)
class OperatingPoint:
    """What the per-class thresholds aim for: a target sensitivity or specificity, or Youden."""

    target: str = "youden"
    value: float | None = None

    def __str__(self) -> str:
        return self.target if self.value is None else f"{self.target}={self.value:g}"


def parse_operating_point(text: str) -> OperatingPoint:
    """`sensitivity=0.95`, `specificity=0.9` or `youden` -> OperatingPoint; ConfigError else."""
    name, _, value = text.strip().partition("=")
    if name == "youden" and not value:
        return OperatingPoint("youden")
    v = float("nan")
    with contextlib.suppress(ValueError):
        v = float(value)
    if name in ("sensitivity", "specificity") and 0 < v <= 1:
        return OperatingPoint(name, v)
    raise ConfigError(f"operating point {text!r} must be sensitivity=S or specificity=S with S "
                      f"in (0, 1], or youden")


def family(backbone: str) -> str:
    """"custom_cnn" or "imagenet": the family whose defaults a backbone takes."""
    return "custom_cnn" if backbones.is_custom_cnn(backbone) else "imagenet"


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that defines one run. `hardware_auto` names the settings `resolve` picked
    by this machine's backend (not saved; a resume uses it: `for_resume`)."""

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    ensemble: EnsembleConfig = EnsembleConfig()
    hardware_auto: frozenset = dataclasses.field(default=frozenset(), compare=False, repr=False)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """JSON-ready sections (tuples as lists)."""
        return {name: {k: list(v) if isinstance(v, tuple) else v
                       for k, v in dataclasses.asdict(getattr(self, name)).items()}
                for name in SECTIONS}

    @classmethod
    def from_dict(cls, doc: dict) -> RunConfig:
        """Rebuild a config written by `to_dict` (unknown keys are an error; an older one's
        head "auto" reads resolved, its missing member_data as shared batches)."""
        sections = {}
        for name, kind in SECTIONS.items():
            values = dict(doc.get(name, {}))
            unknown = sorted(set(values) - {f.name for f in dataclasses.fields(kind)})
            if unknown:
                raise ConfigError(f"config section {name!r} has unknown settings {unknown}")
            if name == "training":
                values.setdefault("member_data", "shared")
            if name == "data" and values.get("classes") is not None:
                values["classes"] = tuple(values["classes"])
            if name == "model" and values.get("backbone") in backbones.names():
                values["head"] = backbones.resolve_head(values.get("head", "auto"),
                                                        values["backbone"])
            sections[name] = kind(**values)
        return cls(**sections)

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with settings changed by name, whichever section holds them."""
        return _apply(self, changes)

    def differences(self, other: RunConfig) -> list[str]:
        """`section.name: theirs vs ours` (the other config's value first) for every computed
        setting that differs; an older config's precision "auto" agrees with a picked one."""
        a, b = self.to_dict(), other.to_dict()
        auto = ("precision" in self.hardware_auto and b["model"]["precision"] == "auto") or (
            "precision" in other.hardware_auto and a["model"]["precision"] == "auto")
        return [f"{s}.{k}: {b[s][k]!r} vs {a[s][k]!r}" for s in SECTIONS for k in a[s]
                if (s, k) not in RUN_ONLY and a[s][k] != b[s][k]
                and not (auto and (s, k) == ("model", "precision"))]


def _apply(config: RunConfig, changes: dict[str, Any]) -> RunConfig:
    updates: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for key, value in changes.items():
        if key not in FIELDS:
            close = difflib.get_close_matches(key, FIELDS, n=1)
            raise ConfigError(f"unknown setting {key!r}" +
                              (f"; did you mean {close[0]}?" if close else ""))
        updates[FIELDS[key][0]][key] = value
    return RunConfig(**{name: dataclasses.replace(getattr(config, name), **updates[name])
                        for name in SECTIONS},
                     hardware_auto=config.hardware_auto - set(changes))


def _get(config: RunConfig, name: str) -> Any:
    return getattr(getattr(config, FIELDS[name][0]), name)


def make_config(strategy: str = "ova", **settings: Any) -> RunConfig:
    """A checked, fully resolved config: `settings` by name (any section's field), the
    backbone family's defaults for the rest, the auto fields filled in."""
    return resolve(_apply(RunConfig(ensemble=EnsembleConfig(strategy=strategy)), settings))


def defaults_for(backbone: str, strategy: str | None = None) -> dict[str, Any]:
    """The settings a run of `strategy` with `backbone` uses where none is given."""
    kind = family(backbone)
    return {**FAMILY_DEFAULTS[kind], **STRATEGY_DEFAULTS.get((kind, strategy), {})}


_joined: tuple | None = None   # the launch settings this process joined (join_cluster)


def join_cluster(config: RunConfig | None = None, **settings: Any) -> None:
    """Join the processes a run names (LAUNCH settings from `settings`, else `config`), or a
    detected SLURM / Cloud TPU cluster, or stay alone: where a run starts, before anything asks
    JAX for its backend (so before make_config / resolve). Again, the same: nothing."""
    global _joined
    t = config.training if config is not None else TrainingConfig()
    launch = tuple(settings.get(k, getattr(t, k)) for k in LAUNCH)
    try:
        distributed.initialize(*launch)
    except ValueError as error:   # its checks of the three settings
        raise ConfigError(str(error)) from None
    _joined = launch


def dataset_for(dataset: str | None, data_dir: str | None) -> str:
    """`dataset`, or with none given synthetic_cxr, or the layout `data_dir` holds (see
    LAYOUTS); ConfigError when that layout is unknown or synthetic_cxr is given a folder."""
    if dataset == "synthetic_cxr" and data_dir:
        raise ConfigError(f"synthetic_cxr is generated: data_dir {data_dir} would go unused; "
                          f"name its dataset ({', '.join(LAYOUTS)}) or leave dataset out")
    if dataset is not None or not data_dir:
        return dataset or "synthetic_cxr"
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise ConfigError(f"data_dir {data_dir} is not a folder")
    with contextlib.suppress(ValueError):   # {train,test,val}/ in root or root/chest_xray
        layouts.kermany_root(root)
        return "chest_xray_pneumonia"
    folders = [p for p in root.iterdir() if p.is_dir() and _is_class(p.name)]
    if folders:   # Kaggle's <Class>/images/, else any <class>/
        return ("covid19_radiography" if all((p / "images").is_dir() for p in folders)
                else "image_folder")
    raise ConfigError(f"cannot tell the layout of data_dir {data_dir}: no train/test/val "
                      f"folders and no class folders ({', '.join(classes_lib.CANONICAL)}); "
                      f"name its dataset ({', '.join(LAYOUTS)})")


def _is_class(name: str) -> bool:
    with contextlib.suppress(ValueError):
        return not name.startswith(".") and bool(classes_lib.canonical_name(name))
    return False


def resolve(config: RunConfig) -> RunConfig:
    """The family defaults and every auto filled (precision, members by the backend); checked."""
    launch = tuple(getattr(config.training, k) for k in LAUNCH)
    named = launch != (None, None, None)
    if (named and _joined != launch) or (not named and _joined is None
                                         and distributed.cluster_detected()):
        raise ConfigError("this process has not joined the run's processes: call ensembles.config"
                          ".join_cluster first (the CLIs and Ensemble do)")
    m, d, t, before = config.model, config.data, config.training, config.hardware_auto
    for name in ("strategy", "backbone"):    # the family defaults depend on both
        _check_choice(name, _get(config, name))
    backbone = m.backbone
    fill = {k: v for k, v in defaults_for(backbone, config.ensemble.strategy).items()
            if _get(config, k) is None}
    dataset = dataset_for(d.dataset, d.data_dir)
    pretrained = bool(m.pretrained) and backbone in PRETRAINED_NORMALIZATION
    channels = d.channels or (3 if pretrained else 1)
    normalization = d.normalization
    if normalization is None:
        preset = PRETRAINED_NORMALIZATION[backbone] if pretrained else "unit"
        if channels == 1 and preset in ("caffe", "torch"):
            raise ConfigError(f"pretrained {backbone} with 1 channel: its preset {preset!r} "
                              f"has per-channel constants; use 3 channels or give a "
                              f"normalization (tf, unit or xray)")
        normalization = preset
    picked = {k for k in HARDWARE_AUTO if _get(config, k) == "auto"}   # member data follows
    picked -= {"member_data"} if t.members != "auto" else set()        # given members
    # vmapped members are slower than K plain steps on CPU (docs/measured.md)
    members = t.members if t.members != "auto" else (
        "sequential" if jax.default_backend() == "cpu" else "stacked")
    # own pairs: half the compute for a custom CNN's OvO; ImageNet ones learn better shared
    member_data = t.member_data if t.member_data != "auto" else (
        "own" if config.ensemble.strategy == "ovo" and members == "sequential"
        and backbones.is_custom_cnn(backbone) else "shared")
    precision = m.precision if m.precision != "auto" else (
        "bf16" if training.compute_dtype("auto") == jnp.bfloat16 else "fp32")
    augment = dataset != "synthetic_cxr" if d.augment is None else d.augment
    config = dataclasses.replace(_apply(config, {
        **fill, "dataset": dataset, "channels": channels, "normalization": normalization,
        "augment": augment, "head": backbones.resolve_head(m.head, backbone),
        "precision": precision, "members": members, "member_data": member_data}),
        hardware_auto=before | picked)
    check(config)
    return config


def for_resume(config: RunConfig, saved: RunConfig | Mapping | None) -> RunConfig:
    """The config a resume of the run `saved` (its config.json "config") trains: members and
    member data this machine picked take the run's values, on any hardware. Precision does
    not (other numbers): ConfigError names the flag that continues it. Unreadable: `config`."""
    if isinstance(saved, Mapping):
        with contextlib.suppress(TypeError, ValueError):
            saved = RunConfig.from_dict(saved)
    if not isinstance(saved, RunConfig):
        return config
    theirs = saved.model.precision
    if "precision" in config.hardware_auto and theirs not in ("auto", config.model.precision):
        raise ConfigError(f"the run trained in {theirs}, precision auto is {config.model.precision}"
                          f" here; resume with --precision {theirs} to continue it as it started")
    keep = {k: _get(saved, k) for k in ("members", "member_data") if k in config.hardware_auto}
    return dataclasses.replace(config.replace(**keep), hardware_auto=config.hardware_auto)


def _check_choice(name: str, value: Any) -> None:
    allowed = choices_of(name)
    if value is not None and allowed is not None and value not in allowed:
        raise ConfigError(unknown_choice(name, value, allowed))


def check(config: RunConfig) -> None:
    """One-line ConfigError for any setting that cannot run, before anything is written."""
    d, m, e = config.data, config.model, config.ensemble
    for name, (_, f) in FIELDS.items():
        _check_choice(name, value := _get(config, name))
        test, rule = f.metadata.get("valid", (None, ""))
        if test and value is not None and not test(value):
            raise ConfigError(f"{name} must be {rule}; got {value}")
    try:
        training.parse_policy(m.freeze)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    parse_operating_point(e.operating_point)
    if (d.lung_mask == "auto") != (d.segmenter is not None):
        raise ConfigError("lung_mask auto and segmenter RUN go together (the segmenter "
                          "predicts the masks)")
    if e.meta_folds and (e.meta == "none" or e.meta_folds < 2):
        raise ConfigError("meta_folds needs a meta-classifier and K >= 2 (0 fits it on the "
                          "validation outputs)")
    if m.pretrained and m.backbone not in pretrained_lib.KERAS:
        raise ConfigError(f"pretrained: {m.backbone} has no ImageNet weights; Keras publishes "
                          f"them for {', '.join(pretrained_lib.KERAS)}")


def head_phase(config: RunConfig) -> RunConfig | None:
    """The config of the head-only first phase of head_epochs N (None when N is 0):
    everything as given except freeze "head", N epochs, warm-up at most half of them."""
    epochs = config.model.head_epochs
    if not epochs:
        return None
    return config.replace(freeze="head", epochs=epochs, head_epochs=0,
                          warmup_epochs=min(config.training.warmup_epochs, epochs / 2))
