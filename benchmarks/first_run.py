"""Wall time and test macro-F1 of the README's first commands, run exactly as a user runs them.

    python -m benchmarks.first_run [--strategies ova,ovo,cascade] [--backbone resnet50]
        [--seeds 0,1,2] [--extra "--count 1200"] [--json OUT] [--keep DIR]

Each (strategy, seed) is `python -m experiments.<strategy> --backbone B --seed S --out DIR
--no-progress` in a fresh process with the defaults (plus `--extra`), so the wall time
includes start-up, the dataset build or reuse, XLA compilation, training, evaluation and the
report. A dataset already built by an earlier run is reused, as a user's second run would;
a first-ever run adds its build (seconds for synthetic_cxr). Prints a markdown table of the median over seeds (with the range) and
writes every run's figures to JSON. Run it on a quiet machine and quote the load average it
prints.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_once(strategy: str, backbone: str, seed: int, out: Path, extra: list[str]) -> dict:
    """One CLI run: wall seconds, test metrics and the trained member-epochs."""
    command = [sys.executable, "-m", f"experiments.{strategy}", "--backbone", backbone,
               "--seed", str(seed), "--out", str(out), "--overwrite", "--no-progress", *extra]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} exited {done.returncode}:\n{done.stderr}")
    metrics = json.loads((out / "metrics.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"strategy": strategy, "backbone": backbone, "seed": seed, "wall_s": seconds,
            "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
            "macro_f1_ci95": (metrics.get("ci95") or {}).get("macro_f1"),
            "member_epochs": len(records), "summary": done.stdout.strip().splitlines()[-1],
            "command": shlex.join(command)}


def summarise(runs: list[dict]) -> list[dict]:
    """Per strategy: medians over seeds of wall time and macro-F1, with their ranges."""
    rows = []
    for strategy in dict.fromkeys(r["strategy"] for r in runs):
        mine = [r for r in runs if r["strategy"] == strategy]
        walls, f1s = [r["wall_s"] for r in mine], [r["macro_f1"] for r in mine]
        rows.append({"strategy": strategy, "backbone": mine[0]["backbone"], "seeds": len(mine),
                     "wall_s_median": statistics.median(walls), "wall_s_range": [min(walls),
                                                                                 max(walls)],
                     "macro_f1_median": statistics.median(f1s), "macro_f1_range": [min(f1s),
                                                                                   max(f1s)],
                     "member_epochs_median": statistics.median(r["member_epochs"]
                                                               for r in mine)})
    return rows


def markdown(rows: list[dict], load: tuple[float, float], extra: list[str]) -> str:
    """The table of docs/measured.md."""
    flags = f" {shlex.join(extra)}" if extra else ""
    lines = ["| command | seeds | wall time, median (range) | test macro-F1, median (range) "
             "| member-epochs |", "|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["wall_s_range"]
        f_lo, f_hi = r["macro_f1_range"]
        lines.append(f"| `python -m experiments.{r['strategy']} --backbone {r['backbone']}"
                     f"{flags}` | {r['seeds']} | {r['wall_s_median'] / 60:.1f} min "
                     f"({lo / 60:.1f}-{hi / 60:.1f}) | {r['macro_f1_median']:.3f} "
                     f"({f_lo:.3f}-{f_hi:.3f}) | {r['member_epochs_median']:.0f} |")
    lines.append(f"\n1-minute load average at the start / end: {load[0]:.2f} / {load[1]:.2f} "
                 f"({os.cpu_count()} cores)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--strategies", default="ova,ovo,cascade")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--extra", default="", help="more CLI flags for every run (quoted)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep the run folders here (default: a temporary folder)")
    args = parser.parse_args(argv)
    extra = shlex.split(args.extra)
    seeds = [int(s) for s in args.seeds.split(",")]
    strategies = args.strategies.split(",")
    root = args.keep or Path(tempfile.mkdtemp(prefix="first_run_"))
    load_before = os.getloadavg()[0]
    runs = []
    for strategy in strategies:
        for seed in seeds:
            run = run_once(strategy, args.backbone, seed, root / f"{strategy}-{seed}", extra)
            print(f"{strategy} seed {seed}: {run['wall_s']:.0f} s, {run['summary']}",
                  flush=True)
            runs.append(run)
    rows = summarise(runs)
    load = (load_before, os.getloadavg()[0])
    print(markdown(rows, load, extra))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "runs": runs, "load": load},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
