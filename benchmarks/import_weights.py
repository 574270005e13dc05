"""Seconds to import each Keras ImageNet weight file with `backbones.pretrained.load_pretrained`.

    python -m benchmarks.import_weights [--models resnet50 ...] [--repeats 3] [--json OUT]

Uses the official files at `default_weights_path` when present. A missing file is replaced
by one Keras writes with random weights at the model's default input size (same layers,
shapes and format as the official file; needs `pip install keras`, KERAS_BACKEND=jax), and
the table says so in its `file` column. Times are the median of `--repeats` loads, each
including the MD5 check, the HDF5 read, the mapping and the shape checks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

from backbones import pretrained


def random_keras_file(name: str, include_top: bool, folder: Path) -> Path:
    """A legacy-format HDF5 file of Keras's `name` with random weights, written by Keras."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import h5py
    import keras
    from keras.src.legacy.saving.legacy_h5_format import save_weights_to_hdf5_group

    constructors = {"resnet50": "ResNet50", "vgg16": "VGG16", "vgg19": "VGG19",
                    "densenet121": "DenseNet121", "xception": "Xception",
                    "inception_v3": "InceptionV3"}
    model = getattr(keras.applications, constructors[name])(weights=None,
                                                            include_top=include_top)
    path = folder / pretrained.keras_file_name(name, include_top)
    with h5py.File(path, "w") as file:
        save_weights_to_hdf5_group(file, model)
    return path


def time_import(name: str, include_top: bool, path: Path, repeats: int) -> float:
    """Median seconds of `repeats` complete loads."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # random files are not official: expected here
            pretrained.load_pretrained(name, path, include_top=include_top)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(pretrained.KERAS),
                        choices=list(pretrained.KERAS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path("import_weights.json"))
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            for include_top in (True, False):
                path = pretrained.default_weights_path(name, include_top)
                official = path.is_file()
                if not official:
                    path = random_keras_file(name, include_top, Path(tmp))
                rows.append({"model": name, "include_top": include_top,
                             "file": "official" if official else "random (made by keras)",
                             "mb": round(path.stat().st_size / 2**20, 1),
                             "seconds": round(time_import(name, include_top, path,
                                                          args.repeats), 3)})
                if not official:
                    path.unlink()
                print(rows[-1], flush=True)

    print(f"\n{platform.node()}: {os.cpu_count()} CPUs, median of {args.repeats} loads\n")
    print("| model | top | file | MB | seconds |\n|---|---|---|---:|---:|")
    for row in rows:
        print(f"| {row['model']} | {row['include_top']} | {row['file']} | {row['mb']} | "
              f"{row['seconds']} |")
    args.json.write_text(json.dumps({"machine": f"{os.cpu_count()} CPUs", "rows": rows},
                                    indent=2))
    return rows


if __name__ == "__main__":
    main()
