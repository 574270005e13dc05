"""`python -m experiments.segment --dataset NAME [--data-dir DIR] --out RUN [flags]`: train the
lung segmenter (a small U-Net, `ensembles.training.segmenter`) on the masks a dataset ships (Kaggle
COVID-19 Radiography v4's masks/, or the synthetic phantoms), report its Dice on the held-out
patient-grouped test split next to the trivial masks', and save it as a bundle in RUN.

Then `--lung-mask auto --segmenter RUN` in a training CLI masks any dataset with it.
Exit code 2 with `error: ...` for a dataset without masks or a bad setting.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from data_pipeline.datasets import DATASETS, load_dataset
from data_pipeline.splits import RECIPES
from ensembles.bundle.segmenter import SegmenterConfig
from ensembles.config import dataset_for
from ensembles.training.segmenter import train_segmenter
from experiments import common


def main(argv: Sequence[str] | None = None) -> int:
    d = SegmenterConfig()
    parser = common.Parser(prog="python -m experiments.segment", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=DATASETS,
                        help="default: synthetic_cxr, or the layout --data-dir holds")
    parser.add_argument("--data-dir", help="source folder of a real dataset")
    parser.add_argument("--cache-dir", help="where built datasets are cached")
    parser.add_argument("--count", type=int, default=1000, help="synthetic_cxr: examples")
    parser.add_argument("--out", required=True, help="segmenter run folder (new or empty)")
    parser.add_argument("--image-size", type=int, default=d.image_size)
    parser.add_argument("--width", type=int, default=d.width, help="channels at full size")
    parser.add_argument("--levels", type=int, default=d.levels, help="U-Net resolutions")
    parser.add_argument("--epochs", type=int, default=d.epochs)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--split-recipe", default=d.split_recipe, choices=tuple(RECIPES))
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bars")
    args = parser.parse_args(argv)
    try:
        name = dataset_for(args.dataset, args.data_dir)
        if args.dataset is None and args.data_dir:
            print(f"--data-dir {args.data_dir} holds {common.LAYOUT_NAMES[name]}: --dataset "
                  f"{name}", file=sys.stderr)
        config = SegmenterConfig(image_size=args.image_size, width=args.width,
                                 levels=args.levels, epochs=args.epochs,
                                 batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                 split_recipe=args.split_recipe)
        options = ({"count": args.count, "image_size": args.image_size,
                    "seed": args.seed} if name == "synthetic_cxr" else {})
        dataset = load_dataset(name, data_dir=args.data_dir, cache_dir=args.cache_dir,
                               **options)
        _, metrics = train_segmenter(dataset, config, out=args.out, progress=args.progress)
    except Exception as error:   # noqa: BLE001 (fail re-raises what is not the user's)
        return common.fail(error, argv)
    trivial = metrics["trivial"]
    print(f"segmenter on {dataset.name}: Dice {metrics['dice']:.3f} on "
          f"{metrics['test_images']} held-out images (all-lung mask {trivial['all_lung']:.3f}, "
          f"best constant mask {trivial['constant_mask']:.3f}); best epoch "
          f"{metrics['best_epoch']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
