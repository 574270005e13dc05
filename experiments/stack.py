"""`python -m experiments.stack --runs RUN_DIR... [--meta-model logreg|gboost] [--stack-out DIR]`
or `--strategies ova,ovo,cascade --backbones simple_cnn,cnn16 [training flags]`: a
meta-classifier over the members of several runs.

Without --runs, every strategy x backbone is first trained (`ensembles.Ensemble`) into
<stack-out>/<strategy>-<backbone>/ with the training flags (those of `experiments.ova`; each
backbone takes its family's defaults for flags not given, and --resume / --overwrite apply
to every run). Every setting and run folder is checked before the first run trains.

The meta-classifier (ensembles.combine.meta, logistic regression by default) is fitted on the members'
validation outputs only, with the leakage guard checking them against every run's training
indices, and evaluated on the shared test split. All runs must share the dataset split (same
data, --seed and --split-recipe): the command checks the example indices and refuses others.

The output folder is a self-contained stack bundle (ensembles/bundle/, written by
`ensembles.Stack`): every stacked run's bundle pieces are hard-linked (else copied) into
components/<i>/, the meta-classifier is saved beside them (meta.json, or meta.skops for
gradient boosting), and `experiments.evaluate` / `experiments.predict --run OUT` rebuild each
component's member outputs with its own preprocessing before applying the meta-classifier.

The work is done by `ensembles.research.stacks`; this module turns flags into its arguments.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ensembles.api import Stack
from ensembles.config import META_MODELS, ConfigError, RunConfig
from ensembles.evaluate.assess import summary_line
from ensembles.research import stacks
from ensembles.training import runs as runs_lib
from experiments import common

DESCRIPTION = "Stack finished runs (or train them first) under a meta-classifier."


def plan_members(strategies: Sequence[str], backbones: Sequence[str], flags: Sequence[str],
                 out: Path) -> tuple[list[tuple[RunConfig, Path]], common.RunTarget]:
    """(config, run folder) of every strategy x backbone to train (`stacks.plan_runs`), the
    training flags parsed once per backbone (each takes its family's defaults for the
    settings not given), and where they go. ValueError for bad flags."""
    if "stack" in strategies:
        raise ConfigError("--strategies: list the strategies to stack (single, ova, ovo, "
                         "cascade), not stack itself")
    if any(f == "--backbone" or f.startswith("--backbone=") for f in flags):
        raise ConfigError("--backbone: the stack trains every backbone of --backbones")
    bases, target = {}, None
    for backbone in backbones:
        bases[backbone], target = common.parse(strategies[0], [*flags, "--backbone", backbone],
                                               DESCRIPTION)
        if target.out is not None:
            raise ConfigError("--out: the stack trains its runs into <stack-out>/"
                             "<strategy>-<backbone>; give --stack-out instead")
    return stacks.plan_runs(strategies, bases, out), target


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
    stacks.check_out(out)   # refused before anything trains
    if args.runs:
        if flags:
            raise ConfigError(f"training flags ({' '.join(flags)}) apply only without --runs, "
                             f"when the stack trains its runs itself")
        return stacks.stack(args.runs, out, meta=args.meta_model)
    planned, target = plan_members(common.names_flag(args.strategies, "strategies"),
                                   common.names_flag(args.backbones, "backbones"), flags, out)
    return stacks.train_and_stack(planned, out, meta=args.meta_model, resume=target.resume,
                                  overwrite=target.overwrite)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: stack, print the summary line; bad input -> `error: ...`, exit code 2."""
    try:
        stacked = run(argv)
    except Exception as error:   # noqa: BLE001 (fail re-raises what is not the user's)
        return common.fail(error, argv)
    print(summary_line(stacked.metrics_, stacked.run_dir_ / "report.html"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
