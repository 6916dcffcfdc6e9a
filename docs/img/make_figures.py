"""Draw the figures of docs/ (docs/img/layers.png, docs/img/zero_stages.png).

matplotlib is not a dependency of lightning_par; run this in a throwaway environment:

    python3 -m venv /tmp/plotenv && /tmp/plotenv/bin/pip install matplotlib
    /tmp/plotenv/bin/python docs/img/make_figures.py
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch  # noqa: E402

HERE = Path(__file__).resolve().parent

BUILT_FACE, BUILT_EDGE = "#cfe3f7", "#1f5f9e"
PLANNED_FACE, PLANNED_EDGE = "#f4f4f4", "#8a8a8a"


def _box(ax, x, y, w, h, title, body, built):
    face, edge = (BUILT_FACE, BUILT_EDGE) if built else (PLANNED_FACE, PLANNED_EDGE)
    ax.add_patch(
        FancyBboxPatch(
            (x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08", facecolor=face, edgecolor=edge,
            linewidth=2.0 if built else 1.5, linestyle="-" if built else (0, (5, 3)),
        )
    )
    color = "black" if built else "#555555"
    label = title if built else f"{title}  (planned)"
    ax.text(x + w / 2, y + h * 0.66, label, ha="center", va="center", fontsize=12, fontweight="bold",
            family="monospace", color=color)
    ax.text(x + w / 2, y + h * 0.28, body, ha="center", va="center", fontsize=9, color=color)
    return {"left": (x, y + h / 2), "right": (x + w, y + h / 2), "top": (x + w / 2, y + h),
            "bottom": (x + w / 2, y), "x": x, "y": y, "w": w, "h": h}


def _arrow(ax, start, end, built=True, rad=0.0, label=None, label_xy=None):
    ax.add_patch(
        FancyArrowPatch(
            start, end, arrowstyle="-|>", mutation_scale=16, linewidth=1.6,
            color="#1f1f1f" if built else PLANNED_EDGE, linestyle="-" if built else (0, (4, 3)),
            connectionstyle=f"arc3,rad={rad}", shrinkA=2, shrinkB=2,
        )
    )
    if label:
        ax.text(*label_xy, label, fontsize=8.5, ha="left", va="center", style="italic", color="#1f1f1f")


def _lane(ax, start, lane_x, end, label):
    """Left-side route: out of ``start`` to ``lane_x``, down, then into ``end``."""
    ax.plot([start[0], lane_x, lane_x], [start[1], start[1], end[1]], color="#1f1f1f", linewidth=1.6,
            solid_joinstyle="round")
    _arrow(ax, (lane_x, end[1]), end)
    ax.text(lane_x - 0.12, (start[1] + end[1]) / 2, label, rotation=90, ha="right", va="center", fontsize=8.5,
            style="italic")


def layers(path: Path) -> None:
    fig, ax = plt.subplots(figsize=(11, 8.2))
    ax.set_xlim(0, 11)
    ax.set_ylim(-0.9, 8.4)
    ax.axis("off")

    h = 1.0
    # Bottom up, as in ARCHITECTURE.md.
    topo = _box(ax, 2.2, 0.2, 8.3, h, "topology.py",
                "degrees -> validated against the world size -> one DeviceMesh; rank groups as pure functions", True)
    comm = _box(ax, 2.2, 1.8, 8.3, h, "comm/",
                "mirrored autograd collectives, gradient buckets, pipeline p2p (every call takes its group)", True)
    tensor = _box(ax, 2.2, 3.4, 2.6, h, "tensor/", "1D layers + plans (2D-3D planned)", True)
    pipe = _box(ax, 5.05, 3.4, 2.6, h, "pipeline/", "schedules as data, one executor", True)
    zero = _box(ax, 7.9, 3.4, 2.6, h, "zero/", "chunks, GPU / host / NVMe", True)
    strat = _box(ax, 2.2, 5.0, 5.45, h, "strategies/", "base + dp, zero1-3, offload / nvme, tp1d, pipeline, hybrid", True)
    ckpt = _box(ax, 7.9, 5.0, 2.6, h, "checkpoint.py", "sharded save / load, resharding", True)
    cli = _box(ax, 2.2, 6.6, 5.45, h, "cli.py / demo/", "lightning-par (LightningCLI), demo GPT + corpus", True)
    cbs = _box(ax, 7.9, 6.6, 2.6, h, "callbacks.py", "throughput / MFU / memory", True)

    ax.text(10.62, 3.9, "engines", fontsize=11, rotation=90, va="center", color="#555555")
    ax.text(10.62, 1.5, "core", fontsize=11, rotation=90, va="center", color="#555555")

    # cli/demo uses the strategies (by name, through Lightning's registry).
    _arrow(ax, cli["bottom"], strat["top"])
    # Strategies compose the engines ...
    sx, sy = strat["x"], strat["y"]
    _arrow(ax, (sx + 0.9, sy), tensor["top"])
    _arrow(ax, (sx + 2.7, sy), pipe["top"])
    _arrow(ax, (sx + 4.9, sy), zero["top"])
    _arrow(ax, strat["right"], ckpt["left"])
    # ... which call comm with the groups they were handed.
    for engine in (tensor, pipe, zero):
        _arrow(ax, engine["bottom"], (engine["x"] + engine["w"] / 2, comm["y"] + comm["h"]))
    # dp has no engine of its own: it goes straight to comm (GradientBucketer); every strategy asks topology for the
    # mesh and its groups.
    _lane(ax, (sx, sy + 0.3), 1.75, (comm["x"], comm["y"] + 0.5),
          "dp: GradientBucketer(params, data group)")
    _lane(ax, (sx, sy + 0.7), 1.05, (topo["x"], topo["y"] + 0.5), "mesh + groups (Topology)")

    ax.text(5.5, -0.35,
            "A -> B: A imports / calls B.  Nothing points up: topology and comm import no engine or strategy;\n"
            "process groups travel down explicitly (topology -> strategy -> engines -> comm), never through globals.",
            ha="center", va="center", fontsize=9.5)
    ax.legend(
        handles=[
            Patch(facecolor=BUILT_FACE, edgecolor=BUILT_EDGE, linewidth=2, label="built"),
            Patch(facecolor=PLANNED_FACE, edgecolor=PLANNED_EDGE, linewidth=1.5, linestyle="--", label="planned"),
            Line2D([], [], color="#1f1f1f", linewidth=1.6, label="uses (built)"),
            Line2D([], [], color=PLANNED_EDGE, linewidth=1.6, linestyle="--", label="uses (planned)"),
        ],
        loc="upper left", bbox_to_anchor=(0.0, 1.0), fontsize=9, frameon=False, ncol=4,
    )
    ax.set_title("lightning_par layers, bottom up", fontsize=14, pad=4)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ----- ZeRO: bytes per parameter per rank, by stage ---------------------------------------------------------------

ZERO_RANKS = 4
# (label, colour) of each kind of state a rank holds.
ZERO_KINDS = {
    "params": ("parameters (compute copy: bf16 / fp16)", "#4c8bd6"),
    "grads": ("gradients", "#f0a03c"),
    "masters": ("fp32 master weights", "#5aae61"),
    "optim": ("optimizer state (Adam m, v: fp32)", "#9b72c4"),
}


def _zero_rows(n: int) -> tuple[list, list]:
    """Bars as lists of (kind, full bytes per parameter, sharded?) segments; a sharded segment holds full / n."""
    paper = [
        ("no sharding\n(mixed-precision Adam)", [("params", 2, False), ("grads", 2, False), ("masters", 4, False),
                                                ("optim", 8, False)]),
        ("stage 1", [("params", 2, False), ("grads", 2, False), ("masters", 4, True), ("optim", 8, True)]),
        ("stage 2", [("params", 2, False), ("grads", 2, True), ("masters", 4, True), ("optim", 8, True)]),
        ("stage 3", [("params", 2, True), ("grads", 2, True), ("masters", 4, True), ("optim", 8, True)]),
    ]
    # lightning_par at bf16-mixed, at rest after a step (ZeroStrategy.memory_report(), demo GPT, 4 CPU ranks).
    ours = [
        ("dp\n(fp32 weights, autocast)", [("params", 4, False), ("grads", 4, False), ("optim", 8, False)]),
        ("zero1", [("params", 2, False), ("grads", 2, False), ("grads", 4, True), ("masters", 4, True),
                   ("optim", 8, True)]),
        ("zero2", [("params", 2, False), ("grads", 4, True), ("masters", 4, True), ("optim", 8, True)]),
        ("zero3", [("grads", 4, True), ("masters", 4, True), ("optim", 8, True)]),
    ]
    return paper, ours


def _zero_panel(ax, rows, n: int, title: str, notes: dict) -> None:
    height = 0.62
    for y, (label, segments) in enumerate(rows):
        x = 0.0
        for kind, full, sharded in segments:
            width = full / n if sharded else full
            ax.barh(y, width, left=x, height=height, color=ZERO_KINDS[kind][1], edgecolor="white" if not sharded
                    else "#333333", linewidth=1.0, hatch="///" if sharded else None)
            text = f"{full}/{n}" if sharded else f"{full}"
            if width >= 0.75:
                ax.text(x + width / 2, y, text, ha="center", va="center", fontsize=9.5, fontweight="bold",
                        color="black", bbox=dict(boxstyle="round,pad=0.12", facecolor="white", edgecolor="none",
                                                 alpha=0.8))
            x += width
        total = f"{x:g} B"
        ax.text(x + 0.2, y, total, ha="left", va="center", fontsize=11, fontweight="bold")
        if label in notes:
            ax.text(x + 1.35, y, notes[label], ha="left", va="center", fontsize=8.5, color="#444444")
    ax.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=10)
    ax.invert_yaxis()
    ax.set_xlim(0, 22)
    ax.set_xticks(range(0, 17, 2))
    ax.grid(axis="x", color="#dddddd", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.set_title(title, fontsize=11.5, loc="left")


def zero_stages(path: Path) -> None:
    n = ZERO_RANKS
    paper, ours = _zero_rows(n)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11.5, 8.4), sharex=True)
    _zero_panel(top, paper, n, "ZeRO paper's accounting: 2 + 2 + 4 + 8 = 16 bytes per parameter (fp16 parameters and "
                "gradients,\nfp32 masters, Adam's two moments)", {})
    _zero_panel(bottom, ours, n, "lightning_par at bf16-mixed with AdamW, at rest after a step (measured with "
                "ZeroStrategy.memory_report())", {
                    "zero1": "full bf16 gradient buffer (local accumulation)\n+ fp32 gradient shard",
                    "zero2": "gradient shards in fp32 (4/N, not 2/N)",
                    "zero3": "no compute copy at rest: a chunk is gathered (cast\nfrom the master shards) while its modules run",
                    "dp\n(fp32 weights, autocast)": "by construction, not measured:\nthe fp32 weights are the masters",
                })
    bottom.set_xlabel(f"bytes per parameter per rank, N = {n} ranks", fontsize=11)
    handles = [Patch(facecolor=colour, label=label) for label, colour in ZERO_KINDS.values()]
    handles += [Patch(facecolor="white", edgecolor="#333333", label="full copy on every rank (solid)"),
                Patch(facecolor="white", edgecolor="#333333", hatch="///", label="sharded: 1/N on each rank (hatched)")]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=9.5, frameon=False, bbox_to_anchor=(0.5, 0.0))
    fig.suptitle(f"What one rank holds under ZeRO stages 1-3 (N = {n} ranks): bytes per parameter per rank",
                 fontsize=13.5, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0.08, 1, 0.97))
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    for name, draw in (("layers.png", layers), ("zero_stages.png", zero_stages)):
        draw(HERE / name)
        print(f"wrote {HERE / name}")
