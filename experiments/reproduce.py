"""`python -m experiments.reproduce --list` and `python -m experiments.reproduce NAME
--data-dir PATH [--scale tiny|cpu|full]`: a published study's protocol, run and set beside
its figure.

Each recipe (experiments/recipes/NAME.toml: the protocol as data, see ensembles.research.recipes)
trains its runs into OUT/<run>/ and writes OUT/reproduction.md (the published figure with its
test-set size, ours with 95% CIs, the protocol differences and the settings not applied, the
patient-grouping and source-confounding caveats) and OUT/reproduction.json. `--scale full` is
the published protocol on the recipe's dataset (`--data-dir`: the Kaggle COVID-19
Radiography layout, or Kermany's chest_xray for chest_xray_pneumonia); `cpu` the same at 64 px
for 5 epochs; `tiny` runs on the synthetic phantoms whatever `--data-dir` says (a few minutes
on a CPU; its numbers mean nothing). `--image-size`, `--epochs` and `--batch-size` override the
scale's values for every run; `--runs` trains some of the recipe's runs only (the others are
listed as not run).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ensembles.config import ConfigError, unknown_choice
from ensembles.research import recipes as reproduce
from ensembles.training import runs
from experiments import common

RECIPES = Path(__file__).resolve().parent / "recipes"


def main(argv: list[str] | None = None) -> int:
    parser = common.Parser(prog="python -m experiments.reproduce", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?", help="the recipe (see --list)")
    parser.add_argument("--list", action="store_true", help="every recipe and its figures")
    parser.add_argument("--data-dir", help="the recipe's dataset folder (cpu and full scales)")
    parser.add_argument("--scale", choices=tuple(reproduce.SCALES), default="tiny")
    parser.add_argument("--out", help="output folder (default runs/reproduce-NAME-SCALE-<UTC "
                                      "time>)")
    parser.add_argument("--cache-dir", help="where built datasets are cached")
    parser.add_argument("--runs", type=lambda t: [n.strip() for n in t.split(",") if n.strip()],
                        help="comma-separated runs of the recipe to train (default: all)")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--segmenter", metavar="RUN",
                        help="lung masks predicted by this segmenter (python -m "
                             "experiments.segment) for a dataset that ships none")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bars")
    args = parser.parse_args(argv)
    try:
        recipes = reproduce.load_recipes(RECIPES)
        if args.list:
            print("\n".join(reproduce.summary(r) for r in recipes.values()))
            return 0
        if args.name not in recipes:
            raise ConfigError(unknown_choice("recipe", args.name, recipes) + " (--list)")
        if args.scale == "tiny" and args.data_dir:
            print(f"--scale tiny trains on the synthetic phantoms: --data-dir {args.data_dir} is "
                  f"not used", file=sys.stderr)
        overrides = {k: v for k, v in (("image_size", args.image_size), ("epochs", args.epochs),
                                       ("batch_size", args.batch_size),
                                       ("cache_dir", args.cache_dir)) if v is not None}
        overrides["progress"] = args.progress
        if args.segmenter:
            overrides.update(lung_mask="auto", segmenter=args.segmenter)
        out = (Path(args.out) if args.out else
               runs.default_run_dir(f"reproduce-{args.name}", args.scale))
        doc = reproduce.reproduce(recipes[args.name], args.scale, out, data_dir=args.data_dir,
                                  overrides=overrides, only=args.runs)
    except Exception as error:   # noqa: BLE001 (fail re-raises what is not the user's)
        return common.fail(error, argv)
    for r in doc["runs"]:
        print(f"{r['name']}: test macro-F1 {reproduce.value_text(r['metrics'], 'macro_f1')} "
              f"(95% CI)")
    print(f"report: {out / 'reproduction.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
