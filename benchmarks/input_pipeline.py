"""Input-pipeline throughput: the Grain loader decoding every example vs reading the
decode-once array store, per Grain worker count, plus on-device JAX augmentation, at 128 and
224 px over the synthetic dataset.

    python -m benchmarks.input_pipeline [--count N] [--json OUT] [--quick]

Host rows time `--epochs` passes over `count` examples through `make_loader` after the first
batch (worker start-up excluded) and report the median images/s of `--repeats` runs. Several
epochs matter: Grain's reader prefetches up to 500 records on threads, so a single short pass
would mostly time records decoded before the clock started. "decode" rows decode and resize
every example (`cache_arrays=False`); "cached" rows slice the uint8 store, built once before
timing (its build time is a row of its own), finishing images (channels, normalisation) on
the host or handing uint8 out for the device to finish. The per-core table divides the images of the
in-process (0 workers) runs by the CPU seconds this process spent on them, all threads
included, and gives the cores needed to feed `--target` images/s. The device rows time
`augment_batch` under jit after compilation, and `augment_image` (the host transform alone,
one process) for comparison. Prints markdown tables, writes JSON. `--quick` runs tiny sizes in
seconds to check the script, not to measure.
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

from data_pipeline.array_cache import cached_source
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


def host_rate(source, cfg: PreprocessConfig, workers: int, augment: AugmentConfig | None, *,
              cache_arrays: bool, finish_on_host: bool, batch_size: int, epochs: int,
              repeats: int) -> tuple[float, float]:
    """Median images/s of the Grain loader after its first batch, wall-clock and per CPU
    second of this process (meaningful for 0 workers, where all the work is in-process)."""
    indices = np.arange(len(source))
    rates, cpu_rates = [], []
    for r in range(repeats):
        loader = make_loader(source, indices, batch_size=batch_size, preprocess=cfg,
                             augment=augment, seed=r, num_epochs=epochs, worker_count=workers,
                             cache_arrays=cache_arrays, finish_on_host=finish_on_host)
        it = iter(loader)
        next(it)  # start-up (worker spawn, first reads) is not throughput
        start, cpu_start, n = time.perf_counter(), time.process_time(), 0
        for batch in it:
            n += len(batch["index"])
        rates.append(n / (time.perf_counter() - start))
        cpu_rates.append(n / max(time.process_time() - cpu_start, 1e-9))
    return statistics.median(rates), statistics.median(cpu_rates)


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


def _args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=256, help="synthetic examples per pass")
    parser.add_argument("--source-size", type=int, default=256, help="stored image size (px)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=8, help="passes per timed run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=1, choices=(1, 3))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--target", type=float, default=8000.0,
                        help="images/s an accelerator needs; the per-core table sizes the host")
    parser.add_argument("--cache-dir", default=None,
                        help="where the synthetic build is cached (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, one repeat: checks the script in seconds")
    args = parser.parse_args(argv)
    if args.quick:
        args.count, args.source_size, args.sizes, args.workers = 24, 48, [16, 24], [0]
        args.epochs, args.batch_size, args.repeats = 2, 8, 1
    if 0 not in args.workers:
        parser.error("--workers must include 0 (the per-core figures come from those runs)")
    return args


def main(argv=None) -> dict:
    args = _args(argv)
    cache = args.cache_dir or os.path.join(tempfile.gettempdir(), "cxr-bench-tfds")
    ds = load_dataset("synthetic_cxr", cache_dir=cache, count=args.count,
                      image_size=args.source_size, seed=0)
    aug = AugmentConfig()
    common = {"channels": args.channels, "repeats": args.repeats}
    rows, per_core = [], []
    for size in args.sizes:
        cfg = PreprocessConfig(image_size=size, channels=args.channels)
        start = time.perf_counter()
        cached_source(ds.source, cfg)    # built here once (or found), not inside a timed run
        rows.append({"size": size, "stage": "array store: find or build", "path": "cached",
                     "finish": None, "workers": None, "augment": "none",
                     "images_per_s": len(ds) / (time.perf_counter() - start)})
        cpu = {}
        variants = (("decode", None, True), ("decode", aug, True), ("cached", None, True),
                    ("cached", None, False))
        for workers in args.workers:
            for path, augment, on_host in variants:
                rate, cpu_rate = host_rate(
                    ds.source, cfg, workers, augment, cache_arrays=path == "cached",
                    finish_on_host=on_host, batch_size=args.batch_size, epochs=args.epochs,
                    repeats=args.repeats)
                finish = "host" if on_host else "device (uint8 out)"
                rows.append({"size": size, "stage": "grain loader", "path": path,
                             "finish": finish, "workers": workers,
                             "augment": "host" if augment else "none", "images_per_s": rate})
                if workers == 0 and augment is None:
                    cpu[path, on_host] = cpu_rate
        decode, cached, uint8 = cpu["decode", True], cpu["cached", True], cpu["cached", False]
        per_core.append({"size": size, "decode_per_core": decode, "cached_per_core": cached,
                         "cached_uint8_per_core": uint8, "speedup": cached / decode,
                         "speedup_uint8": uint8 / decode,
                         "cores_for_target": args.target / cached,
                         "cores_for_target_uint8": args.target / uint8,
                         "decode_cores_for_target": args.target / decode})
        rows.append({"size": size, "stage": "augment_image (numpy/scipy)", "path": None,
                     "finish": None, "workers": None, "augment": "host",
                     "images_per_s": host_transform_rate(size, aug, **common)})
        rows.append({"size": size, "stage": "augment_batch (jax jit)", "path": None,
                     "finish": None, "workers": None, "augment": f"device ({jax.default_backend()})",
                     "images_per_s": device_rate(size, aug, batch_size=args.batch_size,
                                                 **common)})

    print(f"\ninput pipeline, {args.count} synthetic {args.source_size}px examples x "
          f"{args.epochs} epochs, batch "
          f"{args.batch_size}, {args.channels} channel(s), median of {args.repeats}; "
          f"{os.cpu_count()} CPU(s), JAX {jax.default_backend()}"
          f"{' (--quick: not a measurement)' if args.quick else ''}\n")
    print("| size | stage | path | finish | workers | augment | images/s |\n"
          "|---|---|---|---|---|---|---|")
    for r in rows:
        w = "-" if r["workers"] is None else r["workers"]
        print(f"| {r['size']} | {r['stage']} | {r['path'] or '-'} | {r['finish'] or '-'} | {w} "
              f"| {r['augment']} | {r['images_per_s']:.0f} |")
    print(f"\nimages per CPU second (0 workers, no host augmentation) and the cores that feed "
          f"{args.target:g} images/s\n")
    print("| size | decode | cached, host finish | cached, uint8 out | speed-up (host / uint8) "
          "| cores: decode | cores: cached (host / uint8) |\n|---|---|---|---|---|---|---|")
    for r in per_core:
        print(f"| {r['size']} | {r['decode_per_core']:.0f} | {r['cached_per_core']:.0f} | "
              f"{r['cached_uint8_per_core']:.0f} | {r['speedup']:.1f}x / "
              f"{r['speedup_uint8']:.1f}x | {r['decode_cores_for_target']:.1f} | "
              f"{r['cores_for_target']:.2f} / {r['cores_for_target_uint8']:.2f} |")
    result = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "jax_backend": jax.default_backend(),
                          "jax_devices": [str(d) for d in jax.devices()]},
              "rows": rows, "per_core": per_core}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
