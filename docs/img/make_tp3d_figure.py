"""Draw docs/img/tp3d.png: how ``tp3d`` cuts a weight and an activation on a 2 x 2 x 2 cube of ranks, and the three
collectives of one linear layer's forward, ``Y = X W^T``.

matplotlib is not a dependency of lightning_par; run this in a throwaway environment:

    python3 -m venv /tmp/plotenv && /tmp/plotenv/bin/pip install matplotlib
    /tmp/plotenv/bin/python docs/img/make_tp3d_figure.py
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, Rectangle  # noqa: E402

HERE = Path(__file__).resolve().parent
# Rank (x, y, z): the x = 0 half in tp2d.png's four colours (by (y, z)), the x = 1 half in four others.
RANK_COLORS = {(0, 0, 0): "#cfe3f7", (0, 0, 1): "#fde2c4", (0, 1, 0): "#d9f0d3", (0, 1, 1): "#ead7f0",
               (1, 0, 0): "#fff3b0", (1, 0, 1): "#f7d0d8", (1, 1, 0): "#c9ece8", (1, 1, 1): "#e3e3e3"}
EDGE = "#333333"
GATHER = "#1f5f9e"
SCATTER = "#c06000"
Q = 2


def _cell(ax, x: float, y: float, w: float, h: float, rank, text: str, fontsize: float = 9.0) -> None:
    ax.add_patch(Rectangle((x, y), w, h, facecolor=RANK_COLORS[rank], edgecolor=EDGE, linewidth=1.4))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize)


def _span(ax, start, end, label: str, at, rotation: float = 0) -> None:
    ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle="<->", color=EDGE))
    ax.text(*at, label, rotation=rotation, ha="center", va="center", fontsize=9)


def panel_weight(ax) -> None:
    """W [N, K] of a column-parallel layer: out blocks by z (rows), in blocks by y (columns), each in block cut in two
    along K by x."""
    ax.set_xlim(0, 6)
    ax.set_ylim(0, 6)
    ax.axis("off")
    ax.set_title("(a) a weight W [N out, K in], column-parallel", loc="left", fontsize=11, fontweight="bold")
    x0, y0, w, h = 0.9, 1.4, 4.6, 3.4
    cw, ch = w / (Q * Q), h / Q
    for z in range(Q):
        for y in range(Q):
            for x in range(Q):
                left, bottom = x0 + (y * Q + x) * cw, y0 + h - (z + 1) * ch
                _cell(ax, left, bottom, cw, ch, (x, y, z), f"({x},{y},{z})\nout {z}\nin {y}.{x}", 8.8)
    for y in range(1, Q):  # the in blocks (by y) drawn heavier than their halves (by x)
        ax.plot([x0 + y * Q * cw] * 2, [y0, y0 + h], color=EDGE, linewidth=3.0)
    _span(ax, (x0, y0 + h + 0.35), (x0 + w, y0 + h + 0.35), "in (K): block y, then half x of it",
          (x0 + w / 2, y0 + h + 0.62))
    _span(ax, (x0 - 0.35, y0), (x0 - 0.35, y0 + h), "out (N): block z", (x0 - 0.62, y0 + h / 2), rotation=90)
    ax.text(3.2, 0.75, "rank (x,y,z) holds 1/8 of W;\nrow-parallel: out by y, in by z then x",
            ha="center", va="center", fontsize=9, style="italic")


def panel_activation(ax) -> None:
    """X [tokens, hidden] in layout "y": samples in q^2 blocks (block x*q + z), hidden in q blocks (block y)."""
    ax.set_xlim(0, 6)
    ax.set_ylim(0, 6)
    ax.axis("off")
    ax.set_title('(b) an activation X [tokens, hidden], layout "y"', loc="left", fontsize=11, fontweight="bold")
    x0, y0, w, h = 1.2, 1.4, 4.2, 3.4
    cw, ch = w / Q, h / (Q * Q)
    for x in range(Q):
        for z in range(Q):
            block = x * Q + z
            for y in range(Q):
                _cell(ax, x0 + y * cw, y0 + h - (block + 1) * ch, cw, ch, (x, y, z),
                      f"({x},{y},{z}): samples {block}, hidden {y}", 8.8)
    _span(ax, (x0, y0 + h + 0.35), (x0 + w, y0 + h + 0.35), "hidden: block y", (x0 + w / 2, y0 + h + 0.62))
    _span(ax, (x0 - 0.35, y0), (x0 - 0.35, y0 + h), "samples: block x*q + z", (x0 - 0.62, y0 + h / 2),
          rotation=90)
    ax.text(3.3, 0.75, 'each rank: 1/8 of every activation;\nlayout "z": samples x*q + y, hidden block z',
            ha="center", va="center", fontsize=9, style="italic")


def _block(ax, x: float, y: float, w: float, h: float, rank, text: str) -> None:
    ax.add_patch(Rectangle((x, y), w, h, facecolor=RANK_COLORS[rank], edgecolor=EDGE, linewidth=1.4))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=8.2, family="monospace")


def _arrow(ax, start, end, color: str) -> None:
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=12, color=color, linewidth=1.8))


def panel_forward(ax) -> None:
    """Rank (0,0,0)'s forward of a column-parallel Linear3D (in_axis y, out_axis z), M tokens, K in, N out."""
    ax.set_xlim(0, 7)
    ax.set_ylim(0, 6)
    ax.axis("off")
    ax.set_title("(c) rank (0,0,0): the forward of Y = X W^T", loc="left", fontsize=11, fontweight="bold")
    me = (0, 0, 0)
    # 1. X's block [M/4, K/2], all-gathered over the z group (the samples of block x): [M/2, K/2].
    _block(ax, 0.2, 4.35, 1.3, 0.55, me, "X [M/4,K/2]")
    _block(ax, 2.75, 4.05, 1.3, 1.1, me, "X [M/2,K/2]")
    _arrow(ax, (1.55, 4.62), (2.7, 4.62), GATHER)
    ax.text(2.12, 5.35, "1. all-gather over z\n(with (0,0,1))", ha="center", va="center", fontsize=8.5,
            color=GATHER)
    # 2. W's piece [N/2, K/4], all-gathered over the x group: [N/2, K/2]. Launched with 1.
    _block(ax, 0.2, 2.3, 0.75, 1.2, me, "W\n[N/2,\nK/4]")
    _block(ax, 2.75, 2.3, 1.3, 1.2, me, "W\n[N/2,K/2]")
    _arrow(ax, (1.0, 2.9), (2.7, 2.9), GATHER)
    ax.text(1.85, 3.5, "2. all-gather over x\n(with (1,0,0))", ha="center", va="center", fontsize=8.5,
            color=GATHER)
    # The local product: a partial Y [M/2, N/2], summed over the in blocks (y) by the reduce-scatter.
    _block(ax, 4.75, 3.05, 1.3, 1.2, me, "partial Y\n[M/2,N/2]")
    _arrow(ax, (4.1, 4.5), (4.7, 3.95), EDGE)
    _arrow(ax, (4.1, 2.9), (4.7, 3.35), EDGE)
    ax.text(5.4, 4.55, "X W^T", ha="center", va="center", fontsize=8.5, family="monospace")
    # 3. reduce-scatter over the y group: the sum over K's blocks, the samples split in two: layout "z".
    _block(ax, 4.75, 1.0, 1.3, 0.6, me, "Y [M/4,N/2]")
    _arrow(ax, (5.4, 3.0), (5.4, 1.65), SCATTER)
    ax.text(6.45, 2.3, "3. reduce-\nscatter\nover y\n(with\n(0,1,0))", ha="center", va="center", fontsize=8.5,
            color=SCATTER)
    ax.text(3.4, 0.3, 'Y in layout "z": samples 0 (x*q + y), hidden block 0 (z).\n'
            "1 and 2 run at once; X and W as gathered are kept for backward",
            ha="center", va="center", fontsize=8.5)


def main() -> None:
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.6), gridspec_kw={"width_ratios": [1, 1, 1.15]})
    panel_weight(axes[0])
    panel_activation(axes[1])
    panel_forward(axes[2])
    fig.suptitle("tp3d on a 2 x 2 x 2 cube: rank (x, y, z) holds 1/8 of every weight and of every activation",
                 fontsize=12.5, fontweight="bold")
    fig.tight_layout()
    fig.savefig(HERE / "tp3d.png", dpi=110)


if __name__ == "__main__":
    main()
