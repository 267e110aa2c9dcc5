"""One way to make and save a matplotlib figure (Agg backend, no display needed), for every report plot."""

from __future__ import annotations

from pathlib import Path


def new_figure(size: tuple[float, float] = (7, 4)):
    """(pyplot, figure, axes) on the Agg backend; matplotlib is imported only when a plot is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    return plt, fig, ax


def save_figure(plt, fig, ax, path: str | Path, xlabel: str, ylabel: str, title: str, legend: bool = True) -> Path:
    """Labels, grid and legend, then a 110-dpi PNG; the figure is closed."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9 if len(title) > 50 else None)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
