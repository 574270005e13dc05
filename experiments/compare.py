"""`python -m experiments.compare --strategies single,ova,ovo,cascade,stack --backbones
simple_cnn,cnn16 --seeds 3 [training flags]`: every strategy x backbone x seed, compared.

The training flags are those of `experiments.ova` (not --backbone, --seed, --out, --resume or
--overwrite: the comparison sets them per run); they are parsed once per backbone, so each
backbone takes its family's defaults for the flags not given. Every run's config is built
(`ensembles.config.RunConfig`) and every run folder checked before the first run trains;
runs train through `ensembles.Ensemble` and "stack" through `ensembles.Stack`.

Each (backbone, seed) trains every strategy on the same split (the seed also picks the split),
so strategies are paired on identical test examples: McNemar's test on the decisions and a
paired bootstrap of macro-F1 (patient-grouped when ids exist) against the first strategy.
"stack" is the meta-classifier over that backbone's other runs (fitted on validation outputs).
Writes compare.csv (one row per run), compare.md (mean ± std over seeds, seed-0 bootstrap CI,
paired tests) and compare.png (macro-F1 per strategy and backbone). `--reuse` resumes an
interrupted comparison: finished runs in --compare-out are kept once their saved config is
checked against this command's (RunConfig.differences), interrupted runs are resumed.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ensembles import Ensemble, Stack  # noqa: E402
from ensembles import bundle as bundle_lib  # noqa: E402
from ensembles import runs as runs_lib  # noqa: E402
from ensembles.config import META_MODELS, RunConfig, resolve  # noqa: E402
from ensembles.stats import mcnemar, paired_bootstrap  # noqa: E402
from experiments import common  # noqa: E402

STRATEGIES = ("single", "ova", "ovo", "cascade", "stack")
METRICS = ("accuracy", "macro_f1", "roc_auc_macro", "ece")
DESCRIPTION = "Every strategy x backbone x seed, compared on paired test examples."
STACK_META = "logreg"
# Flags the comparison sets per run itself (--backbones, --seeds, --compare-out, --reuse).
_OWNED = ("--backbone", "--seed", "--out", "--resume", "--overwrite")


@dataclasses.dataclass(frozen=True)
class Planned:
    """One run of the comparison: its config (None for "stack") and folder."""

    strategy: str
    backbone: str
    seed: int
    config: RunConfig | None
    run_dir: Path


def plan(strategies, backbones, seeds: int, out: Path, flags: list[str]) -> list[Planned]:
    """Every (backbone, seed, strategy) run in training order, each with its checked config.

    The shared flags are parsed once per backbone, so every backbone takes its family's
    defaults (ensembles.config.FAMILY_DEFAULTS) for the flags not given; strategy and seed
    are then set per run. Any bad flag or setting raises before anything trains.
    """
    given = [f.split("=")[0] for f in flags if f.split("=")[0] in _OWNED]
    if given:
        raise ValueError(f"{', '.join(dict.fromkeys(given))}: the comparison sets these per run "
                         f"(use --backbones, --seeds, --compare-out and --reuse)")
    planned = []
    for backbone in backbones:
        base, _ = common.parse("ova", [*flags, "--backbone", backbone], DESCRIPTION)
        for seed in range(seeds):
            for s in strategies:
                config = None if s == "stack" else resolve(base.replace(strategy=s, seed=seed))
                planned.append(Planned(s, backbone, seed, config,
                                       out / f"{s}-{backbone}-seed{seed}"))
    return planned


def finished(run_dir: Path) -> bool:
    """Whether `run_dir` holds a complete run (its last files are written last)."""
    return all((run_dir / f).is_file() for f in ("config.json", "metrics.json", "outputs.npz"))


def stacked_runs(planned: list[Planned], run: Planned) -> list[Path]:
    """The runs a "stack" run stacks: its (backbone, seed)'s other runs before it, the
    single model left out unless it is the only one."""
    before = [p for p in planned[:planned.index(run)]
              if (p.backbone, p.seed) == (run.backbone, run.seed) and p.strategy != "stack"]
    return [p.run_dir for p in before if p.strategy != "single"] or [p.run_dir for p in before]


def reuse_differences(run_dir: Path, expected: RunConfig) -> list[str]:
    """`section.name: saved vs expected` for each setting of the run in `run_dir` that
    differs from `expected`, apart from those that say how a run executes, not what it
    computes (RunConfig.differences skips them; and stacked and sequential members train the
    same members: tests/test_members.py). A setting the saved config lacks takes its default."""
    doc = runs_lib.read_config(run_dir)
    if "config" not in doc:
        raise ValueError(f"--reuse: {run_dir}/config.json holds no run config (an older "
                         f"run); use another --compare-out")
    saved = RunConfig.from_dict(doc["config"])
    return expected.differences(saved.replace(members=expected.training.members))


def stack_differences(run_dir: Path, members: list[Path]) -> list[str]:
    """What differs between the stack run in `run_dir` and the stack of `members`."""
    doc = runs_lib.read_config(run_dir)
    expected = {"runs": [str(r) for r in members], "meta_model": META_MODELS[STACK_META]}
    return [f"{k}: {doc.get(k)!r} vs {v!r}" for k, v in expected.items() if doc.get(k) != v]


def decide(planned: list[Planned], run: Planned, reuse: bool) -> str:
    """"reuse" (a finished run, settings checked), "resume" (an interrupted one, with
    `reuse`) or "train"; ValueError, before anything trains, for a run that cannot go on."""
    run_dir = run.run_dir
    if run.strategy == "stack":
        members = stacked_runs(planned, run)
        if not members:
            raise ValueError("stack needs at least one other strategy to stack")
        differ = stack_differences(run_dir, members) if reuse and finished(run_dir) else None
        action = "reuse" if differ is not None else "train"
        if action == "train" and (run_dir / bundle_lib.COMPONENTS_DIR).exists():
            raise ValueError(f"{run_dir} already holds a stack bundle; use another "
                             f"--compare-out (or --reuse once it is finished)")
    elif reuse and finished(run_dir):
        action, differ = "reuse", reuse_differences(run_dir, run.config)
    elif reuse and (run_dir / runs_lib.CONFIG_FILE).is_file():
        action, differ = "resume", reuse_differences(run_dir, run.config)
    else:
        runs_lib.check_run_dir(run_dir, run.config, resume=False, overwrite=False)
        action, differ = "train", None
    if differ:
        raise ValueError(f"--reuse: {run_dir} was made with other settings "
                         f"({'; '.join(differ)}); use another --compare-out")
    return action


def run_all(planned: list[Planned], *, reuse: bool = False) -> list[dict]:
    """Train/evaluate every planned run (every run checked first); one record per run with
    its metrics and outputs. With `reuse`, finished runs are kept and interrupted ones
    resumed."""
    actions = [decide(planned, run, reuse) for run in planned]
    records = []
    for run, action in zip(planned, actions, strict=True):
        if action == "reuse":
            print(f"reusing {run.run_dir}", file=sys.stderr)
        elif run.strategy == "stack":
            print(f"stacking {run.run_dir}", file=sys.stderr)
            Stack(stacked_runs(planned, run), meta=STACK_META, seed=run.seed).fit(run.run_dir)
        else:
            print(f"{'resuming' if action == 'resume' else 'training'} {run.run_dir}",
                  file=sys.stderr)
            Ensemble(config=run.config).fit(out=run.run_dir, resume=action == "resume")
        metrics = json.loads((run.run_dir / "metrics.json").read_text())
        z = np.load(run.run_dir / "outputs.npz")
        records.append({"strategy": run.strategy, "backbone": run.backbone, "seed": run.seed,
                        "run": str(run.run_dir), "metrics": metrics,
                        "y": z["test_label"], "proba": z["test_proba"], "pred": z["test_pred"],
                        "ids": z["test_patient_id"] if "test_patient_id" in z else None})
    return records


def paired_tests(records: list[dict], baseline: str) -> list[dict]:
    """Each strategy vs `baseline` on the same (backbone, seed) test examples."""
    index = {(r["strategy"], r["backbone"], r["seed"]): r for r in records}
    rows = []
    for r in records:
        base = index.get((baseline, r["backbone"], r["seed"]))
        if base is None or r["strategy"] == baseline:
            continue
        m = mcnemar(r["y"], r["pred"], base["pred"])
        b = paired_bootstrap(r["y"], r["proba"], base["proba"], metric="macro_f1",
                             patient_ids=r["ids"], n_bootstrap=500, seed=r["seed"],
                             pred_a=r["pred"], pred_b=base["pred"])
        rows.append({"strategy": r["strategy"], "baseline": baseline,
                     "backbone": r["backbone"], "seed": r["seed"],
                     "mcnemar_p": m["p_value"], "macro_f1_diff": b["difference"],
                     "diff_ci95": b["ci95"], "bootstrap_p": b["p_value"]})
    return rows


def summarise(records: list[dict]) -> list[dict]:
    """Mean ± std over seeds per (strategy, backbone), with seed 0's bootstrap CIs."""
    rows = []
    keys = dict.fromkeys((r["strategy"], r["backbone"]) for r in records)
    for s, b in keys:
        group = [r for r in records if r["strategy"] == s and r["backbone"] == b]
        row = {"strategy": s, "backbone": b, "seeds": len(group)}
        for k in METRICS:
            v = np.array([np.nan if r["metrics"].get(k) is None else r["metrics"][k]
                          for r in group], float)
            row[k] = (float(np.nanmean(v)), float(np.nanstd(v)))
            ci = group[0]["metrics"].get("ci95", {}).get(k)
            row[f"{k}_ci95_seed0"] = ci
        rows.append(row)
    return rows


