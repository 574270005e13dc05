"""`python -m experiments.compare --strategies single,ova,ovo,cascade,stack --backbones
simple_cnn,cnn16 --seeds 3 [common flags]`: every strategy x backbone x seed, compared.

Each (backbone, seed) trains every strategy on the same split (the seed also picks the split),
so strategies are paired on identical test examples: McNemar's test on the decisions and a
paired bootstrap of macro-F1 (patient-grouped when ids exist) against the first strategy.
"stack" is the meta-classifier over that backbone's other runs (fitted on validation outputs).
Writes compare.csv (one row per run), compare.md (mean ± std over seeds, seed-0 bootstrap CI,
paired tests) and compare.png (macro-F1 per strategy and backbone). `--reuse` resumes an
interrupted comparison: finished runs in --compare-out are kept once their settings are checked.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments import common, ensemble_cli, stack  # noqa: E402
from ensembles.stats import mcnemar, paired_bootstrap  # noqa: E402

STRATEGIES = ("single", "ova", "ovo", "cascade", "stack")
METRICS = ("accuracy", "macro_f1", "roc_auc_macro", "ece")


# config.json keys that say where, how verbosely or how fast a run ran, not what it computed
# (stacked and sequential members train the same members: tests/test_members.py).
_RUN_ONLY = ("out", "overwrite", "resume", "progress", "argv", "jax", "cache_dir", "workers",
             "members")


def finished(run_dir: Path) -> bool:
    """Whether `run_dir` holds a complete run (its last files are written last)."""
    return all((run_dir / f).is_file() for f in ("config.json", "metrics.json", "outputs.npz"))


def check_reusable(run_dir: Path, expected: dict, defaults: dict | None = None) -> None:
    """ValueError unless the finished run in `run_dir` was made with the `expected` settings.

    A flag the run's config.json lacks (the run predates it) matches its default value.
    """
    config = json.loads((run_dir / "config.json").read_text())
    expected, defaults = json.loads(json.dumps([expected, defaults or {}], default=str))
    differ = {k: (config.get(k, defaults.get(k)), v) for k, v in expected.items()
              if v is not None and k not in _RUN_ONLY and config.get(k, defaults.get(k)) != v}
    if differ:
        raise ValueError(f"--reuse: {run_dir} was made with other settings "
                         f"({', '.join(f'{k}: {a!r} vs {b!r}' for k, (a, b) in differ.items())});"
                         f" use another --compare-out")


def run_one(strategy: str, backbone: str, seed: int, run_dir: Path, flags: list[str],
            members: list[Path], reuse: bool) -> None:
    """Train (or stack) one run into `run_dir`; with `reuse`, keep a matching finished one."""
    if strategy == "stack":
        if not members:
            raise ValueError("stack needs at least one other strategy to stack")
        if reuse and finished(run_dir):
            check_reusable(run_dir, {"runs": [str(r) for r in members]})
            return
        stack.stack_runs(members, run_dir, seed=seed)
        return
    argv = [*flags, "--backbone", backbone, "--seed", str(seed), "--out", str(run_dir)]
    if reuse and finished(run_dir):
        expected = vars(ensemble_cli.parse_args(strategy, argv))
        defaults = vars(ensemble_cli.parse_args(strategy, ["--backbone", backbone]))
        check_reusable(run_dir, {**expected, "strategy": strategy}, defaults)
        print(f"reusing {run_dir}", file=sys.stderr)
        return
    ensemble_cli.run(strategy, argv)


def run_all(strategies, backbones, seeds: int, out: Path, flags: list[str], *,
            reuse: bool = False) -> list[dict]:
    """Train/evaluate every combination; one record per run with its metrics and outputs."""
    records = []
    for backbone in backbones:
        for seed in range(seeds):
            runs = {}
            for s in strategies:
                run_dir = out / f"{s}-{backbone}-seed{seed}"
                members = [runs[k] for k in runs if k != "single"] or list(runs.values())
                run_one(s, backbone, seed, run_dir, flags, members, reuse)
                runs[s] = run_dir
                metrics = json.loads((run_dir / "metrics.json").read_text())
                z = np.load(run_dir / "outputs.npz")
                records.append({"strategy": s, "backbone": backbone, "seed": seed,
                                "run": str(run_dir), "metrics": metrics,
                                "y": z["test_label"], "proba": z["test_proba"],
                                "pred": z["test_pred"],
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", default="single,ova,ovo,cascade,stack")
    parser.add_argument("--backbones", default="simple_cnn,cnn16")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--compare-out", default=None,
                        help="output folder (default runs/compare-<UTC time>)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep runs already finished in --compare-out (same settings, "
                             "checked) and train only the missing ones: resumes a comparison")
    args, flags = parser.parse_known_args(argv)
    try:
        strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
        unknown = [s for s in strategies if s not in STRATEGIES]
        if unknown or not strategies:
            raise ValueError(f"unknown strategy {unknown}; choose from {', '.join(STRATEGIES)}")
        if "stack" in strategies and strategies.index("stack") != len(strategies) - 1:
            strategies = [s for s in strategies if s != "stack"] + ["stack"]
        if args.seeds < 1:
            raise ValueError("--seeds must be >= 1")
        out = Path(args.compare_out or common.make_run_dir(
            argparse.Namespace(out=None, resume=False, overwrite=False), "compare", "all"))
        out.mkdir(parents=True, exist_ok=True)
        records = run_all(strategies, args.backbones.split(","), args.seeds, out, flags,
                          reuse=args.reuse)
    except (ValueError, FileNotFoundError) as error:
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
