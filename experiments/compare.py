"""`python -m experiments.compare --strategies single,ova,ovo,cascade,stack --backbones
simple_cnn,cnn16 --seeds 3 [training flags]`: every strategy x backbone x seed, compared.

The training flags are those of `experiments.ova` (not --backbone, --seed, --out, --resume or
--overwrite: the comparison sets them per run); they are parsed once per backbone, so each
backbone takes its family's defaults for the flags not given. Every run's config is built
(`ensembles.config.RunConfig`) and every run folder checked before the first run trains;
runs train through `ensembles.Ensemble` and "stack" through `ensembles.Stack`. The work is
done by `ensembles.research.compare` (plan, run, analyse) and its report by
`ensembles.research.compare_report`; this module turns flags into their arguments.

Each (backbone, seed) trains every strategy on the same split (the seed also picks the split),
so strategies are paired on identical test examples. The analysis (`ensembles.research.comparison`)
reads the finished run folders only: every run's decision rules ("ovo-votes" / "ovo-coupling",
"cascade" / "cascade-tuned", "<strategy>+meta": a logistic meta-classifier on the run's
validation member outputs) are scored as their own rows and tested against the first
strategy's own rule: McNemar and a paired bootstrap of macro-F1 (patient-grouped when ids
exist) per seed, an exact sign-flip test across seeds, Holm-adjusted per backbone.
"stack" is the meta-classifier over that backbone's other runs (fitted on validation outputs).
Writes compare.csv (one row per run x variant), compare.md (mean ± std over seeds, first-seed
bootstrap CI, per-class sensitivity / specificity, calibration, training cost, tests),
compare.json, compare.png (macro-F1 per variant and backbone) and compare_curves.png (each
member's validation macro-F1 per epoch, first seed). `--reuse` resumes an interrupted
comparison, or rewrites the analysis of a finished one without training: finished runs in
--compare-out are kept once their saved config is checked against this command's
(RunConfig.differences), interrupted runs are resumed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_pipeline.datasets import DATASETS, load_dataset
from ensembles.config import ConfigError
from ensembles.research import compare as library
from ensembles.training import runs as runs_lib
from experiments import common

DESCRIPTION = "Every strategy x backbone x seed, compared on paired test examples."
# Flags the comparison sets per run itself (--backbones, --seeds, --compare-out, --reuse).
_OWNED = ("--backbone", "--seed", "--out", "--resume", "--overwrite")


def plan(strategies, backbones, seeds: int, out: Path, flags: list[str]) -> list[library.Planned]:
    """The planned runs of `library.plan`, the training flags parsed once per backbone (so
    each takes its family's defaults for the flags not given); flags the comparison sets
    per run are refused."""
    given = [f.split("=")[0] for f in flags if f.split("=")[0] in _OWNED]
    if given:
        raise ConfigError(f"{', '.join(dict.fromkeys(given))}: the comparison sets these per run "
                         f"(use --backbones, --seeds, --compare-out and --reuse)")
    bases = {b: common.parse("ova", [*flags, "--backbone", b], DESCRIPTION)[0]
             for b in backbones}
    return library.plan(strategies, bases, seeds, out)


def _option(text: str) -> tuple[str, int | float | str]:
    """KEY=VALUE of --cross-option, the value as int, float or text."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--cross-option {text!r}: give KEY=VALUE")
    for kind in (int, float):
        try:
            return key, kind(value)
        except ValueError:
            pass
    return key, value


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: --seed / --backbone are refused training flags, not --seeds /
    # --backbones abbreviated
    parser = argparse.ArgumentParser(prog="python -m experiments.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--strategies", default="single,ova,ovo,cascade,stack")
    parser.add_argument("--backbones", default="simple_cnn,cnn16")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--compare-out", default=None,
                        help="output folder (default runs/compare-all-<UTC time>)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep runs already finished in --compare-out (same settings, "
                             "checked), resume interrupted ones and train only the missing "
                             "ones: resumes a comparison")
    parser.add_argument("--cross-dataset", choices=DATASETS, default=None,
                        help="also evaluate every run's bundle on this whole dataset, with "
                             "the leakage check against its training images")
    parser.add_argument("--cross-data-dir", default=None,
                        help="the cross set's folder (built under the runs' --cache-dir)")
    parser.add_argument("--cross-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a load_dataset option of the cross set (e.g. num_classes=2); "
                             "repeatable")
    return parser


def main(argv: list[str] | None = None) -> int:
    args, flags = build_parser().parse_known_args(argv)
    try:
        strategies = library.check_strategies(
            [n.strip() for n in args.strategies.split(",") if n.strip()])
        if args.seeds < 1:
            raise ConfigError("--seeds must be >= 1")
        backbones = common.names_flag(args.backbones, "backbones")
        out = (Path(args.compare_out) if args.compare_out else
               runs_lib.default_run_dir("compare", "all"))
        planned = plan(strategies, backbones, args.seeds, out, flags)
        cross = None if args.cross_dataset is None else load_dataset(   # checked first
            args.cross_dataset, data_dir=args.cross_data_dir,
            cache_dir=planned[0].config.data.cache_dir,
            progress=planned[0].config.training.progress,
            **dict(_option(o) for o in args.cross_option))
        library.run(planned, out, reuse=args.reuse, cross=cross)
    except Exception as error:   # noqa: BLE001 (fail re-raises what is not the user's)
        return common.fail(error, argv)
    print((out / "compare.md").read_text())
    print(f"report: {out / 'compare.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
