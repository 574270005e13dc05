"""Command line: list the backbones, summarise one without building its weights, or manage the
cache of Keras ImageNet weight files.

    python -m backbones list
    python -m backbones summary resnet50 --head imagenet --num-classes 1000 --image-size 224
    python -m backbones weights list                      # cached files, size, MD5 official?
    python -m backbones weights download densenet121 vgg16 [--include-top] | --all

`summary` prints the parameter counts (trainable = the "params" collection; total adds
BatchNorm moving statistics, as Keras's total does) and the forward GFLOPs for batch 1 from
XLA's cost analysis (a multiply-add counts 2). Shapes come from `jax.eval_shape` and the
FLOPs from lowering, so no weights are materialised and nothing is trained.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

import backbones
from backbones import pretrained
from data_pipeline.classes import DEFAULT_CLASSES


def count(tree: Any) -> int:
    """Number of scalars in a pytree of arrays or shape structs."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def summarize(name: str, *, num_classes: int | None, head: str = "linear",
              image_size: int = 224, channels: int = 3) -> dict[str, Any]:
    """Parameter counts, output shape and forward GFLOPs (batch 1, eval mode) of a backbone."""
    if image_size < 1 or channels < 1:
        raise ValueError(f"image size and channels must be positive, got {image_size}, "
                         f"{channels}")
    model = backbones.create(name, num_classes=num_classes, head=head)
    x = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    variables = jax.eval_shape(lambda x: model.init(rngs, x, train=False), x)
    forward = jax.jit(lambda variables, x: model.apply(variables, x, train=False))
    lowered = forward.lower(variables, x)
    cost = lowered.cost_analysis() or lowered.compile().cost_analysis()
    output = jax.eval_shape(forward, variables, x)
    trainable = count(variables["params"])
    total = count(variables)
    return {"name": name, "head": head, "num_classes": num_classes,
            "input_shape": list(x.shape), "output_shape": list(output.shape),
            "trainable_params": trainable, "non_trainable_params": total - trainable,
            "total_params": total, "gflops": cost["flops"] / 1e9}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m backbones", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="registered backbone names, one a line")
    summary = commands.add_parser("summary", help="parameter counts and forward GFLOPs")
    summary.add_argument("name")
    summary.add_argument("--num-classes", type=int, default=None,
                         help=f"default {len(DEFAULT_CLASSES)} (none for --head features)")
    summary.add_argument("--head", default="linear", choices=backbones.HEADS)
    summary.add_argument("--image-size", type=int, default=224)
    summary.add_argument("--channels", type=int, default=3)
    summary.add_argument("--json", action="store_true", help="one JSON object on stdout")
    weights = commands.add_parser("weights", help="the Keras ImageNet weight file cache")
    actions = weights.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="cached files, their size and whether the MD5 is official")
    download = actions.add_parser("download", help="fetch and verify missing files")
    download.add_argument("names", nargs="*", help=f"of {', '.join(pretrained.KERAS)}")
    download.add_argument("--all", action="store_true", help="every backbone with weights")
    download.add_argument("--include-top", action="store_true",
                          help="the file with the ImageNet classifier instead of the notop one")
    download.add_argument("--no-progress", dest="progress", action="store_false",
                          help="no progress bar")
    return parser


def weights_command(args: argparse.Namespace) -> int:
    """`weights list` / `weights download`; errors are one `error: ...` line and exit 2."""
    try:
        if args.action == "list":
            cached = backbones.weights.list_cached()
            print(f"{pretrained.weights_folder()}: {len(cached) or 'no'} weight "
                  f"file{'s' * (len(cached) != 1)}")
            for entry in cached:
                md5 = "official MD5" if entry.verified else "MD5 NOT official"
                print(f"{entry.path.name:<60} {entry.size / 2**20:>8.1f} MiB  {md5}")
            return 0
        if args.all == bool(args.names):
            raise ValueError("name the backbones to download, or give --all")
        for name in pretrained.KERAS if args.all else args.names:
            print(backbones.weights.fetch(name, args.include_top, progress=args.progress))
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "list":
        print("\n".join(backbones.names()))
        return 0
    if args.command == "weights":
        return weights_command(args)
    num_classes = args.num_classes
    if num_classes is None and args.head != "features":
        num_classes = len(DEFAULT_CLASSES)
    try:
        info = summarize(args.name, num_classes=num_classes, head=args.head,
                         image_size=args.image_size, channels=args.channels)
    except (ValueError, TypeError) as error:
        parser.error(str(error))
    if args.json:
        print(json.dumps(info))
    else:
        for key, value in info.items():
            shown = value
            if key == "gflops":
                shown = f"{value:.3f}"
            elif isinstance(value, int):
                shown = f"{value:,}"
            print(f"{key:>22}: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
