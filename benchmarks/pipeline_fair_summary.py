"""Ours against torch.distributed.pipelining from runs made one variant per process (``gpu_suite.sh pipeline_fair``).

    python benchmarks/pipeline_fair_summary.py OUT_DIR/fair_*.json

Why one variant per process: in one process the variants run later are slower (2 x H100, 2026-11-26: our 1F1B took
230 ms a step as the first of our variants and 247 ms as the fifth, with torch's run before both), and
``pipeline_peer.py`` runs torch's schedules first, which biased every earlier ratio against ours. Prints, per
schedule, every run's step time, the median of each side, ours / torch (tokens/s, from the medians) and ours / the
bubble formula (from torch's measured T per rank).
"""

from __future__ import annotations

import json
import statistics
import sys

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from pipeline_peer import formula  # noqa: E402

OURS = {"pipeline": "1f1b", "pipeline_interleaved": "interleaved", "pipeline_zero_bubble": "zero_bubble"}


def main(paths: list[str]) -> None:
    steps: dict[tuple[str, str], list[float]] = {}
    t_ranks: dict[str, list[float]] = {}
    m = None
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        m = data["config"]["microbatches"]
        for row in data["rows"]:
            if row.get("status") != "ok":
                continue
            name = row["variant"]
            kind, side = (name[len("torch_"):], "torch") if name.startswith("torch_") else (OURS.get(name), "ours")
            if kind is None:
                continue
            steps.setdefault((kind, side), []).append(row["step_s"])
            if side == "torch" and "t_ranks" in row:
                t_ranks.setdefault(kind, row["t_ranks"])
    print("pipeline, one variant per process: step ms (each run) | median | ours / torch | ours / formula")
    for kind in ("1f1b", "interleaved", "zero_bubble"):
        ours, theirs = steps.get((kind, "ours"), []), steps.get((kind, "torch"), [])
        if not ours or not theirs:
            continue
        mo, mt = statistics.median(ours), statistics.median(theirs)
        line = (f"  {kind:12s} ours {', '.join(f'{s * 1e3:.0f}' for s in ours)} | {mo * 1e3:.0f}   torch "
                f"{', '.join(f'{s * 1e3:.0f}' for s in theirs)} | {mt * 1e3:.0f}   ours/torch {mt / mo:.2f}x")
        if kind in t_ranks:
            ideal, name = formula(kind, m, 2 if kind == "interleaved" else 1, t_ranks[kind])
            line += f"   ours/formula {mo / ideal:.2f} ({name} = {ideal * 1e3:.0f} ms)"
        print(line)


if __name__ == "__main__":
    main(sys.argv[1:])
