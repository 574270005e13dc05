"""Learning curves (train/val loss, accuracy and validation macro-F1 per epoch) as one PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

SPLIT_STYLE = {"train": {"label": "training", "color": "C0"},
               "val": {"label": "validation", "color": "C1"}}
PANELS = (("loss", "Loss (cross-entropy)"), ("accuracy", "Accuracy"),
          ("macro_f1", "Macro-F1"))


def panels(history: Sequence[dict]) -> list[tuple[str, str, tuple[str, ...]]]:
    """(metric, title, splits with values) for every metric of PANELS the records hold."""
    found = []
    for name, title in PANELS:
        splits = tuple(split for split in ("train", "val")
                       if any(h.get(f"{split}_{name}") is not None for h in history))
        if splits:
            found.append((name, title, splits))
    return found


def plot_curves(history: Sequence[dict], path: str | Path, *, subtitle: str = "") -> Path:
    """Plot the per-epoch records (`train_*`/`val_*` keys): one titled panel per metric that
    has values, train and validation on the same axes. `subtitle` says what was averaged."""
    epochs = [h["epoch"] for h in history]
    shown = panels(history)
    fig, axes = plt.subplots(1, len(shown), figsize=(5 * len(shown), 4), squeeze=False)
    for ax, (name, title, splits) in zip(axes[0], shown, strict=True):
        for split in splits:
            ax.plot(epochs, [h.get(f"{split}_{name}") for h in history], marker="o",
                    **SPLIT_STYLE[split])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(name.replace("_", "-"))
        ax.grid(alpha=0.3)
        ax.legend()
    if subtitle:
        fig.suptitle(subtitle)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
