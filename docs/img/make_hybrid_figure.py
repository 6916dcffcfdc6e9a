"""Draw docs/img/hybrid.png: how the ``hybrid`` strategy (HybridParallelStrategy) lays 8 ranks out as data 2 x
pipeline 2 x tensor 2, and what each axis does, in order.

matplotlib is not a dependency of lightning_par; run this in a throwaway environment:

    python3 -m venv /tmp/plotenv && /tmp/plotenv/bin/pip install matplotlib
    /tmp/plotenv/bin/python docs/img/make_hybrid_figure.py
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

HERE = Path(__file__).resolve().parent

BUILT_FACE, BUILT_EDGE = "#cfe3f7", "#1f5f9e"
REPLICA_FACE, REPLICA_EDGE = "#f6f6f6", "#8a8a8a"
TENSOR_FACE, TENSOR_EDGE = "#fde2c4", "#c06000"  # tensor group (as the collectives of tp1d_block.png)
P2P_COLOR = "#1f1f1f"  # pipeline point-to-point
DATA_COLOR = "#6a3d9a"  # data group

DATA, PIPE, TENSOR = 2, 2, 2

# ----- left panel geometry (data units) ---------------------------------------------------------------------------
REPLICA_X = (1.15, 5.75)  # left edge of replica d = 0, d = 1
REPLICA_W = 4.2
REPLICA_Y, REPLICA_H = 2.75, 5.45
STAGE_Y = {0: 5.75, 1: 3.0}  # bottom of the tensor-group box of stage 0, stage 1
STAGE_H = 1.35
RANK_W, RANK_H = 1.5, 1.05
RANK_DX = (0.4, 2.3)  # rank box offset from the replica's left edge, tensor rank 0 and 1
PORT = 0.3  # a data connector leaves a rank box this far in from its outer side


def _rank(d: int, p: int, t: int) -> int:
    """Row-major over (data, pipeline, tensor), tensor innermost."""
    return (d * PIPE + p) * TENSOR + t


def _round_box(ax, x, y, w, h, face, edge, lw=1.5, ls="-", rounding=0.08):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle=f"round,pad=0.02,rounding_size={rounding}", facecolor=face,
                                edgecolor=edge, linewidth=lw, linestyle=ls))


def _rank_box(ax, d: int, p: int, t: int) -> dict:
    x = REPLICA_X[d] + RANK_DX[t]
    y = STAGE_Y[p] + (STAGE_H - RANK_H) / 2
    _round_box(ax, x, y, RANK_W, RANK_H, BUILT_FACE, BUILT_EDGE, lw=2.0, rounding=0.06)
    ax.text(x + RANK_W / 2, y + RANK_H * 0.64, f"rank {_rank(d, p, t)}", ha="center", va="center", fontsize=10.5,
            fontweight="bold")
    ax.text(x + RANK_W / 2, y + RANK_H * 0.27, f"d{d} p{p} t{t}", ha="center", va="center", fontsize=8.5,
            family="monospace", color="#333333")
    port = x + PORT if t == 0 else x + RANK_W - PORT
    return {"x": x, "y": y, "cx": x + RANK_W / 2, "top": y + RANK_H, "bottom": y, "port": port}


def _data_link(ax, a: dict, b: dict, level: float, above: bool) -> None:
    """Dashed orthogonal connector between two rank boxes of one data group, routed above or below the replicas."""
    ya, yb = (a["top"], b["top"]) if above else (a["bottom"], b["bottom"])
    ax.plot([a["port"], a["port"], b["port"], b["port"]], [ya, level, level, yb], color=DATA_COLOR, linewidth=1.7,
            linestyle=(0, (4, 2.5)), solid_joinstyle="round", zorder=3)
    for x, y in ((a["port"], ya), (b["port"], yb)):
        ax.plot([x], [y], marker="o", markersize=4.5, color=DATA_COLOR, zorder=4)


def rank_grid(ax) -> None:
    ax.set_xlim(0, 10)
    ax.set_ylim(-0.05, 10.1)
    ax.axis("off")
    ax.set_title("8 ranks as data 2 x pipeline 2 x tensor 2", loc="left", fontsize=11, fontweight="bold")

    boxes = {}
    for d in range(DATA):
        rx = REPLICA_X[d]
        _round_box(ax, rx, REPLICA_Y, REPLICA_W, REPLICA_H, REPLICA_FACE, REPLICA_EDGE, lw=1.3, rounding=0.12)
        # Title between the two data connectors that leave this replica's stage 0 upwards.
        ax.text(rx + REPLICA_W / 2, STAGE_Y[0] + STAGE_H + 0.5,
                f"data replica d = {d}\nranks {_rank(d, 0, 0)}-{_rank(d, PIPE - 1, TENSOR - 1)}", ha="center",
                va="center", fontsize=9.5, fontweight="bold", linespacing=1.25)
        for p in range(PIPE):
            _round_box(ax, rx + 0.2, STAGE_Y[p], REPLICA_W - 0.4, STAGE_H, TENSOR_FACE, TENSOR_EDGE, lw=1.6,
                       ls=(0, (5, 2)), rounding=0.1)
            for t in range(TENSOR):
                boxes[d, p, t] = _rank_box(ax, d, p, t)

    # Row headers: the pipeline stages line up across the replicas.
    for p in range(PIPE):
        ax.text(0.55, STAGE_Y[p] + STAGE_H / 2, f"pipeline\nstage {p}", ha="center", va="center", fontsize=9.5,
                fontweight="bold", linespacing=1.25)

    # Pipeline: stage 0 -> stage 1 between ranks of the same tensor coordinate.
    for d in range(DATA):
        for t in range(TENSOR):
            a, b = boxes[d, 0, t], boxes[d, 1, t]
            ax.add_patch(FancyArrowPatch((a["cx"] - 0.12, a["bottom"]), (b["cx"] - 0.12, b["top"]),
                                         arrowstyle="-|>", mutation_scale=13, linewidth=1.5, color=P2P_COLOR,
                                         shrinkA=1, shrinkB=1))
            ax.add_patch(FancyArrowPatch((b["cx"] + 0.12, b["top"]), (a["cx"] + 0.12, a["bottom"]),
                                         arrowstyle="-|>", mutation_scale=13, linewidth=1.0, color="#888888",
                                         linestyle=(0, (3, 2)), shrinkA=1, shrinkB=1))
        mid = (STAGE_Y[1] + STAGE_H + STAGE_Y[0]) / 2
        ax.text(REPLICA_X[d] + REPLICA_W / 2, mid, "p2p", ha="center", va="center", fontsize=9, style="italic")

    # Data groups: the same (pipeline, tensor) coordinate across the replicas; stage 0 above, stage 1 below.
    top = REPLICA_Y + REPLICA_H
    _data_link(ax, boxes[0, 0, 0], boxes[1, 0, 0], top + 0.75, above=True)
    _data_link(ax, boxes[0, 0, 1], boxes[1, 0, 1], top + 0.35, above=True)
    _data_link(ax, boxes[0, 1, 0], boxes[1, 1, 0], REPLICA_Y - 0.7, above=False)
    _data_link(ax, boxes[0, 1, 1], boxes[1, 1, 1], REPLICA_Y - 0.32, above=False)
    ax.text(5.45, top + 0.75 + 0.22, "data groups {0, 4}, {1, 5}", ha="center", va="bottom", fontsize=9,
            color=DATA_COLOR, style="italic")
    ax.text(0.2, REPLICA_Y - 0.51, "{2, 6}, {3, 7}", ha="left", va="center", fontsize=9, color=DATA_COLOR,
            style="italic")

    # Key.
    y0, step = 1.3, 0.5
    _round_box(ax, 0.2, y0 - 0.15, 0.6, 0.3, TENSOR_FACE, TENSOR_EDGE, lw=1.6, ls=(0, (5, 2)), rounding=0.05)
    ax.text(1.0, y0, "tensor group (contiguous ranks: one NVLink island)", ha="left", va="center", fontsize=9.5)
    y1 = y0 - step
    ax.add_patch(FancyArrowPatch((0.2, y1 + 0.08), (0.8, y1 + 0.08), arrowstyle="-|>", mutation_scale=11,
                                 linewidth=1.5, color=P2P_COLOR, shrinkA=0, shrinkB=0))
    ax.add_patch(FancyArrowPatch((0.8, y1 - 0.1), (0.2, y1 - 0.1), arrowstyle="-|>", mutation_scale=9,
                                 linewidth=1.0, color="#888888", linestyle=(0, (3, 2)), shrinkA=0, shrinkB=0))
    ax.text(1.0, y1, "pipeline: point-to-point (activations forward, gradients back, grey)", ha="left", va="center",
            fontsize=9.5)
    y2 = y1 - step
    ax.plot([0.2, 0.8], [y2, y2], color=DATA_COLOR, linewidth=1.7, linestyle=(0, (4, 2.5)))
    ax.text(1.0, y2, "data group: bucketed all-reduce, or ZeRO reduce-scatter / all-gather", ha="left",
            va="center", fontsize=9.5)


# ----- right panel ------------------------------------------------------------------------------------------------

STEPS = [
    ("1.  Tensor axis (TensorAxis, the tp1d plan)", TENSOR_EDGE,
     "cuts attention/MLP weights, embedding and output by vocabulary over the\n"
     "tensor group; sequence-parallel activations between blocks"),
    ("2.  Pipeline (PipelineStrategy runtime)", P2P_COLOR,
     "splits the tensor-local blocks into stages; runs the 1F1B / GPipe / interleaved /\n"
     "zero-bubble / Chimera schedule; stands aside when pipeline_size = 1"),
    ("3.  Data axis", DATA_COLOR,
     "zero_stage 0: gradient buckets (all-reduce)  |  zero_stage 1-3: ZeRO engine shards\n"
     "the tensor-local module over the data group (with a pipeline: ZeRO-1 only)"),
    ("4.  After backward", None,
     "flush deferred weight gradients -> data reduce -> sum replicated\n"
     "(sequence-parallel) gradients over the tensor group"),
    ("5.  Clipping and checkpoints", None,
     "global norm: tensor shards summed over the tensor group, stages over the\n"
     "pipeline group, ZeRO pieces over the data group; checkpoints: every axis\n"
     "makes its part whole (one plain Lightning file)"),
]


def axis_flow(ax) -> None:
    ax.set_xlim(0, 10)
    ax.set_ylim(-0.05, 10.1)
    ax.axis("off")
    ax.set_title("what each axis does, in order", loc="left", fontsize=11, fontweight="bold")

    x, w = 0.05, 9.9
    title_h, line_h, pad, gap = 0.42, 0.36, 0.14, 0.55
    y = 9.95
    previous = None
    for title, stripe, body in STEPS:
        lines = body.count("\n") + 1
        h = pad + title_h + lines * line_h + pad
        bottom = y - h
        _round_box(ax, x, bottom, w, h, BUILT_FACE, BUILT_EDGE, lw=2.0)
        if stripe is not None:  # the axis' colour in the left panel
            ax.add_patch(FancyBboxPatch((x + 0.06, bottom + 0.08), 0.09, h - 0.16,
                                        boxstyle="round,pad=0,rounding_size=0.04", facecolor=stripe,
                                        edgecolor="none"))
        ax.text(x + 0.3, y - pad, title, ha="left", va="top", fontsize=10.5, fontweight="bold")
        ax.text(x + 0.3, y - pad - title_h, body, ha="left", va="top", fontsize=9, linespacing=1.3)
        if previous is not None:
            ax.add_patch(FancyArrowPatch((x + w / 2, previous), (x + w / 2, y), arrowstyle="-|>", mutation_scale=14,
                                         linewidth=1.6, color="#1f1f1f", shrinkA=2, shrinkB=2))
        previous = bottom
        y = bottom - gap


def main() -> None:
    fig = plt.figure(figsize=(12, 5.5), facecolor="white")
    left = fig.add_axes((0.01, 0.02, 0.47, 0.865))
    right = fig.add_axes((0.505, 0.02, 0.485, 0.865))
    rank_grid(left)
    axis_flow(right)
    fig.suptitle('strategy="hybrid" (HybridParallelStrategy): rank = d*4 + p*2 + t, tensor innermost', fontsize=12,
                 x=0.01, ha="left", y=0.985)
    out = HERE / "hybrid.png"
    fig.savefig(out, dpi=150, facecolor="white")
    plt.close(fig)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
