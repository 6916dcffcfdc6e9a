"""Draw the pipeline timelines of docs/pipeline.md from the schedule functions (docs/img/pipeline_<schedule>.png).

matplotlib is not a dependency of lightning_par; run this in a throwaway environment (torch is not needed: the
schedule modules use only the standard library):

    python3 -m venv /tmp/plotenv && /tmp/plotenv/bin/pip install matplotlib
    /tmp/plotenv/bin/python docs/img/pipeline_figures.py          # PNGs
    /tmp/plotenv/bin/python docs/img/pipeline_figures.py --text   # the text timelines of the page
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
# Import lightning_par.pipeline.schedules / .simulate without running the package __init__ (which imports torch).
for name, path in (("lightning_par", ROOT / "lightning_par"), ("lightning_par.pipeline", ROOT / "lightning_par" / "pipeline")):
    package = types.ModuleType(name)
    package.__path__ = [str(path)]
    sys.modules.setdefault(name, package)

from lightning_par.pipeline.schedules import build_schedule  # noqa: E402
from lightning_par.pipeline.simulate import Costs, draw_timeline, format_timeline, simulate  # noqa: E402

SLOTS = Costs(forward=1, backward=1, backward_input=1, backward_weight=1)  # Chimera's paper model: F = B


def cases(microbatches: int):
    """(file stem, schedule, costs, title) for every schedule on 4 ranks."""
    p = 4
    yield "gpipe", build_schedule("gpipe", p, microbatches), Costs(), "GPipe"
    yield "1f1b", build_schedule("1f1b", p, microbatches), Costs(), "1F1B (PipeDream-flush)"
    yield "interleaved", build_schedule("interleaved", p, microbatches, 2), Costs(), "interleaved 1F1B, 2 chunks per rank"
    yield "zero_bubble", build_schedule("zero_bubble", p, microbatches), Costs(), "zero bubble (ZB-H1): I and W split"
    yield "chimera", build_schedule("chimera", p, microbatches), SLOTS, "Chimera, forward = backward (hatched: up pipeline)"


def main() -> None:
    if "--text" in sys.argv:
        for stem, schedule, costs, title in cases(4):
            print(f"### {stem}\n\n```\n{format_timeline(simulate(schedule, costs))}\n```\n")
        return
    for stem, schedule, costs, title in cases(8):
        timeline = simulate(schedule, costs)
        path = HERE / f"pipeline_{stem}.png"
        bubble = max(timeline.bubble(r) for r in range(schedule.ranks))
        draw_timeline(timeline, str(path), title=f"{title}: p=4, m=8, step {timeline.makespan:g}, bubble {bubble:g} "
                                                 f"({timeline.bubble_fraction():.0%})")
        print(path)


if __name__ == "__main__":
    main()
