"""What every experiment CLI shares: flags, data, model + train state, the run directory.

Composable pieces rather than one main, so `single`, `ova`, `ovo`, `cascade` and `stack`
build their runs from the same parts:

    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_flags(parser)
    args = parser.parse_args()
    out = make_run_dir(args, "single", args.backbone)
    data = build_data(args)
    model = build_model(args, args.backbone, num_classes=len(data.class_names))
    result = fit_two_phase(args, model, data, backbone=args.backbone, out=out)

`check_args` also resolves the "auto" flags (--channels, --normalization) from --backbone
and --pretrained, so config.json records what actually ran.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

import backbones
from backbones import pretrained as pretrained_lib
from backbones import training
from data_pipeline import augment as augment_lib
from data_pipeline.balance import balance_indices, class_weights
from data_pipeline.datasets import DATASETS, Dataset, load_dataset
from data_pipeline.loader import make_loader
from data_pipeline.preprocess import NORMALIZATIONS as _ALL_NORMALIZATIONS
from data_pipeline.preprocess import PreprocessConfig
from data_pipeline.splits import RECIPES, split_indices

BALANCE_MODES = ("none", "downsample", "oversample", "class_weights")
# "dataset" needs a mean/std the CLIs do not compute yet.
NORMALIZATIONS = tuple(n for n in _ALL_NORMALIZATIONS if n != "dataset")
# The preprocessing each Keras application was trained with (keras.applications.*.
# preprocess_input); --pretrained runs use it unless --normalization is given.
PRETRAINED_NORMALIZATION = {"resnet50": "caffe", "vgg16": "caffe", "vgg19": "caffe",
                            "xception": "tf", "inception_v3": "tf", "densenet121": "torch"}
HEAD_PHASE = "head"  # run sub-directory of the head-only phase of --head-epochs


def _classes(text: str) -> tuple[str, ...]:
    return tuple(c.strip() for c in text.split(",") if c.strip())


# What a training CLI reports as `error: ...` with exit code 2 instead of a traceback: bad
# input refused before training, a diverged run, a refused non-finite checkpoint.
CLI_ERRORS: tuple[type[Exception], ...] = (
    ValueError, FileNotFoundError, training.TrainingDiverged, training.NonFiniteError)


def add_common_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the flags shared by every experiment CLI (defaults show in --help)."""
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="synthetic_cxr", choices=DATASETS)
    data.add_argument("--data-dir", default=None, help="source folder (not for synthetic_cxr)")
    data.add_argument("--cache-dir", default=None, help="where built datasets are cached")
    data.add_argument("--count", type=int, default=2000, help="synthetic_cxr: examples")
    data.add_argument("--classes", type=_classes, default=None,
                      help="comma-separated canonical classes to keep (default: all found)")
    data.add_argument("--image-size", type=int, default=64)
    data.add_argument("--channels", type=int, default=None, choices=(1, 3),
                      help="auto: 3 with --pretrained (gray image repeated), else 1")
    data.add_argument("--normalization", default=None, choices=NORMALIZATIONS,
                      help="auto: the backbone's ImageNet preset with --pretrained, else unit")
    data.add_argument("--clahe", action="store_true", help="CLAHE before resizing")
    data.add_argument("--split-recipe", default="70/15/15", choices=tuple(RECIPES))
    data.add_argument("--balance", default="none", choices=BALANCE_MODES)
    data.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True)
    data.add_argument("--workers", type=int, default=0, help="Grain worker processes")

    model = parser.add_argument_group("model")
    model.add_argument("--head", default="auto", choices=("auto", *backbones.HEADS),
                       help="auto: the custom CNNs' published top (imagenet), linear otherwise")
    model.add_argument("--width", type=float, default=None,
                       help="channel multiplier (custom CNNs only)")
    model.add_argument("--pretrained", default=None,
                       help='Keras ImageNet weights: "imagenet" (the file in '
                            '$CXR_ENSEMBLES_WEIGHTS or ~/.cache/cxr-ensembles/weights/) or a '
                            'file PATH; see docs/transfer_learning.md')
    model.add_argument("--freeze", default="full", help="full | head | last:N")
    model.add_argument("--head-epochs", type=int, default=0,
                       help="two-phase fine-tuning: first train the head alone for N epochs, "
                            "then --epochs with --freeze and a fresh optimizer")
    model.add_argument("--precision", default="auto", choices=training.PRECISIONS)

    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=12)
    train.add_argument("--batch-size", type=int, default=32, help="global batch size")
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--optimizer", default="adam", choices=training.OPTIMIZERS)
    train.add_argument("--schedule", default="warmup_cosine", choices=training.SCHEDULES)
    train.add_argument("--warmup-epochs", type=float, default=1.0)
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--label-smoothing", type=float, default=0.0)
    train.add_argument("--clip-norm", type=float, default=None, help="global-norm clipping")
    train.add_argument("--monitor", default="val_macro_f1", choices=tuple(training.loop.MONITORS))
    train.add_argument("--early-stopping-patience", type=int, default=5)
    train.add_argument("--parallel", default="shard_map", choices=training.PARALLEL_MODES)
    train.add_argument("--keep-checkpoints", type=int, default=2)
    train.add_argument("--seed", type=int, default=0)

    run = parser.add_argument_group("run")
    run.add_argument("--out", default=None,
                     help="run directory (default runs/<experiment>-<backbone>-<UTC time>/)")
    run.add_argument("--overwrite", action="store_true", help="empty a non-empty --out first")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out from its latest checkpoint")
    run.add_argument("--no-progress", dest="progress", action="store_false",
                     help="no progress bars")
    for action in parser._actions:  # argparse prints defaults only for options with help
        if action.help is None and action.option_strings:
            action.help = "(default: %(default)s)"
    return parser


