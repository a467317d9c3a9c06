"""curves.png and confusion.png, for people who would rather look than read (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot_curves(history: dict, path: Path) -> None:
    epochs = history.get("epoch", [])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for key, style in ((metric, "-"), (f"val_{metric}", "--")):
            if history.get(key):
                ax.plot(epochs[: len(history[key])], history[key], style, label=key)
        phases = history.get("phase", [])
        for i in range(1, len(phases)):
            if phases[i] != phases[i - 1]:
                ax.axvline(epochs[i] - 0.5, color="grey", linewidth=0.8)
                ax.text(epochs[i] - 0.4, ax.get_ylim()[1], phases[i], va="top", fontsize=8, color="grey")
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_confusion(matrix: list[list[int]], labels: list[str], path: Path) -> None:
    n = len(labels)
    size = max(4.0, 0.5 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.set_xlabel("decision (at the accept threshold)")
    ax.set_ylabel("true person")
    for i in range(n):
        for j in range(n):
            if matrix[i][j]:
                ax.text(j, i, str(matrix[i][j]), ha="center", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
