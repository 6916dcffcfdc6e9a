"""Pipeline schedules checked in one process: every dependency met, no deadlock, the bubble of the formula."""

from __future__ import annotations

from dataclasses import replace

import pytest

from lightning_par.pipeline import (
    SCHEDULES,
    Action,
    Costs,
    Kind,
    ScheduleError,
    build_schedule,
    chimera,
    expected_makespan,
    format_timeline,
    forward_only,
    gpipe,
    interleaved_1f1b,
    one_f_one_b,
    simulate,
    zero_bubble,
)

# Chimera is built in the paper's slot model, where a forward and a backward take the same time.
SLOTS = Costs(forward=1, backward=1, backward_input=1, backward_weight=1)


def _cases():
    for p in (1, 2, 3, 4, 6, 8):
        for m in range(1, 3 * p + 2):
            yield "gpipe", p, m, 1
            yield "1f1b", p, m, 1
            if p <= 4 and m <= 2 * p:
                for v in (1, 2, 3):
                    if m % p == 0:
                        yield "interleaved", p, m, v
            if m >= p:
                yield "zero_bubble", p, m, 1
            if p % 2 == 0 and m % p == 0:
                yield "chimera", p, m, 1


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_every_schedule_runs_and_its_bubble_is_the_formula(name):
    checked = 0
    for case_name, p, m, v in _cases():
        if case_name != name:
            continue
        schedule = build_schedule(name, p, m, chunks=v)
        costs = SLOTS if name == "chimera" else Costs()
        timeline = simulate(schedule, costs)  # raises on a missing dependency, bad transfer or deadlock
        expected = expected_makespan(schedule, costs)
        assert timeline.makespan == expected, (name, p, m, v, timeline.makespan, expected)
        busy = timeline.busy(0)
        for rank in range(p):
            # Every rank does the same work, so every rank's bubble is the formula's.
            assert timeline.busy(rank) == busy
            assert timeline.bubble(rank) == expected - busy
        simulate(forward_only(schedule), costs)  # the eval path of the same placement
        checked += 1
    assert checked > 10


def test_bubble_formulas_in_words():
    costs = Costs()  # f=1, b=2 (i=w=1)
    t = simulate(one_f_one_b(4, 8), costs)
    assert t.bubble(0) == 3 * 3 and t.bubble_fraction() == pytest.approx(3 / 11)  # (p-1)/(m+p-1)
    assert simulate(gpipe(4, 8), costs).bubble(0) == 3 * 3
    assert simulate(interleaved_1f1b(4, 8, 2), costs).bubble(0) == 3 * 3  # per chunk: (p-1)(f+b), work doubles
    assert simulate(zero_bubble(4, 8), costs).bubble(0) == 3 * 1  # (p-1)(f+i-w)
    assert simulate(chimera(4, 8), SLOTS).bubble(0) == 4 - 2  # (p-2) slots


def test_memory_each_schedule_is_known_for():
    p, m = 4, 8
    assert simulate(gpipe(p, m)).peak_activations == [m] * p  # GPipe stashes every microbatch
    assert simulate(one_f_one_b(p, m)).peak_activations == [p - r for r in range(p)]  # 1F1B: p - r
    assert max(simulate(zero_bubble(p, m)).peak_activations) <= p  # ZB-H1: no more than 1F1B's peak
    assert simulate(one_f_one_b(p, 2)).peak_activations == [2, 2, 2, 1]  # never more than m


def test_actions_print_and_parse_like_torch():
    assert str(Action(2, Kind.F, 0)) == "2F0"
    assert str(Action(1, Kind.SEND_B, 3)) == "1SEND_B3"
    for text in ("2F0", "1SEND_B3", "0RECV_F12", "3I1", "3W1", "0B0"):
        assert str(Action.parse(text)) == text
    with pytest.raises(ValueError, match="Not an action"):
        Action.parse("F0")


def test_text_timeline_of_1f1b():
    assert format_timeline(simulate(one_f_one_b(2, 3))) == (
        "1f1b: 2 ranks, 3 microbatches, step 12, bubble 3 (25%), peak activations 2\n"
        "rank 0: F0 F1 .. .. B0 -- F2 B1 -- .. B2 --\n"
        "rank 1: .. F0 B0 -- F1 B1 -- F2 B2 -- .. .."
    )


def test_chimera_uses_two_directions_and_replicas():
    s = chimera(4, 4)
    assert s.parts_of(0) == (0, 3) and s.parts_of(1) == (1, 2)  # part r down, part p-1-r up
    assert s.path(0) == (0, 1, 2, 3) and s.path(3) == (4, 5, 6, 7)
    assert [s.placement[st] for st in s.path(3)] == [3, 2, 1, 0]


def _broken(schedule, rank, actions):
    return replace(schedule, actions=tuple(tuple(map(Action.parse, actions.split())) if r == rank else a
                                           for r, a in enumerate(schedule.actions)))


def test_checker_finds_a_backward_before_its_forward():
    s = one_f_one_b(1, 2)
    with pytest.raises(ScheduleError, match="needs 0F1"):
        simulate(_broken(s, 0, "0F0 0B0 0B1 0F1"))


def test_checker_finds_missing_and_repeated_work():
    s = gpipe(1, 2)
    with pytest.raises(ScheduleError, match="missing"):
        simulate(_broken(s, 0, "0F0 0F1 0B0"))
    with pytest.raises(ScheduleError, match="runs twice"):
        simulate(_broken(s, 0, "0F0 0F0 0F1 0B0 0B1"))


def test_checker_finds_a_missing_receive_and_a_mismatched_order():
    s = gpipe(2, 2)
    with pytest.raises(ScheduleError, match="no 1RECV_F0 was posted"):
        simulate(_broken(s, 1, "1F0 1F1 1B0 1SEND_B0 1B1 1SEND_B1"))
    with pytest.raises(ScheduleError, match="mismatched order"):
        simulate(_broken(s, 1, "1RECV_F1 1RECV_F0 1F0 1F1 1B0 1SEND_B0 1B1 1SEND_B1"))


def test_checker_finds_a_deadlock():
    # Rank 0 waits for gradients before sending the activations that rank 1 needs to produce them.
    s = gpipe(2, 1)
    with pytest.raises(ScheduleError, match="deadlock"):
        simulate(_broken(s, 0, "0F0 0RECV_B0 0B0 0SEND_F0"))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: interleaved_1f1b(4, 6, 2), "multiple of 4; got 6"),
        (lambda: zero_bubble(4, 3), ">= the pipeline size 4; got 3"),
        (lambda: chimera(3, 6), "must be even; got 3"),
        (lambda: chimera(4, 6), "multiple of 4; got 6"),
        (lambda: one_f_one_b(2, 0), "microbatches must be a positive integer"),
        (lambda: build_schedule("pipedream", 2, 2), "Unknown schedule 'pipedream'"),
    ],
)
def test_schedules_that_cannot_run_say_why(build, message):
    with pytest.raises(ScheduleError, match=message):
        build()


def test_the_docs_show_what_the_schedule_functions_print():
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "pipeline.md").read_text()
    blocks = {m.group(1): m.group(0).strip() for m in re.finditer(r"^(\w+): 4 ranks, 4 microbatches.*?(?=\n```)", page,
                                                                 re.S | re.M)}
    assert set(blocks) == set(SCHEDULES)
    for name, text in blocks.items():
        costs = SLOTS if name == "chimera" else Costs()
        assert text == format_timeline(simulate(build_schedule(name, 4, 4, chunks=2), costs)), name
