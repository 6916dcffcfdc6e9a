"""Pipeline parallelism: schedules as data, their checker, partitioning into stages and one executor."""

from lightning_par.pipeline.schedules import (
    SCHEDULES,
    Action,
    Kind,
    Schedule,
    ScheduleError,
    build_schedule,
    chimera,
    forward_only,
    gpipe,
    interleaved_1f1b,
    one_f_one_b,
    zero_bubble,
)
from lightning_par.pipeline.simulate import Costs, Timeline, draw_timeline, expected_makespan, format_timeline, simulate

__all__ = [
    "Action",
    "Kind",
    "Schedule",
    "ScheduleError",
    "SCHEDULES",
    "build_schedule",
    "gpipe",
    "one_f_one_b",
    "interleaved_1f1b",
    "zero_bubble",
    "chimera",
    "forward_only",
    "Costs",
    "Timeline",
    "simulate",
    "expected_makespan",
    "format_timeline",
    "draw_timeline",
]
