"""Draw docs/img/tp2p5d.png: how ``tp2.5d`` cuts a weight and an activation on 2 stacked 2 x 2 grids of ranks
(depth d = 2, q = 2), and the one step its backward adds to ``tp2d``'s: each weight block's gradient all-reduced over
the depth.

matplotlib is not a dependency of lightning_par; run this in a throwaway environment:

    python3 -m venv /tmp/plotenv && /tmp/plotenv/bin/pip install matplotlib
    /tmp/plotenv/bin/python docs/img/make_tp2p5d_figure.py
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, Rectangle  # noqa: E402

HERE = Path(__file__).resolve().parent
# Rank (l, i, j): layer 0 in tp2d.png's four colours (by (i, j)), layer 1 in the four others of tp3d.png.
RANK_COLORS = {(0, 0, 0): "#cfe3f7", (0, 0, 1): "#fde2c4", (0, 1, 0): "#d9f0d3", (0, 1, 1): "#ead7f0",
               (1, 0, 0): "#fff3b0", (1, 0, 1): "#f7d0d8", (1, 1, 0): "#c9ece8", (1, 1, 1): "#e3e3e3"}
EDGE = "#333333"
REDUCE = "#c06000"
D = 2
Q = 2


def _cell(ax, x: float, y: float, w: float, h: float, rank, text: str, fontsize: float = 9.0) -> None:
    ax.add_patch(Rectangle((x, y), w, h, facecolor=RANK_COLORS[rank], edgecolor=EDGE, linewidth=1.4))
    if text:
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize)


def _span(ax, start, end, label: str, at, rotation: float = 0) -> None:
    ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle="<->", color=EDGE))
    ax.text(*at, label, rotation=rotation, ha="center", va="center", fontsize=9)


def panel_weight(ax) -> None:
    """W [out, in] in 2 x 2 blocks: layer 1's copy drawn behind layer 0's, block (i, j) on rank (l, i, j) of both."""
    ax.set_xlim(0, 6)
    ax.set_ylim(0, 6)
    ax.axis("off")
    ax.set_title("(a) a weight W [out, in], in both layers", loc="left", fontsize=11, fontweight="bold")
    x0, y0, w, h, shift = 0.9, 1.3, 4.1, 3.2, 0.32
    bw, bh = w / Q, h / Q
    for layer in reversed(range(D)):  # layer 1 behind, shifted up and right
        dx = dy = shift * layer
        for i in range(Q):
            for j in range(Q):
                text = f"out {i}, in {j}\nranks (l,{i},{j}),\nl = 0, 1" if layer == 0 else ""
                _cell(ax, x0 + dx + j * bw, y0 + dy + h - (i + 1) * bh, bw, bh, (layer, i, j), text, 9.0)
    ax.text(x0 + w + shift + 0.1, y0 + h + shift - 0.15, "layer 1\n(behind)", ha="left", va="center", fontsize=8.5)
    ax.text(x0 - 0.1, y0 - 0.2, "layer 0", ha="left", va="center", fontsize=8.5)
    _span(ax, (x0, y0 + h + shift + 0.3), (x0 + w, y0 + h + shift + 0.3), "in: block j (the grid's column)",
          (x0 + w / 2, y0 + h + shift + 0.57))
    _span(ax, (x0 - 0.35, y0), (x0 - 0.35, y0 + h), "out: block i (the grid's row)", (x0 - 0.62, y0 + h / 2),
          rotation=90)
    ax.text(3.1, 0.45, "each rank: 1/4 of every weight, the same block in both layers;\n"
            "a bias or norm vector: block j on column j of both layers", ha="center", va="center", fontsize=9,
            style="italic")


def panel_activation(ax) -> None:
    """X [tokens, hidden]: the samples in d*q blocks, layer-major (block l*q + i), the hidden dim in q (block j)."""
    ax.set_xlim(0, 6)
    ax.set_ylim(0, 6)
    ax.axis("off")
    ax.set_title("(b) an activation X [tokens, hidden]", loc="left", fontsize=11, fontweight="bold")
    x0, y0, w, h = 1.2, 1.3, 4.3, 3.6
    cw, ch = w / Q, h / (D * Q)
    for layer in range(D):
        for i in range(Q):
            block = layer * Q + i
            for j in range(Q):
                _cell(ax, x0 + j * cw, y0 + h - (block + 1) * ch, cw, ch, (layer, i, j),
                      f"({layer},{i},{j}): samples {block}, hidden {j}", 8.8)
    ax.plot([x0, x0 + w], [y0 + h / 2] * 2, color=EDGE, linewidth=3.0)  # the layers' halves of the batch
    for layer in range(D):
        ax.text(x0 + w + 0.18, y0 + h - (layer + 0.5) * h / D, f"layer {layer}", rotation=90, ha="center",
                va="center", fontsize=8.5)
    _span(ax, (x0, y0 + h + 0.35), (x0 + w, y0 + h + 0.35), "hidden: block j", (x0 + w / 2, y0 + h + 0.62))
    _span(ax, (x0 - 0.35, y0), (x0 - 0.35, y0 + h), "samples: block l*q + i", (x0 - 0.62, y0 + h / 2),
          rotation=90)
    ax.text(3.35, 0.45, "each rank: 1/8 of every activation;\n"
            "layer 0 takes sample blocks 0, 1, layer 1 blocks 2, 3", ha="center", va="center", fontsize=9,
            style="italic")


def panel_depth(ax) -> None:
    """Backward: after SUMMA's dW = dY^T X in each layer, rank (0, i, j) and rank (1, i, j) sum their dW(i, j)."""
    ax.set_xlim(0, 7)
    ax.set_ylim(0, 6)
    ax.axis("off")
    ax.set_title("(c) backward: dW summed over the depth", loc="left", fontsize=11, fontweight="bold")
    size_w, size_h, gap = 1.1, 0.95, 0.25
    left = 1.35
    tops = {0: 3.65, 1: 1.45}
    for layer in range(D):
        ax.text(left - 0.15, tops[layer] + size_h / 2, f"layer {layer}\nsamples\n{layer * Q}, {layer * Q + 1}",
                ha="right", va="center", fontsize=8.5)
        for k, (i, j) in enumerate((i, j) for i in range(Q) for j in range(Q)):
            x = left + k * (size_w + gap)
            ax.add_patch(Rectangle((x, tops[layer]), size_w, size_h, facecolor=RANK_COLORS[(layer, i, j)],
                                   edgecolor=EDGE, linewidth=1.4))
            ax.text(x + size_w / 2, tops[layer] + size_h - 0.25, f"({layer},{i},{j})", ha="center", va="center",
                    fontsize=9, fontweight="bold")
            ax.text(x + size_w / 2, tops[layer] + 0.3, f"dW({i},{j})", ha="center", va="center", fontsize=8.2,
                    family="monospace")
            if layer == 0:
                middle = x + size_w / 2
                ax.add_patch(FancyArrowPatch((middle, tops[0] - 0.05), (middle, tops[1] + size_h + 0.05),
                                             arrowstyle="<|-|>", mutation_scale=12, color=REDUCE, linewidth=1.8))
    ax.text(left + 2 * size_w + 1.5 * gap, (tops[0] + tops[1] + size_h) / 2 + 0.02, "all-reduce (sum)",
            ha="center", va="center", fontsize=8.5, color=REDUCE,
            bbox=dict(facecolor="white", edgecolor="none", pad=1.0))
    ax.text(3.5, 5.25, "each layer's dW(i,j) comes from SUMMA on its own samples", ha="center", va="center",
            fontsize=8.5)
    ax.text(3.5, 0.6, "orange: one all-reduce per weight over the 2 ranks (l, i, j), in backward;\n"
            "then both layers hold the same dW(i,j). The forward adds nothing to tp2d's.",
            ha="center", va="center", fontsize=8.5)


def main() -> None:
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.6), gridspec_kw={"width_ratios": [1, 1, 1.15]})
    panel_weight(axes[0])
    panel_activation(axes[1])
    panel_depth(axes[2])
    fig.suptitle("tp2.5d on 2 stacked 2 x 2 grids: rank (l, i, j) holds 1/4 of every weight and 1/8 of every "
                 "activation", fontsize=12.5, fontweight="bold")
    fig.tight_layout()
    fig.savefig(HERE / "tp2p5d.png", dpi=110)


if __name__ == "__main__":
    main()
