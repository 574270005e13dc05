"""Train one multi-class model and evaluate it on the test split.

    python -m experiments.single --backbone simple_cnn [flags]

Writes into --out: config.json, metrics.jsonl (per epoch), curves.png, checkpoint/ (orbax:
latest and best), head/ (the head-only phase of --head-epochs: the same training files), and
the test evaluation from experiments.evaluation: metrics.json,
report.md, confusion.png, roc.png, reliability.png.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import backbones
from backbones import training
from experiments import common
from experiments.evaluation import evaluate_predictions, write_report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.single", description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--backbone", required=True, choices=backbones.names())
    parser.add_argument("--n-bootstrap", type=int, default=1000,
                        help="bootstrap resamples for the test confidence intervals")
    common.add_common_flags(parser)
    args = parser.parse_args(argv)
    common.check_args(args, head_epochs=True)
    return args


def run(args: argparse.Namespace) -> Path:
    """Train, evaluate on the test split, write the report; returns the report's path."""
    out = common.make_run_dir(args, "single", args.backbone)
    data = common.build_data(args)
    common.write_config(out, args, experiment="single", class_names=data.class_names,
                        split_sizes={k: len(v) for k, v in data.splits.items()},
                        train_examples=len(data.train_indices),
                        steps_per_epoch=data.steps_per_epoch)
    model = common.build_model(args, args.backbone, num_classes=len(data.class_names))
    parallel = training.data_parallel(args.parallel)
    result = common.fit_two_phase(args, model, data, backbone=args.backbone, out=out,
                                  parallel=parallel)
    predict = parallel.predict(training.make_eval_step())
    logits, labels, indices = training.predict(
        predict, parallel.replicate(result.state), data.eval_loader("test", args.batch_size))
    proba = common.softmax(logits)
    metrics = evaluate_predictions(labels, proba, data.class_names,
                                   patient_ids=data.dataset.patient_ids[indices],
                                   n_bootstrap=args.n_bootstrap, seed=args.seed)
    metrics["best_epoch"] = result.best_epoch
    metrics["epochs_trained"] = len(result.history)
    metrics["stopped_early"] = result.stopped_early
    title = (f"{args.backbone} on {data.dataset.name} ({', '.join(data.class_names)}): "
             f"test split")
    paths = write_report(metrics, out, y_true=labels, proba=proba, title=title)
    return paths["report.md"]


def main(argv: Sequence[str] | None = None) -> int:
    try:
        report = run(parse_args(argv))
    except common.CLI_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
