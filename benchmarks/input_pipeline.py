"""Input-pipeline throughput: decode + preprocess (+ host augment) per Grain worker count, and
on-device JAX augmentation, at 128 and 224 px over the synthetic dataset.

    python -m benchmarks.input_pipeline [--count N] [--json OUT]

Host rows time `--epochs` passes over `count` examples through `make_loader` after the first
batch (worker start-up excluded) and report the median images/s of `--repeats` runs. Several
epochs matter: Grain's reader prefetches up to 500 records on threads, so a single short pass
would mostly time records decoded before the clock started. The
device rows time `augment_batch` under jit after compilation, and `augment_image` (the host
transform alone, one process) for comparison. Prints a markdown table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from data_pipeline.augment import AugmentConfig, augment_batch, augment_image
from data_pipeline.datasets import load_dataset
from data_pipeline.loader import make_loader
from data_pipeline.preprocess import PreprocessConfig


def _median_rate(run, images: int, repeats: int) -> float:
    """Median images/s of `repeats` calls of `run()` that each process `images` images."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        rates.append(images / (time.perf_counter() - start))
    return statistics.median(rates)


def host_rate(source, size: int, workers: int, augment: AugmentConfig | None, *,
              batch_size: int, channels: int, epochs: int, repeats: int) -> float:
    """images/s of the Grain loader (decode + preprocess [+ augment]) after its first batch."""
    indices = np.arange(len(source))
    rates = []
    for r in range(repeats):
        loader = make_loader(source, indices, batch_size=batch_size,
                             preprocess=PreprocessConfig(image_size=size, channels=channels),
                             augment=augment, seed=r, num_epochs=epochs, worker_count=workers)
        it = iter(loader)
        next(it)  # start-up (worker spawn, first reads) is not throughput
        start, n = time.perf_counter(), 0
        for batch in it:
            n += len(batch["index"])
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def device_rate(size: int, cfg: AugmentConfig, *, batch_size: int, channels: int,
                repeats: int) -> float:
    """images/s of `augment_batch` on the default JAX device, compiled once beforehand."""
    images = jax.device_put(np.random.default_rng(0).random(
        (batch_size, size, size, channels), dtype=np.float32))
    key = jax.random.key(0)
    augment_batch(key, images, cfg).block_until_ready()
    steps = 8
    def run():
        for i in range(steps):
            augment_batch(jax.random.fold_in(key, i), images, cfg).block_until_ready()
    return _median_rate(run, steps * batch_size, repeats)


def host_transform_rate(size: int, cfg: AugmentConfig, *, channels: int, repeats: int) -> float:
    """images/s of `augment_image` alone in this process (no loader)."""
    image = np.random.default_rng(0).random((size, size, channels), dtype=np.float32)
    rng, count = np.random.default_rng(0), 32
    return _median_rate(lambda: [augment_image(image, rng, cfg) for _ in range(count)],
                        count, repeats)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=256, help="synthetic examples per pass")
    parser.add_argument("--source-size", type=int, default=256, help="stored image size (px)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=8, help="passes per timed run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=1, choices=(1, 3))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache-dir", default=None,
                        help="where the synthetic build is cached (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    args = parser.parse_args(argv)

    cache = args.cache_dir or os.path.join(tempfile.gettempdir(), "cxr-bench-tfds")
    ds = load_dataset("synthetic_cxr", cache_dir=cache, count=args.count,
                      image_size=args.source_size, seed=0)
    cfg = AugmentConfig()
    common = {"channels": args.channels, "repeats": args.repeats}
    rows = []
    for size in args.sizes:
        for workers in args.workers:
            for aug in (None, cfg):
                rate = host_rate(ds.source, size, workers, aug, batch_size=args.batch_size,
                                 epochs=args.epochs, **common)
                rows.append({"size": size, "stage": "grain loader", "workers": workers,
                             "augment": "host" if aug else "none", "images_per_s": rate})
        rows.append({"size": size, "stage": "augment_image (numpy/scipy)", "workers": None,
                     "augment": "host", "images_per_s": host_transform_rate(size, cfg, **common)})
        rows.append({"size": size, "stage": "augment_batch (jax jit)", "workers": None,
                     "augment": f"device ({jax.default_backend()})",
                     "images_per_s": device_rate(size, cfg, batch_size=args.batch_size, **common)})

    print(f"\ninput pipeline, {args.count} synthetic {args.source_size}px examples x "
          f"{args.epochs} epochs, batch "
          f"{args.batch_size}, {args.channels} channel(s), median of {args.repeats}; "
          f"{os.cpu_count()} CPU(s), JAX {jax.default_backend()}\n")
    print("| size | stage | workers | augment | images/s |\n|---|---|---|---|---|")
    for r in rows:
        w = "-" if r["workers"] is None else r["workers"]
        print(f"| {r['size']} | {r['stage']} | {w} | {r['augment']} | {r['images_per_s']:.0f} |")
    result = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "jax_backend": jax.default_backend(),
                          "jax_devices": [str(d) for d in jax.devices()]},
              "rows": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
