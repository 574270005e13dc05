"""Learning curves (train/val loss and accuracy per epoch) as one PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(history: Sequence[dict], path: str | Path) -> Path:
    """Plot the per-epoch records of metrics.jsonl: loss on the left, accuracy on the right."""
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, name in zip(axes, ("loss", "accuracy"), strict=True):
        for split in ("train", "val"):
            values = [h.get(f"{split}_{name}") for h in history]
            if any(v is not None for v in values):
                ax.plot(epochs, values, marker="o", label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
