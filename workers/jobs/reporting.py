"""Markdown tables and PNG plots for the hygiene and evaluation reports.

matplotlib runs on its file-only Agg backend: jobs run on headless machines.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.messages import LABELS


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_class_distribution(path: Path, counts: Mapping[str, Mapping[str, int]]) -> None:
    """Grouped bars: images per class in each split (or 'all')."""
    plt = _pyplot()
    groups = list(counts)
    positions = np.arange(len(groups))
    figure, axes = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(LABELS)
    for offset, label in enumerate(LABELS):
        values = [counts[group].get(label, 0) for group in groups]
        axes.bar(positions + offset * width, values, width, label=label)
    axes.set_xticks(positions + width * (len(LABELS) - 1) / 2, groups)
    axes.set_ylabel("images")
    axes.set_title("Class distribution")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_image_sizes(path: Path, widths: Sequence[int], heights: Sequence[int]) -> None:
    """Width x height scatter and a histogram of the shorter side."""
    plt = _pyplot()
    figure, (scatter, histogram) = plt.subplots(1, 2, figsize=(9, 3.5))
    scatter.scatter(widths, heights, s=8, alpha=0.5)
    scatter.set_xlabel("width (px)")
    scatter.set_ylabel("height (px)")
    scatter.set_title("Image sizes")
    histogram.hist(np.minimum(widths, heights), bins=min(30, max(5, len(widths) // 5)))
    histogram.set_xlabel("shorter side (px)")
    histogram.set_ylabel("images")
    histogram.set_title("Shorter side")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_pr_curves(path: Path, curves: Mapping[str, tuple[Sequence[float], Sequence[float]]]) -> None:
    """Precision against recall of the adult class, one line per signal."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(5, 4))
    for name, (precision, recall) in curves.items():
        axes.step(recall, precision, where="post", label=name)
    axes.set_xlabel("recall (adult)")
    axes.set_ylabel("precision (adult)")
    axes.set_xlim(0, 1.02)
    axes.set_ylim(0, 1.02)
    axes.set_title("Precision-recall")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_confusion(path: Path, matrices: Mapping[str, Sequence[Sequence[int]]]) -> None:
    """One confusion matrix per signal; rows are true labels, columns predicted."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(matrices), figsize=(3.2 * len(matrices), 3.2), squeeze=False)
    for ax, (name, matrix) in zip(axes[0], matrices.items(), strict=True):
        values = np.asarray(matrix)
        ax.imshow(values, cmap="Blues")
        for (row, column), count in np.ndenumerate(values):
            ax.text(column, row, str(count), ha="center", va="center")
        ax.set_xticks(range(len(LABELS)), LABELS)
        ax.set_yticks(range(len(LABELS)), LABELS)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(name)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_threshold_tradeoff(path: Path, thresholds: Sequence[float], review_share: Sequence[float],
                            recall: Sequence[float]) -> None:
    """What a review threshold costs (share of images a human sees) and buys (harmful images caught)."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(5, 4))
    axes.plot(thresholds, review_share, marker="o", label="share sent to review")
    axes.plot(thresholds, recall, marker="o", label="recall of harmful images")
    axes.set_xlabel("P(adult) threshold")
    axes.set_ylim(0, 1.02)
    axes.set_title("Review threshold trade-off")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
