"""`python -m experiments.stack --runs RUN_DIR... [--meta-model logreg|gboost] [--stack-out DIR]`
or `--strategies ova,ovo,cascade --backbones simple_cnn,cnn16 [training flags]`: a
meta-classifier over the members of several runs.

Without --runs, every strategy x backbone is first trained (`ensembles.Ensemble`) into
<stack-out>/<strategy>-<backbone>/ with the training flags (those of `experiments.ova`; each
backbone takes its family's defaults for flags not given, and --resume / --overwrite apply
to every run). Every setting and run folder is checked before the first run trains.

The meta-classifier (ensembles.meta, logistic regression by default) is fitted on the members'
validation outputs only, with the leakage guard checking them against every run's training
indices, and evaluated on the shared test split. All runs must share the dataset split (same
data, --seed and --split-recipe): the command checks the example indices and refuses others.

The output folder is a self-contained stack bundle (ensembles/bundle.py, written by
`ensembles.Stack`): every stacked run's bundle pieces are hard-linked (else copied) into
components/<i>/, the meta-classifier is saved beside them (meta.json, or meta.skops for
gradient boosting), and `experiments.evaluate` / `experiments.predict --run OUT` rebuild each
component's member outputs with its own preprocessing before applying the meta-classifier.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ensembles import Ensemble, Stack
from ensembles import bundle as bundle_lib
from ensembles.training import runs as runs_lib
from ensembles.evaluate.assess import summary_line
from ensembles.config import META_MODELS, RunConfig, resolve
from experiments import common

DESCRIPTION = "Stack finished runs (or train them first) under a meta-classifier."


def _names(text: str, what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError(f"--{what}: give at least one name")
    if len(set(names)) != len(names):
        raise ValueError(f"--{what}: {', '.join(names)} repeats a name")
    return names


def plan_members(strategies: Sequence[str], backbones: Sequence[str], flags: Sequence[str],
                 out: Path) -> tuple[list[tuple[RunConfig, Path]], common.RunTarget]:
    """(config, run folder) of every strategy x backbone to train, from the training flags.

    The flags are parsed once per backbone, so each takes its family's defaults for the
    settings not given; the strategy is then set on that config. ValueError for bad flags.
    """
    if "stack" in strategies:
        raise ValueError("--strategies: list the strategies to stack (single, ova, ovo, "
                         "cascade), not stack itself")
    if any(f == "--backbone" or f.startswith("--backbone=") for f in flags):
        raise ValueError("--backbone: the stack trains every backbone of --backbones")
    planned, target = [], None
    for backbone in backbones:
        base, target = common.parse(strategies[0], [*flags, "--backbone", backbone],
                                    DESCRIPTION)
        if target.out is not None:
            raise ValueError("--out: the stack trains its runs into <stack-out>/"
                             "<strategy>-<backbone>; give --stack-out instead")
        for strategy in strategies:
            planned.append((resolve(base.replace(strategy=strategy)),
                            out / f"{strategy}-{backbone}"))
    return planned, target


def train_members(strategies: Sequence[str], backbones: Sequence[str], flags: Sequence[str],
                  out: Path) -> list[tuple[RunConfig, Path]]:
    """Train every strategy x backbone into out/<strategy>-<backbone>; (config, run folder)
    of each. Every config and run folder is checked before the first training."""
    planned, target = plan_members(strategies, backbones, flags, out)
    for config, run_dir in planned:
        runs_lib.check_run_dir(run_dir, config, resume=target.resume,
                               overwrite=target.overwrite)
    for config, run_dir in planned:
        print(f"training {run_dir}", file=sys.stderr)
        Ensemble(config=config).fit(out=run_dir, resume=target.resume,
                                    overwrite=target.overwrite)
    return planned


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: --backbone must not pass for an abbreviation of --backbones
    parser = argparse.ArgumentParser(prog="python -m experiments.stack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--runs", nargs="+", default=None, help="finished ensemble runs")
    parser.add_argument("--strategies", default="ova,ovo,cascade",
                        help="without --runs: train these strategies first")
    parser.add_argument("--backbones", default="simple_cnn", help="without --runs: backbones")
    parser.add_argument("--meta-model", default="logreg", choices=tuple(META_MODELS))
    parser.add_argument("--stack-out", default=None,
                        help="output folder (default runs/stack-members-<UTC time>)")
    return parser


def run(argv: Sequence[str] | None = None) -> Stack:
    """Parse, train the runs unless --runs names them, stack them; the fitted Stack."""
    args, flags = build_parser().parse_known_args(argv)
    out = (Path(args.stack_out) if args.stack_out else
           runs_lib.default_run_dir("stack", "members"))
    if (out / bundle_lib.COMPONENTS_DIR).exists():   # refused before anything trains
        raise ValueError(f"{out} already holds a stack bundle; choose another --stack-out")
    if args.runs:
        if flags:
            raise ValueError(f"training flags ({' '.join(flags)}) apply only without --runs, "
                             f"when the stack trains its runs itself")
        members, seed = [Path(r) for r in args.runs], 0
    else:
        trained = train_members(_names(args.strategies, "strategies"),
                                _names(args.backbones, "backbones"), flags, out)
        members, seed = [run_dir for _, run_dir in trained], trained[0][0].training.seed
    return Stack(members, meta=args.meta_model, seed=seed).fit(out)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: stack, print the summary line; bad input -> `error: ...`, exit code 2."""
    try:
        stacked = run(argv)
    except common.CLI_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary_line(stacked.metrics_, stacked.run_dir_ / "report.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