def check_args(args: argparse.Namespace, *, head_epochs: bool = False) -> None:
    """One-line errors for flag values argparse cannot check alone; resolves the auto flags.

    `head_epochs`: the calling CLI runs the two phases of --head-epochs (fit_two_phase);
    the others refuse a non-zero value rather than ignore it.
    """
    for name in ("epochs", "batch_size", "image_size", "count"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    training.parse_policy(args.freeze)
    if getattr(args, "head_epochs", 0) < 0:
        raise ValueError("--head-epochs must be >= 0")
    if getattr(args, "head_epochs", 0) and not head_epochs:
        raise ValueError("--head-epochs is not supported by this experiment (only by "
                         "experiments.single and the ensemble CLIs)")
    backbone = getattr(args, "backbone", None)
    if args.pretrained:
        if backbone not in pretrained_lib.KERAS:
            raise ValueError(f"--pretrained: {backbone} has no ImageNet weights; Keras publishes "
                             f"them for {', '.join(pretrained_lib.KERAS)}")
        path = weights_path(args, backbone)
        if not path.is_file():
            raise FileNotFoundError(_missing_weights(args, backbone, path))
    resolve_preprocessing(args, backbone)
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    if args.resume and not args.out:
        raise ValueError("--resume needs --out (the run to continue)")


def resolve_preprocessing(args: argparse.Namespace, backbone: str | None = None) -> None:
    """Fill in --channels / --normalization left at auto (None), in place.

    Pretrained: 3 channels (the gray image repeated, as the ImageNet filters expect) and
    the backbone's preset (PRETRAINED_NORMALIZATION); from scratch: 1 channel, "unit".
    A 1-channel pretrained run folds the first conv's RGB kernels (grayscale="sum"), which
    needs a normalization with one constant for all channels.
    """
    pretrained = bool(args.pretrained) and backbone in PRETRAINED_NORMALIZATION
    if args.channels is None:
        args.channels = 3 if pretrained else 1
    if args.normalization is None:
        preset = PRETRAINED_NORMALIZATION[backbone] if pretrained else "unit"
        if args.channels == 1 and preset in ("caffe", "torch"):
            raise ValueError(f"--pretrained {backbone} with --channels 1: its preset {preset!r} "
                             f"has per-channel constants; use --channels 3 or pass "
                             f"--normalization (tf, unit or xray)")
        args.normalization = preset


def weights_path(args: argparse.Namespace, backbone: str) -> Path:
    """The file --pretrained names: PATH itself, or for "imagenet" the Keras notop file in
    backbones.default_weights_path's folder (the full file if only that one is there)."""
    if args.pretrained != "imagenet":
        return Path(args.pretrained)
    notop = backbones.default_weights_path(backbone, include_top=False)
    full = backbones.default_weights_path(backbone, include_top=True)
    return full if full.is_file() and not notop.is_file() else notop


def _missing_weights(args: argparse.Namespace, backbone: str, path: Path) -> str:
    if args.pretrained != "imagenet":
        return f"--pretrained: {path} is not a file"
    folder = f"{pretrained_lib.RELEASE}/{pretrained_lib.KERAS[backbone].folder}/"
    return (f"--pretrained imagenet: {path} not found; download "
            f"{pretrained_lib.keras_file_name(backbone, include_top=False)} (or "
            f"{pretrained_lib.keras_file_name(backbone, include_top=True)}) from the official "
            f"Keras release {folder} into {path.parent}, or set CXR_ENSEMBLES_WEIGHTS to the "
            f"folder that holds it")


# -- run directory and config ------------------------------------------------------------
def make_run_dir(args: argparse.Namespace, experiment: str, backbone: str) -> Path:
    """Create the run directory; refuse a non-empty one unless --overwrite or --resume."""
    if args.out:
        out = Path(args.out)
    else:
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
        out = Path("runs") / f"{experiment}-{backbone}-{stamp}"
    if out.exists() and any(out.iterdir()) and not args.resume:
        if not args.overwrite:
            raise ValueError(f"run directory {out} exists and is not empty; pass --overwrite "
                             f"to replace it or --resume to continue it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_config(out: Path, args: argparse.Namespace, **extra: Any) -> Path:
    """config.json: every flag, the command line, the JAX setup and `extra` facts."""
    config = {**vars(args), **extra, "argv": sys.argv,
              "jax": {"version": jax.__version__, "backend": jax.default_backend(),
                      "devices": [str(d) for d in jax.local_devices()]}}
    path = out / "config.json"
    path.write_text(json.dumps(config, indent=2, default=str) + "\n")
    return path


# -- data ---------------------------------------------------------------------------------
@dataclasses.dataclass
class Data:
    """A dataset, its splits and the loaders one experiment trains and evaluates with."""

    dataset: Dataset
    splits: dict[str, np.ndarray]       # example indices into dataset.source
    train_indices: np.ndarray           # after --balance resampling
    preprocess: PreprocessConfig
    augment: augment_lib.AugmentConfig | None
    train_loader: Any                   # all epochs in one iteration (checkpointable)
    steps_per_epoch: int
    class_weights: np.ndarray | None    # per class, with --balance class_weights

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.dataset.class_names

    def eval_loader(self, split: str, batch_size: int) -> Any:
        """Every example of `split` once, in order."""
        return make_loader(self.dataset.source, self.splits[split], batch_size=batch_size,
                           preprocess=self.preprocess, shuffle=False, num_epochs=1,
                           drop_remainder=False)


def load_data(args: argparse.Namespace) -> Dataset:
    """The dataset named by --dataset (synthetic_cxr generated at --image-size)."""
    options = ({"count": args.count, "image_size": args.image_size, "seed": args.seed}
               if args.dataset == "synthetic_cxr" else {})
    return load_dataset(args.dataset, data_dir=args.data_dir, classes=args.classes,
                        cache_dir=args.cache_dir, **options)


def build_data(args: argparse.Namespace, dataset: Dataset | None = None) -> Data:
    """Dataset -> patient-grouped splits -> balancing -> the training loader."""
    resolve_preprocessing(args, getattr(args, "backbone", None))
    dataset = dataset or load_data(args)
    splits = split_indices(dataset.labels, dataset.patient_ids, recipe=args.split_recipe,
                           seed=args.seed)
    train = splits["train"]
    weights = None
    if args.balance == "class_weights":
        weights = class_weights(dataset.labels[train], len(dataset.class_names))
    elif args.balance != "none":
        train = balance_indices(train, dataset.labels, mode=args.balance, seed=args.seed)
    steps = len(train) // args.batch_size
    if steps < 1:
        raise ValueError(f"the training split has {len(train)} examples, fewer than one batch "
                         f"of {args.batch_size}; lower --batch-size")
    preprocess = PreprocessConfig(image_size=args.image_size, channels=args.channels,
                                  normalization=args.normalization, clahe=args.clahe)
    host_augment = (augment_lib.AugmentConfig()
                    if args.augment and not augment_lib.DEFAULT_ON_DEVICE else None)
    loader = make_loader(dataset.source, train, batch_size=args.batch_size,
                         preprocess=preprocess, augment=host_augment, shuffle=True,
                         seed=args.seed, num_epochs=args.epochs, drop_remainder=True,
                         worker_count=args.workers)
    return Data(dataset=dataset, splits=splits, train_indices=train, preprocess=preprocess,
                augment=augment_lib.AugmentConfig() if args.augment else None,
                train_loader=loader, steps_per_epoch=steps, class_weights=weights)


# -- model and train state ----------------------------------------------------------------
def build_model(args: argparse.Namespace, backbone: str, *, num_classes: int | None):
    """The backbone in the --precision compute dtype, BatchNorm synchronised over "batch"."""
    options = {} if args.width is None else {"width": args.width}
    return backbones.create(backbone, num_classes=num_classes,
                            head=backbones.resolve_head(args.head, backbone),
                            dtype=training.compute_dtype(args.precision),
                            axis_name=training.parallel.AXIS, **options)


def pretrained_variables(args: argparse.Namespace, backbone: str, variables: dict) -> dict:
    """Merge --pretrained weights into freshly initialised `variables` (trunk only)."""
    grayscale = "sum" if args.channels == 1 else "repeat"  # 1 channel: sum the RGB kernels
    loaded = backbones.load_pretrained(backbone, weights_path(args, backbone), include_top=False,
                                       grayscale=grayscale)
    return backbones.merge_pretrained(variables, loaded)


def optim_config(args: argparse.Namespace, steps_per_epoch: int) -> training.OptimConfig:
    """The optimiser settings implied by the flags."""
    return training.OptimConfig(
        optimizer=args.optimizer, learning_rate=args.lr, schedule=args.schedule,
        warmup_steps=round(args.warmup_epochs * steps_per_epoch),
        total_steps=args.epochs * steps_per_epoch, weight_decay=args.weight_decay,
        clip_norm=args.clip_norm)


def build_training(args: argparse.Namespace, model, data: Data, *, backbone: str,
                   variables: dict | None = None) -> tuple[training.TrainState, Callable]:
    """Initial train state (optionally pretrained, with the freeze policy) and the step.

    `variables` (params, batch_stats) start the state instead of a fresh (pretrained)
    initialisation: the second phase of --head-epochs continues from the first's weights.
    """
    key = jax.random.PRNGKey(args.seed)
    shape = (1, args.image_size, args.image_size, args.channels)
    if variables is None:
        variables = training.state.initial_variables(model, key, shape)
        if args.pretrained:
            variables = pretrained_variables(args, backbone, variables)
    labels = training.freeze_labels(variables["params"], args.freeze, model)
    tx = training.make_optimizer(optim_config(args, data.steps_per_epoch),
                                 None if args.freeze == "full" else labels)
    state = training.create_train_state(model, tx, key, shape, variables=variables)
    augment = (None if data.augment is None or not augment_lib.DEFAULT_ON_DEVICE else
               functools.partial(augment_lib.augment_batch, cfg=data.augment))
    step = training.make_train_step(
        label_smoothing=args.label_smoothing, freeze_policy=args.freeze,
        trainable=training.trainable_modules(variables["params"], args.freeze, model),
        augment=augment)
    return state, step


def head_phase(args: argparse.Namespace) -> argparse.Namespace | None:
    """The flags of the head-only first phase of --head-epochs N (None when N is 0).

    Everything as given except: freeze "head", N epochs, warm-up at most half of them.
    """
    epochs = getattr(args, "head_epochs", 0)
    if not epochs:
        return None
    return argparse.Namespace(**{**vars(args), "freeze": "head", "epochs": epochs,
                                 "head_epochs": 0,
                                 "warmup_epochs": min(args.warmup_epochs, epochs / 2)})


def state_variables(state: training.TrainState) -> dict:
    """params (+ batch_stats) of a trained state: where the next phase starts from."""
    variables = {"params": state.params}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    return jax.device_get(variables)


def fit_two_phase(args: argparse.Namespace, model, data: Data, *, backbone: str, out: Path,
                  parallel: training.DataParallel | None = None) -> training.FitResult:
    """Train one model; with --head-epochs N, the head alone first, then --freeze.

    Phase 1 (freeze "head", N epochs) writes its metrics.jsonl, curves.png and checkpoints
    under out/head/; phase 2 starts from phase 1's best state with a fresh optimizer and
    the --freeze policy and writes into `out` as a one-phase run does. Both phases checkpoint,
    so --resume continues either (a finished phase 1 is only restored). Returns the last
    phase's result.
    """
    parallel = parallel or training.data_parallel(args.parallel)
    parallel.check_batch_size(args.batch_size)
    variables = None
    head_args = head_phase(args)
    if head_args is not None:
        head_data = build_data(head_args, data.dataset)
        result = _fit(head_args, model, head_data, backbone=backbone, out=out / HEAD_PHASE,
                      parallel=parallel)
        variables = state_variables(result.state)
    return _fit(args, model, data, backbone=backbone, out=out, parallel=parallel,
                variables=variables)


def _fit(args: argparse.Namespace, model, data: Data, *, backbone: str, out: Path,
         parallel: training.DataParallel, variables: dict | None = None
         ) -> training.FitResult:
    state, train_step = build_training(args, model, data, backbone=backbone,
                                       variables=variables)
    checkpointer = training.Checkpointer(out / "checkpoint", keep=args.keep_checkpoints)
    try:
        return training.fit(
            state, parallel=parallel, train_step=train_step,
            eval_step=training.make_eval_step(), train_loader=data.train_loader,
            val_loader=data.eval_loader("val", args.batch_size),
            config=fit_config(args, data), out_dir=out,
            class_weights=data.class_weights, checkpointer=checkpointer)
    finally:
        checkpointer.close()


def fit_config(args: argparse.Namespace, data: Data) -> training.FitConfig:
    """Epochs, steps, early stopping and progress bars from the flags."""
    return training.FitConfig(epochs=args.epochs, steps_per_epoch=data.steps_per_epoch,
                              monitor=args.monitor, patience=args.early_stopping_patience,
                              progress=args.progress)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Class probabilities from logits, in float64 for the evaluation."""
    z = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)
