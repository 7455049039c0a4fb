"""Pictures of evaluation results, as PNG files (matplotlib, headless)."""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def plot_feature_density(density: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """Histogram of log10 firing frequency; dead features are counted in the title."""
    density = density.float().cpu()
    live = density[density > 0]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(live.log10().numpy(), bins=50, color="tab:blue")
    ax.set_xlabel("log10 feature firing frequency")
    ax.set_ylabel("features")
    ax.set_title(f"{title}  ({int((density == 0).sum())} dead of {density.numel()})".strip())
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_pareto(
    series: dict[str, Sequence[dict[str, Any]]],
    path: str | Path,
    y_key: str = "ce_loss_increase",
    y_label: str = "CE loss increase (nats)",
) -> Path:
    """L0 vs ``y_key`` for each named series of evaluation rows (e.g. transcoders vs SAEs)."""
    fig, ax = plt.subplots(figsize=(9, 4), layout="constrained")
    for name, rows in series.items():
        points = sorted((float(r["l0"]), float(r[y_key])) for r in rows)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.set_xscale("log")
    low, high = ax.get_xlim()
    if high / low < 4:  # a narrow log axis labels its minor ticks on top of each other: widen it
        middle = (low * high) ** 0.5
        ax.set_xlim(middle / 2, middle * 2)
    ax.set_xlabel("L0 (active features per token)")
    ax.set_ylabel(y_label)
    # Outside the axes: with many series an inside legend hides points.
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")
    ax.grid(alpha=0.3)
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
