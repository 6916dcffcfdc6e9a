"""Draw docs/img/tp1d_block.png: how tp1d splits one transformer block over 2 tensor ranks, without and with
sequence parallelism.

matplotlib is not a dependency of lightning_par; run this in a throwaway environment:

    python3 -m venv /tmp/plotenv && /tmp/plotenv/bin/pip install matplotlib
    /tmp/plotenv/bin/python docs/img/make_tp1d_figure.py
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch  # noqa: E402

HERE = Path(__file__).resolve().parent
COLORS = {  # face, edge
    "replicated": ("#eeeeee", "#777777"),
    "sharded": ("#cfe3f7", "#1f5f9e"),
    "sequence": ("#d8f0d2", "#3a7d2c"),
    "collective": ("#fde2c4", "#c06000"),
}
W, H, GAP = 1.32, 0.95, 0.22  # box width, height, gap between columns
LANES = {0: 1.35, 1: 0.0}  # y of rank 0 and rank 1


def _box(ax, x, y, w, h, text, kind, fontsize=8.2):
    face, edge = COLORS[kind]
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.06", facecolor=face,
                                edgecolor=edge, linewidth=1.4))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize)


def _panel(ax, title, stages):
    x = 0.0
    ends = []
    for stage in stages:
        kind = stage[0]
        if kind == "collective":
            _, text = stage
            _box(ax, x + 0.1, LANES[1], W - 0.2, LANES[0] + H - LANES[1], text, "collective", fontsize=8)
        else:
            _, top, bottom = stage
            _box(ax, x, LANES[0], W, H, top, kind)
            _box(ax, x, LANES[1], W, H, bottom, kind)
        ends.append(x)
        x += W + GAP
    for a, b in zip(ends, ends[1:]):
        for lane in LANES.values():
            ax.add_patch(FancyArrowPatch((a + W, lane + H / 2), (b, lane + H / 2), arrowstyle="-|>",
                                         mutation_scale=10, linewidth=1.0, color="#333333", shrinkA=1, shrinkB=1))
    ax.text(-0.15, LANES[0] + H / 2, "rank 0", ha="right", va="center", fontsize=9, fontweight="bold")
    ax.text(-0.15, LANES[1] + H / 2, "rank 1", ha="right", va="center", fontsize=9, fontweight="bold")
    ax.set_title(title, loc="left", fontsize=11, fontweight="bold")
    ax.set_xlim(-0.9, x)
    ax.set_ylim(-0.15, LANES[0] + H + 0.1)
    ax.axis("off")


SHARDED = [
    ("sharded", "c_attn (column)\nq, k, v of\nheads 0-1", "c_attn (column)\nq, k, v of\nheads 2-3"),
    ("sharded", "attention\nheads 0-1\n(n_head = 2)", "attention\nheads 2-3\n(n_head = 2)"),
    ("sharded", "c_proj (row)\ninputs 0 : E/2", "c_proj (row)\ninputs E/2 : E"),
]
MLP = [
    ("sharded", "c_fc (column)\nout 0 : 2E\n+ GELU", "c_fc (column)\nout 2E : 4E\n+ GELU"),
    ("sharded", "c_proj (row)\ninputs 0 : 2E", "c_proj (row)\ninputs 2E : 4E"),
]


def main() -> None:
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(17, 7.2))
    _panel(top, "Tensor parallel (sequence_parallel=False): activations between the pairs are whole on every rank", [
        ("replicated", "ln_1\nwhole sequence\n(same on both)", "ln_1\nwhole sequence\n(same on both)"),
        ("collective", "copy\nfwd: identity\nbwd: all-reduce"),
        *SHARDED,
        ("collective", "all-reduce\n(sum partial\nproducts)\nbwd: identity"),
        ("replicated", "+ bias, dropout,\nresidual, ln_2", "+ bias, dropout,\nresidual, ln_2"),
        ("collective", "copy\nfwd: identity\nbwd: all-reduce"),
        *MLP,
        ("collective", "all-reduce\nbwd: identity"),
        ("replicated", "+ bias, dropout,\nresidual", "+ bias, dropout,\nresidual"),
    ])
    _panel(bottom, "Sequence parallel (sequence_parallel=True): between the pairs each rank holds half the tokens", [
        ("sequence", "ln_1\ntokens 0 : T/2", "ln_1\ntokens T/2 : T"),
        ("collective", "all-gather\n(sequence)\nbwd: reduce-\nscatter"),
        *SHARDED,
        ("collective", "reduce-scatter\n(sequence)\nbwd: all-gather"),
        ("sequence", "+ bias, dropout,\nresidual, ln_2\ntokens 0 : T/2", "+ bias, dropout,\nresidual, ln_2\ntokens T/2 : T"),
        ("collective", "all-gather\n(sequence)\nbwd: reduce-\nscatter"),
        *MLP,
        ("collective", "reduce-scatter\n(sequence)\nbwd: all-gather"),
        ("sequence", "+ bias, dropout,\nresidual\ntokens 0 : T/2", "+ bias, dropout,\nresidual\ntokens T/2 : T"),
    ])
    handles = [Patch(facecolor=COLORS[k][0], edgecolor=COLORS[k][1], label=label) for k, label in (
        ("replicated", "replicated: the same computation on every rank"),
        ("sharded", "split by heads / columns / rows (the weights are split)"),
        ("sequence", "split by tokens (sequence parallel; norms' gradients summed over ranks)"),
        ("collective", "collective over the tensor group (each moves b*s*h elements)"),
    )]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=9, frameon=False)
    fig.suptitle("One GPT block (demo model: fused c_attn, 4 heads, MLP 4E) on tensor size 2", fontsize=12,
                 fontweight="bold")
    fig.tight_layout(rect=(0, 0.07, 1, 0.96))
    out = HERE / "tp1d_block.png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