def write_outputs(out: Path, records, summary, tests) -> None:
    with (out / "compare.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["strategy", "backbone", "seed", *METRICS, "run"])
        for r in records:
            w.writerow([r["strategy"], r["backbone"], r["seed"],
                        *(r["metrics"].get(k) for k in METRICS), r["run"]])

    def f(x):
        return "n/a" if x is None or np.isnan(x) else f"{x:.3f}"

    def ci(c):
        return "" if not c else f" [{c[0]:.3f}, {c[1]:.3f}]"

    lines = ["# Strategy comparison", "",
             "Mean ± std over seeds; brackets: seed 0's 95% bootstrap CI.", "",
             "| strategy | backbone | seeds | " + " | ".join(METRICS) + " |",
             "|---|---|---|" + "---|" * len(METRICS)]
    for r in summary:
        cells = [f"{f(r[k][0])} ± {f(r[k][1])}{ci(r[f'{k}_ci95_seed0'])}" for k in METRICS]
        lines.append(f"| {r['strategy']} | {r['backbone']} | {r['seeds']} | "
                     + " | ".join(cells) + " |")
    if tests:
        lines += ["", f"## Paired tests against {tests[0]['baseline']} (same test examples)", "",
                  "| strategy | backbone | seed | macro-F1 diff [95% CI] | bootstrap p | "
                  "McNemar p |", "|---|---|---|---|---|---|"]
        lines += [f"| {t['strategy']} | {t['backbone']} | {t['seed']} | "
                  f"{t['macro_f1_diff']:+.3f} [{t['diff_ci95'][0]:+.3f}, "
                  f"{t['diff_ci95'][1]:+.3f}] | {t['bootstrap_p']:.3g} | {t['mcnemar_p']:.3g} |"
                  for t in tests]
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    (out / "compare.json").write_text(json.dumps({"summary": summary, "paired": tests},
                                                 indent=1, default=float))
    strategies = list(dict.fromkeys(r["strategy"] for r in summary))
    bbs = list(dict.fromkeys(r["backbone"] for r in summary))
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(strategies), 4))
    width = 0.8 / len(bbs)
    for i, b in enumerate(bbs):
        rows = {r["strategy"]: r["macro_f1"] for r in summary if r["backbone"] == b}
        x = np.arange(len(strategies)) + i * width
        ax.bar(x, [rows.get(s, (np.nan,))[0] for s in strategies], width,
               yerr=[rows.get(s, (0, 0))[1] for s in strategies], label=b, capsize=3)
    ax.set_xticks(np.arange(len(strategies)) + width * (len(bbs) - 1) / 2, strategies)
    ax.set_ylabel("test macro-F1 (mean ± std over seeds)")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=100)
    plt.close(fig)


