"""Draw docs/img/tp2d.png: how ``tp2d`` cuts an activation and a weight on a 2 x 2 grid of ranks, and one SUMMA step
of ``Y = X W^T``.

matplotlib is not a dependency of lightning_par; run this in a throwaway environment:

    python3 -m venv /tmp/plotenv && /tmp/plotenv/bin/pip install matplotlib
    /tmp/plotenv/bin/python docs/img/make_tp2d_figure.py
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, Rectangle  # noqa: E402

HERE = Path(__file__).resolve().parent
RANK_COLORS = {(0, 0): "#cfe3f7", (0, 1): "#fde2c4", (1, 0): "#d9f0d3", (1, 1): "#ead7f0"}
EDGE = "#333333"
Q = 2


def _blocks(ax, x0: float, y0: float, w: float, h: float, label) -> None:
    """A matrix of w x h drawn as Q x Q blocks, block (i, j) (row i from the top) in rank (i, j)'s colour."""
    bw, bh = w / Q, h / Q
    for i in range(Q):
        for j in range(Q):
            x, y = x0 + j * bw, y0 + h - (i + 1) * bh
            ax.add_patch(Rectangle((x, y), bw, bh, facecolor=RANK_COLORS[(i, j)], edgecolor=EDGE, linewidth=1.4))
            ax.text(x + bw / 2, y + bh / 2, label(i, j), ha="center", va="center", fontsize=9.5)


def panel_activation(ax) -> None:
    ax.set_xlim(0, 6)
    ax.set_ylim(0, 6)
    ax.axis("off")
    ax.set_title("an activation X [samples, hidden]", loc="left", fontsize=11, fontweight="bold")
    _blocks(ax, 1.0, 1.0, 4.4, 4.0, lambda i, j: f"rank ({i},{j})\nsamples {i}\nhidden {j}")
    ax.annotate("", xy=(0.6, 1.0), xytext=(0.6, 5.0), arrowprops=dict(arrowstyle="<->", color=EDGE))
    ax.text(0.35, 3.0, "batch over the grid's rows", rotation=90, ha="center", va="center", fontsize=9)
    ax.annotate("", xy=(1.0, 5.35), xytext=(5.4, 5.35), arrowprops=dict(arrowstyle="<->", color=EDGE))
    ax.text(3.2, 5.6, "hidden over the grid's columns", ha="center", va="center", fontsize=9)
    ax.text(3.2, 0.45, "each rank: 1/4 of every activation", ha="center", fontsize=9, style="italic")


def panel_weight(ax) -> None:
    ax.set_xlim(0, 6)
    ax.set_ylim(0, 6)
    ax.axis("off")
    ax.set_title("a weight W [out, in] (torch's layout)", loc="left", fontsize=11, fontweight="bold")
    _blocks(ax, 1.0, 1.0, 4.4, 4.0, lambda i, j: f"rank ({i},{j})\nout {i}\nin {j}")
    ax.text(3.2, 0.45, "each rank: 1/4 of every weight;\na bias or norm vector: block j down column j",
            ha="center", fontsize=9, style="italic")


def panel_summa(ax) -> None:
    ax.set_xlim(0, 6)
    ax.set_ylim(0, 6)
    ax.axis("off")
    ax.set_title("SUMMA step k = 0 of Y = X W^T", loc="left", fontsize=11, fontweight="bold")
    size = 1.7
    origin = {(i, j): (1.0 + j * (size + 0.6), 3.0 - i * (size + 0.5)) for i in range(Q) for j in range(Q)}
    for (i, j), (x, y) in origin.items():
        ax.add_patch(Rectangle((x, y), size, size, facecolor=RANK_COLORS[(i, j)], edgecolor=EDGE, linewidth=1.4))
        ax.text(x + size / 2, y + size - 0.28, f"rank ({i},{j})", ha="center", fontsize=9, fontweight="bold")
        ax.text(x + size / 2, y + size / 2 - 0.15, f"X({i},{j}) W(0,{j})^T", ha="center", fontsize=8.2,
                family="monospace")
    for j in range(Q):  # W(0, j) broadcast down column j from row 0
        x, y = origin[(0, j)]
        ax.add_patch(FancyArrowPatch((x + size * 0.8, y), (x + size * 0.8, origin[(1, j)][1] + size),
                                     arrowstyle="-|>", mutation_scale=12, color="#1f5f9e", linewidth=1.8))
    for i in range(Q):  # partial Y reduced along row i to column 0
        x, y = origin[(i, 1)]
        ax.add_patch(FancyArrowPatch((x, y + 0.35), (origin[(i, 0)][0] + size, y + 0.35), arrowstyle="-|>",
                                     mutation_scale=12, color="#c06000", linewidth=1.8))
    ax.text(3.0, 0.05, "blue: broadcast W(0,j) down column j\norange: reduce the partial Y along row i to column 0\n"
            "(step 1: row 1's blocks, to column 1)", ha="center", fontsize=8.5)


def main() -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.2))
    panel_activation(axes[0])
    panel_weight(axes[1])
    panel_summa(axes[2])
    fig.suptitle("tp2d on a 2 x 2 grid: rank (i, j) holds block (i, j) of every matrix", fontsize=12.5,
                 fontweight="bold")
    fig.tight_layout()
    fig.savefig(HERE / "tp2d.png", dpi=110)


if __name__ == "__main__":
    main()
