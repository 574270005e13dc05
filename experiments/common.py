"""Flags -> typed config for every training CLI, and how a CLI reports errors and results.

The CLIs are thin shells over the library: `parse` turns argv into an
`ensembles.config.RunConfig` (plus where the run goes), the API trains it, and the CLI
prints one summary line. `--help` shows the defaults the chosen `--backbone` will use
(`ensembles.config.FAMILY_DEFAULTS`).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path

import backbones
from backbones import training
from data_pipeline.datasets import DATASETS
from data_pipeline.splits import SPLIT_RECIPES
from ensembles import bundle as bundle_lib
from ensembles.config import (
    BALANCE_MODES, LUNG_MASKS, META_MODELS, NORMALIZATIONS, SECTIONS, RunConfig, defaults_for,
    make_config)
from ensembles.config import MEMBER_DATA, MEMBER_MODES

# What a CLI reports as `error: ...` with exit code 2 instead of a traceback: bad input
# refused before training, a diverged run, a refused non-finite checkpoint, a bad bundle,
# a folder that cannot be written (disk full, permissions).
CLI_ERRORS: tuple[type[Exception], ...] = (
    ValueError, OSError, training.TrainingDiverged, training.NonFiniteError,
    bundle_lib.BundleError)


@dataclasses.dataclass(frozen=True)
class RunTarget:
    """Where a run goes and whether it continues or replaces what is there."""

    out: Path | None
    resume: bool
    overwrite: bool


def _classes(text: str) -> tuple[str, ...]:
    return tuple(c.strip() for c in text.split(",") if c.strip())


def _defaults() -> dict:
    return {k: v for section in RunConfig().to_dict().values() for k, v in section.items()}


def build_parser(strategy: str, description: str) -> argparse.ArgumentParser:
    """Every flag of a training CLI; each dest is a field of RunConfig's sections."""
    d = _defaults()
    parser = argparse.ArgumentParser(prog=f"python -m experiments.{strategy}",
                                     description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASETS)
    data.add_argument("--data-dir", help="source folder (not for synthetic_cxr)")
    data.add_argument("--cache-dir", help="where built datasets are cached")
    data.add_argument("--count", type=int, help="synthetic_cxr: examples")
    data.add_argument("--classes", type=_classes,
                      help="comma-separated canonical classes to keep (default: all found)")
    data.add_argument("--image-size", type=int)
    data.add_argument("--channels", type=int, choices=(1, 3),
                      help="auto: 3 with --pretrained (gray image repeated), else 1")
    data.add_argument("--normalization", choices=NORMALIZATIONS,
                      help="auto: the backbone's ImageNet preset with --pretrained, else unit; "
                           "dataset: the training split's mean/std (saved in the bundle)")
    data.add_argument("--clahe", action="store_true", help="CLAHE before resizing")
    data.add_argument("--lung-mask", nargs="?", const="dataset", choices=LUNG_MASKS,
                      help="zero the image outside the lungs: with the masks the dataset ships "
                           "(--lung-mask alone), or auto: masks predicted by --segmenter")
    data.add_argument("--segmenter", metavar="RUN",
                      help="with --lung-mask auto: a run of python -m experiments.segment")
    data.add_argument("--split-recipe", choices=SPLIT_RECIPES,
                      help="train/val/test shares, patient-grouped; source: the dataset's own "
                           "test folder (Kermany's test/) is the test split, the rest 85/15")
    data.add_argument("--balance", choices=BALANCE_MODES,
                      help="class_weights: every member weights its classes over its own "
                           "training examples")
    data.add_argument("--augment", action=argparse.BooleanOptionalAction,
                      help="auto: on, except for synthetic_cxr (its phantoms vary already)")
    data.add_argument("--workers", type=int, help="Grain worker processes")
    data.add_argument("--quality-max", type=float, metavar="SCORE",
                      help="drop images whose BRISQUE score is above SCORE (0 ~ pristine, "
                           "higher = more distorted) before splitting")
    data.add_argument("--quality-drop-worst", type=float, metavar="FRACTION",
                      help="drop this fraction of the images with the worst BRISQUE scores "
                           "before splitting")

    model = parser.add_argument_group("model")
    model.add_argument("--backbone", choices=backbones.names(), help="backbone of every member")
    model.add_argument("--head", choices=("auto", *backbones.HEADS),
                       help="auto: the custom CNNs' published top (imagenet), linear otherwise")
    model.add_argument("--width", type=float, help="channel multiplier (custom CNNs only)")
    model.add_argument("--pretrained",
                       help='Keras ImageNet weights: "imagenet" (the file in '
                            '$CXR_ENSEMBLES_WEIGHTS or ~/.cache/cxr-ensembles/weights/) or a '
                            'file PATH; see docs/transfer_learning.md')
    model.add_argument("--freeze", help="full | head | last:N")
    model.add_argument("--head-epochs", type=int,
                       help="two-phase fine-tuning: first train the head alone for N epochs, "
                            "then --epochs with --freeze and a fresh optimizer")
    model.add_argument("--precision", choices=training.PRECISIONS)

    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=int)
    train.add_argument("--batch-size", type=int, help="global batch size")
    train.add_argument("--lr", type=float)
    train.add_argument("--optimizer", choices=training.OPTIMIZERS)
    train.add_argument("--schedule", choices=training.SCHEDULES)
    train.add_argument("--warmup-epochs", type=float)
    train.add_argument("--weight-decay", type=float)
    train.add_argument("--label-smoothing", type=float)
    train.add_argument("--clip-norm", type=float, help="global-norm clipping")
    train.add_argument("--monitor", choices=tuple(training.MONITORS),
                       help="what each member's early stopping and best epoch follow")
    train.add_argument("--early-stopping-patience", type=int,
                       help="epochs without improvement before a member stops (0: never)")
    train.add_argument("--parallel", choices=training.PARALLEL_MODES)
    train.add_argument("--members", choices=("auto", *MEMBER_MODES),
                       help="train members together under vmap, or one after another; auto: "
                            "one after another on CPU (faster there, "
                            "benchmarks/ensemble_throughput.py), stacked on a GPU or TPU")
    train.add_argument("--member-data", choices=("auto", *MEMBER_DATA),
                       help="own: each member trains only on the classes it separates (an "
                            "OvO member on its pair), the same steps per epoch for all; shared: "
                            "every member sees every batch, other classes weighted 0; auto: "
                            "own for a custom CNN's OvO trained one member after another, "
                            "shared otherwise")
    train.add_argument("--keep-checkpoints", type=int, help="latest epochs kept on disk")
    train.add_argument("--seed", type=int)

    ens = parser.add_argument_group("ensemble")
    ens.add_argument("--meta", choices=("none", *META_MODELS),
                     help="also fit a meta-classifier on the validation member outputs")
    ens.add_argument("--meta-folds", type=int,
                     help="with --meta: fit it on K-fold out-of-fold member outputs for the "
                          "training examples (K extra member trainings); 0 = validation")
    ens.add_argument("--healthy", help="cascade: the healthy class")
    ens.add_argument("--ovo-decision", choices=("votes", "coupling"),
                     help="OvO: scikit-learn's vote rule or argmax of pairwise coupling")
    ens.add_argument("--target-sensitivity", type=float,
                     help="cascade: stage-1 sensitivity the thresholded variant is tuned to")
    ens.add_argument("--operating-point",
                     help="per-class thresholds chosen on validation, saved in the bundle and "
                          "applied by predict and evaluate: youden, sensitivity=S or "
                          "specificity=S")
    ens.add_argument("--min-per-class", type=int, help="fewest training examples per member "
                                                       "class")
    ens.add_argument("--n-bootstrap", type=int,
                     help="bootstrap resamples for the test confidence intervals")

    run = parser.add_argument_group("run")
    run.add_argument("--out", default=None,
                     help="run directory (default runs/<experiment>-<backbone>-<UTC time>/)")
    run.add_argument("--overwrite", action="store_true", help="empty a non-empty --out first")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out from its latest checkpoint (the same "
                          "settings; anything else is refused before a file changes)")
    run.add_argument("--no-progress", dest="progress", action="store_false",
                     help="no progress bars")
    launch = parser.add_argument_group(
        "processes", "one training over several processes (machines): start the same command "
        "in each with its --process-id; without these flags a single process runs, or under "
        "SLURM (several tasks) and on Cloud TPU VMs JAX finds the others itself")
    launch.add_argument("--coordinator", metavar="HOST:PORT",
                        help="address of process 0, which serves the coordination")
    launch.add_argument("--num-processes", type=int, help="how many processes take part")
    launch.add_argument("--process-id", type=int, help="this process's number, 0 .. N-1")
    parser.set_defaults(**{k: v for k, v in d.items() if k != "strategy"})
    for action in parser._actions:  # argparse prints defaults only for options with help
        if action.help is None and action.option_strings:
            action.help = "(default: %(default)s)"
    return parser


def parse(strategy: str, argv: Sequence[str] | None, description: str = ""
          ) -> tuple[RunConfig, RunTarget]:
    """The run config and target of a command line; ValueError for settings that cannot run.

    The defaults shown by --help and used for unset flags are those of --backbone's family
    (and `strategy`'s changes to them).
    """
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--backbone", default=_defaults()["backbone"])
    backbone = first.parse_known_args(argv)[0].backbone
    parser = build_parser(strategy, description)
    if backbone in backbones.names():   # else argparse names the valid choices below
        parser.set_defaults(**defaults_for(backbone, strategy))
    args = parser.parse_args(argv)
    fields = {f.name for kind in SECTIONS.values() for f in dataclasses.fields(kind)}
    settings = {k: v for k, v in vars(args).items() if k in fields and k != "strategy"}
    target = RunTarget(Path(args.out) if args.out else None, args.resume, args.overwrite)
    if args.resume and not args.out:
        raise ValueError("--resume needs --out (the run to continue)")
    return make_config(strategy, **settings), target
