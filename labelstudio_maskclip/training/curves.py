"""``curves.png`` of a run: loss per step and validation mIoU (candidate over the run, teacher, served)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["plot_curves"]


def plot_curves(metrics: dict, path: Path) -> None:
    """Loss per step (raw and smoothed) and validation mIoU (candidate over the run, teacher and served)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    loss = np.asarray(metrics["loss"], dtype=float)
    ax1.plot(np.arange(1, len(loss) + 1), loss, alpha=0.3, label="loss")
    if len(loss) >= 10:
        k = max(1, len(loss) // 20)
        ax1.plot(np.arange(k, len(loss) + 1), np.convolve(loss, np.ones(k) / k, mode="valid"), label=f"mean of {k}")
    ax1.set_xlabel("step"), ax1.set_ylabel("cross-entropy"), ax1.legend()
    evals = [(e["step"], e["miou"]) for e in metrics["val_miou"] if e["miou"] is not None]
    if evals:
        ax2.plot(*zip(*evals), marker="o", label="candidate")
    for name, style in (("teacher", "--"), ("current", ":")):
        value = metrics["miou"].get(name)
        if value is not None:
            ax2.axhline(value, linestyle=style, color="gray", label=name)
    ax2.set_xlabel("step"), ax2.set_ylabel("validation mIoU"), ax2.set_title(metrics["decision"][:60], fontsize=8)
    if ax2.get_legend_handles_labels()[0]:
        ax2.legend()
    else:
        ax2.text(0.5, 0.5, "no held-out people's masks yet:\nnothing to validate on", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