def _names(text: str, what: str, allowed=None) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if allowed is not None and n not in allowed]
    if unknown or not names:
        raise ValueError(f"unknown {what} {unknown}; choose from {', '.join(allowed)}"
                         if allowed is not None else f"--{what}: give at least one name")
    if len(set(names)) != len(names):
        raise ValueError(f"--{what}: {', '.join(names)} repeats a name")
    return names


def main(argv: list[str] | None = None) -> int:
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
    args, flags = parser.parse_known_args(argv)
    try:
        strategies = _names(args.strategies, "strategy", STRATEGIES)
        if "stack" in strategies and strategies.index("stack") != len(strategies) - 1:
            strategies = [s for s in strategies if s != "stack"] + ["stack"]
        if args.seeds < 1:
            raise ValueError("--seeds must be >= 1")
        out = (Path(args.compare_out) if args.compare_out else
               runs_lib.default_run_dir("compare", "all"))
        planned = plan(strategies, _names(args.backbones, "backbones"), args.seeds, out, flags)
        out.mkdir(parents=True, exist_ok=True)
        records = run_all(planned, reuse=args.reuse)
    except common.CLI_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    summary = summarise(records)
    tests = paired_tests(records, strategies[0])
    write_outputs(out, records, summary, tests)
    print((out / "compare.md").read_text())
    print(f"report: {out / 'compare.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
