"""Check a schedule in one process: run its actions in a simulated clock, with the executor's communication rules.

:func:`simulate` walks every rank's action list, starting a compute when its inputs exist, and raises
:class:`~lightning_par.pipeline.schedules.ScheduleError` (with the timeline so far) when a compute runs before
something it needs, two transfers are matched wrongly, work is missing or repeated, or no rank can move (deadlock,
under NCCL's rule that a rank's batches of transfers run one after another: [Note: NCCL's in-order rule]).
Its :class:`Timeline` gives start and end of every compute, each rank's idle time (the bubble) and the most
microbatches whose activations a rank holds at once. :func:`expected_makespan` is the closed form each schedule is
known for; tests check that both agree. :func:`format_timeline` and :func:`draw_timeline` draw the result.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

from lightning_par.pipeline.schedules import Action, Kind, Schedule, ScheduleError, slots

__all__ = ["Costs", "Timeline", "simulate", "expected_makespan", "format_timeline", "draw_timeline"]


@dataclass(frozen=True)
class Costs:
    """Time of one compute of one virtual stage on one microbatch. Transfers are taken as instant."""

    forward: float = 1.0
    backward: float = 2.0  # full backward, B
    backward_input: float = 1.0  # I
    backward_weight: float = 1.0  # W

    def of(self, kind: Kind) -> float:
        return {Kind.F: self.forward, Kind.B: self.backward, Kind.I: self.backward_input,
                Kind.W: self.backward_weight}[kind]


@dataclass
class Timeline:
    schedule: Schedule
    costs: Costs
    spans: list[list[tuple[Action, float, float]]] = field(default_factory=list)  # per rank: (compute, start, end)
    peak_activations: list[int] = field(default_factory=list)  # per rank: most microbatch-stages held at once

    @property
    def makespan(self) -> float:
        return max((end for spans in self.spans for _, _, end in spans), default=0.0)

    def busy(self, rank: int) -> float:
        return sum(end - start for _, start, end in self.spans[rank])

    def bubble(self, rank: int) -> float:
        """Idle time of ``rank`` between the start of the step and the end of the last rank."""
        return self.makespan - self.busy(rank)

    def bubble_fraction(self) -> float:
        return max(self.bubble(r) for r in range(self.schedule.ranks)) / self.makespan


def _required_computes(schedule: Schedule) -> set[Action]:
    split = schedule.split_backward
    trains = any(a.kind in (Kind.B, Kind.I, Kind.W) for rank in schedule.actions for a in rank)
    needed = set()
    for m in range(schedule.microbatches):
        for s in schedule.path(m):
            needed.add(Action(s, Kind.F, m))
            if trains:
                needed |= {Action(s, Kind.I, m), Action(s, Kind.W, m)} if split else {Action(s, Kind.B, m)}
    return needed


# [Note: NCCL's in-order rule]
# NCCL runs the point-to-point operations a rank issues on one communicator in issue order, on one stream; torch
# gives the batches of ``dist.batch_isend_irecv`` of a group one communicator. So, per rank, communication is a
# sequence of batches (the slots of [Note: communication actions]) and, conservatively, one stream per rank for the
# whole pipeline group whatever the peer: a batch *starts* once the rank's host has posted it and the rank's
# previous batch has completed; it *completes* once every operation in it has met its matching operation (same
# channel, matched in order per ordered pair of ranks) in a batch that has started on the peer. A compute that
# needs a received value waits for the batch of that receive to complete (the whole batch: NCCL gives one Work for
# it); sends do not block the host, and every batch must complete by the end of the step. A RECV alone in a batch
# ahead of the SEND its peer waits for therefore blocks the rank's stream, and two such ranks block each other:
# the executor would hang on NCCL (gloo, whose operations are independent, would not show it). This simulator runs
# that rule, with transfers taking no time, and refuses such a schedule.


@dataclass
class _Batch:
    rank: int
    index: int
    ops: list[tuple[Action, tuple[int, int], int]]  # (action, channel (src, dst), position on the channel)
    issued: float
    start: Optional[float] = None
    end: Optional[float] = None

    def describe(self) -> str:
        return f"rank {self.rank} batch {self.index} [{' '.join(str(a) for a, _, _ in self.ops)}]"


def simulate(schedule: Schedule, costs: Costs = Costs()) -> Timeline:
    """Run ``schedule`` on a simulated clock; raise ScheduleError on any violation (see the module docstring and
    [Note: NCCL's in-order rule])."""
    p = schedule.ranks
    timeline = Timeline(schedule, costs, [[] for _ in range(p)], [0] * p)
    items = [slots(schedule.actions[r]) for r in range(p)]
    clock = [0.0] * p
    pointer = [0] * p  # next item (compute or slot) of each rank's host
    done: dict[Action, float] = {}  # compute -> end time
    batches: list[list[_Batch]] = [[] for _ in range(p)]
    sent: dict[tuple[int, int], list[tuple[Action, _Batch]]] = defaultdict(list)  # channel -> (recv key, batch)
    posted: dict[tuple[int, int], list[tuple[Action, _Batch]]] = defaultdict(list)  # channel -> (RECV, batch)
    recv_batch: dict[tuple[int, Action], _Batch] = {}
    holding = [0] * p

    def fail(rank: int, action: Action, message: str) -> None:
        raise ScheduleError(
            f"{schedule.name} (ranks={p}, microbatches={schedule.microbatches}): rank {rank}, action {action}: "
            f"{message}\n{schedule.format()}"
        )

    def source(recv: Action) -> int:
        s, m = recv.stage, recv.microbatch
        other = schedule.prev_stage(s, m) if recv.kind is Kind.RECV_F else schedule.next_stage(s, m)
        if other is None:
            raise ScheduleError(f"{schedule.name}: {recv} receives from no stage (it starts or ends its path)")
        return schedule.placement[other]

    def input_time(rank: int, action: Action) -> Optional[float]:
        """When everything ``action`` needs is here; None while blocked on a transfer."""
        s, m, kind = action.stage, action.microbatch, action.kind
        needs: list[Action] = []
        remote: Optional[Action] = None
        if kind is Kind.F:
            prev = schedule.prev_stage(s, m)
            if prev is not None:
                if schedule.placement[prev] == rank:
                    needs.append(Action(prev, Kind.F, m))
                else:
                    remote = Action(s, Kind.RECV_F, m)
        elif kind in (Kind.B, Kind.I):
            needs.append(Action(s, Kind.F, m))
            nxt = schedule.next_stage(s, m)
            if nxt is not None:
                if schedule.placement[nxt] == rank:
                    needs.append(Action(nxt, kind, m))
                else:
                    remote = Action(s, Kind.RECV_B, m)
        else:  # W
            needs.append(Action(s, Kind.I, m))
        for need in needs:
            if need not in done:
                fail(rank, action, f"needs {need}, which this rank has not run yet")
        start = max([done[n] for n in needs], default=0.0)
        if remote is not None:
            batch = recv_batch.get((rank, remote))
            if batch is None:
                fail(rank, action, f"needs a transfer from rank {source(remote)} but no {remote} was posted before it")
            if batch.end is None:
                return None
            start = max(start, batch.end)
        return start

    def issue(rank: int, slot: tuple[Action, ...]) -> None:
        """Post a slot as one batch: never blocks the host."""
        batch = _Batch(rank, len(batches[rank]), [], clock[rank])
        for action in slot:
            kind = action.kind
            if kind in (Kind.SEND_F, Kind.SEND_B):
                producers = [Action(action.stage, Kind.F, action.microbatch)] if kind is Kind.SEND_F else [
                    Action(action.stage, Kind.B, action.microbatch), Action(action.stage, Kind.I, action.microbatch)]
                if not any(prod in done for prod in producers):
                    fail(rank, action, f"sends the result of {producers[0]} before computing it")
                target = (schedule.next_stage if kind is Kind.SEND_F else schedule.prev_stage)(
                    action.stage, action.microbatch)
                if target is None:
                    fail(rank, action, "sends to no stage")
                recv_kind = Kind.RECV_F if kind is Kind.SEND_F else Kind.RECV_B
                ch = (rank, schedule.placement[target])
                batch.ops.append((action, ch, len(sent[ch])))
                sent[ch].append((Action(target, recv_kind, action.microbatch), batch))
            else:
                if (rank, action) in recv_batch:
                    fail(rank, action, "posted twice")
                ch = (source(action), rank)
                batch.ops.append((action, ch, len(posted[ch])))
                posted[ch].append((action, batch))
                recv_batch[(rank, action)] = batch
        batches[rank].append(batch)

    def step(rank: int) -> bool:
        """Run the next item of ``rank``'s host if it can; False when it is blocked."""
        item = items[rank][pointer[rank]]
        for action in item:
            if schedule.placement[action.stage] != rank:
                fail(rank, action, f"stage {action.stage} is placed on rank {schedule.placement[action.stage]}")
        action = item[0]
        if not action.kind.is_compute:
            issue(rank, item)
        else:
            if action in done:
                fail(rank, action, "runs twice")
            ready = input_time(rank, action)
            if ready is None:
                return False
            start = max(clock[rank], ready)
            end = start + costs.of(action.kind)
            done[action] = clock[rank] = end
            timeline.spans[rank].append((action, start, end))
            releases = Kind.W if schedule.split_backward else Kind.B
            holding[rank] += 1 if action.kind is Kind.F else -1 if action.kind is releases else 0
            timeline.peak_activations[rank] = max(timeline.peak_activations[rank], holding[rank])
        pointer[rank] += 1
        return True

    def match(batch: _Batch, op: tuple[Action, tuple[int, int], int]) -> Optional[_Batch]:
        """The peer's batch holding the operation that pairs with ``op``, once it is posted."""
        action, ch, index = op
        is_send = action.kind in (Kind.SEND_F, Kind.SEND_B)
        other = (posted if is_send else sent)[ch]
        if index >= len(other):
            return None
        key, peer_batch = other[index]
        mine = sent[ch][index][0] if is_send else action
        peer_key = key if is_send else key
        if mine != peer_key:
            recv, got = (peer_key, mine) if is_send else (action, key)
            fail(ch[1], recv, f"transfer {index} from rank {ch[0]} is {got} on the sender but {recv} here "
                              "(mismatched order)")
        return peer_batch

    first_open = [0] * p  # each rank's first batch that has not completed

    def advance_streams() -> bool:
        moved = False
        for rank in range(p):
            for batch in batches[rank][first_open[rank]:]:
                if batch.start is None:
                    prev = batches[rank][batch.index - 1] if batch.index else None
                    if prev is not None and prev.end is None:
                        break
                    batch.start = max(batch.issued, prev.end if prev is not None else 0.0)
                    moved = True
                if batch.end is None:
                    peers = [match(batch, op) for op in batch.ops]
                    if any(b is None or b.start is None for b in peers):
                        break  # the stream is busy with this batch
                    batch.end = max([batch.start] + [b.start for b in peers])
                    first_open[rank] = batch.index + 1
                    moved = True
        return moved

    def finished() -> bool:
        return all(pointer[r] == len(items[r]) and all(b.end is not None for b in batches[r]) for r in range(p))

    while not finished():
        moved = advance_streams()
        for rank in range(p):
            while pointer[rank] < len(items[rank]) and step(rank):
                moved = True
        if not moved:
            raise ScheduleError(f"{schedule.name}: deadlock under NCCL's in-order rule (a rank's batches run one "
                                f"after another): {_stuck(schedule, items, pointer, batches, match)}\n"
                                f"{schedule.format()}")

    missing = _required_computes(schedule) - set(done)
    extra = set(done) - _required_computes(schedule)
    if missing or extra:
        raise ScheduleError(f"{schedule.name}: computes missing {sorted(map(str, missing))}, "
                            f"not needed {sorted(map(str, extra))}")
    for ch, sends in sent.items():
        if len(sends) != len(posted[ch]):
            raise ScheduleError(f"{schedule.name}: rank {ch[0]} sends {len(sends)} transfers to rank {ch[1]}, "
                                f"which posts {len(posted[ch])} receives")
    for ch, recvs in posted.items():
        if len(recvs) != len(sent[ch]):
            raise ScheduleError(f"{schedule.name}: rank {ch[1]} posts {len(recvs)} receives from rank {ch[0]}, "
                                f"which sends {len(sent[ch])} transfers")
    return timeline


def _stuck(schedule: Schedule, items, pointer, batches, match) -> str:
    """Every rank's host position and the batch its stream is stuck on, with the operations still unmatched."""
    lines = []
    for rank in range(schedule.ranks):
        host = f"host at {items[rank][pointer[rank]][0]}" if pointer[rank] < len(items[rank]) else "host done"
        batch = next((b for b in batches[rank] if b.end is None), None)
        if batch is None:
            lines.append(f"rank {rank}: {host}")
            continue
        waiting = [str(op[0]) for op in batch.ops if (m := match(batch, op)) is None or m.start is None]
        state = "started" if batch.start is not None else "waiting for the batch before it"
        lines.append(f"rank {rank}: {host}, stream stuck on {batch.describe()} ({state}; unmatched: "
                     f"{' '.join(waiting) or '-'})")
    return "; ".join(lines)


def expected_makespan(schedule: Schedule, costs: Costs = Costs()) -> Optional[float]:
    """The closed-form step time of ``schedule`` with instant transfers, or None where none is known.

    ==============  ===================================================  =====================================
    schedule        step time (p ranks, m microbatches)                   bubble per rank
    ==============  ===================================================  =====================================
    gpipe, 1f1b     (m + p - 1)(f + b)                                    (p - 1)(f + b)
    interleaved     v·m(f + b) + (p - 1)(f + b)   (f, b per chunk)        (p - 1)(f + b), i.e. 1/v of 1F1B's
    zero_bubble     m(f + i + w) + (p - 1)(f + i - w)   (f = i = w)       (p - 1)(f + i - w)
    chimera         (2m + p - 2) f   (f = b, the paper's slot model)      (p - 2) f
    ==============  ===================================================  =====================================
    """
    p, m = schedule.ranks, schedule.microbatches
    f, b, i, w = costs.forward, costs.backward, costs.backward_input, costs.backward_weight
    if schedule.name in ("gpipe", "1f1b"):
        return (m + p - 1) * (f + b)
    if schedule.name == "interleaved":
        v = schedule.num_stages // p
        return v * m * (f + b) + (p - 1) * (f + b)
    if schedule.name == "zero_bubble" and f == i == w:
        return m * (f + i + w) + (p - 1) * (f + i - w)
    if schedule.name == "chimera" and f == b:
        return (2 * m + p - 2) * f
    return None


# ----- drawing ---------------------------------------------------------------------------------------------------


def _label(schedule: Schedule, action: Action) -> str:
    # One stage per rank: the microbatch says it all; several: prefix the stage.
    several = schedule.num_stages > schedule.ranks
    return f"{action.stage}{action.kind.value}{action.microbatch}" if several else f"{action.kind.value}{action.microbatch}"


def format_timeline(timeline: Timeline) -> str:
    """Rank x time grid of the computes (``.`` is idle); a compute of cost k fills k cells, label in the first.

    Needs costs that are whole multiples of the smallest one."""
    schedule = timeline.schedule
    spans = [s for rank in timeline.spans for s in rank]
    unit = min((end - start for _, start, end in spans), default=1.0)
    width = max((len(_label(schedule, a)) for a, _, _ in spans), default=2)
    cells = int(round(timeline.makespan / unit))
    lines = []
    for rank, rank_spans in enumerate(timeline.spans):
        row = ["." * width] * cells
        for action, start, end in rank_spans:
            first, last = int(round(start / unit)), int(round(end / unit))
            if not math.isclose(first * unit, start) or not math.isclose(last * unit, end):
                raise ValueError("format_timeline needs costs that are whole multiples of the smallest one")
            row[first] = _label(schedule, action).ljust(width)
            for c in range(first + 1, last):
                row[c] = "-" * width
        lines.append(f"rank {rank}: " + " ".join(row))
    header = (f"{schedule.name}: {schedule.ranks} ranks, {schedule.microbatches} microbatches, step "
              f"{timeline.makespan:g}, bubble {max(timeline.bubble(r) for r in range(schedule.ranks)):g} "
              f"({timeline.bubble_fraction():.0%}), peak activations {max(timeline.peak_activations)}")
    return header + "\n" + "\n".join(lines)


_COLOURS = {Kind.F: "#4c72b0", Kind.B: "#dd8452", Kind.I: "#c44e52", Kind.W: "#55a868"}


def draw_timeline(timeline: Timeline, path: str, title: Optional[str] = None) -> None:
    """Draw the timeline as a PNG (needs matplotlib, which is not a dependency of lightning_par)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    schedule = timeline.schedule
    fig, ax = plt.subplots(figsize=(max(6.0, timeline.makespan * 0.35), 0.9 + 0.45 * schedule.ranks))
    for rank, spans in enumerate(timeline.spans):
        for action, start, end in spans:
            up = len(schedule.pipelines) > 1 and schedule.route[action.microbatch] == 1
            ax.broken_barh([(start, end - start)], (rank - 0.4, 0.8), facecolors=_COLOURS[action.kind],
                           edgecolor="white", hatch="//" if up else None, linewidth=0.8)
            ax.text((start + end) / 2, rank, _label(schedule, action), ha="center", va="center", fontsize=7,
                    color="white")
    from matplotlib.patches import Patch

    names = {Kind.F: "forward", Kind.B: "backward", Kind.I: "backward (input)", Kind.W: "backward (weights)"}
    kinds = [k for k in names if any(a.kind is k for spans in timeline.spans for a, _, _ in spans)]
    ax.legend(handles=[Patch(facecolor=_COLOURS[k], label=names[k]) for k in kinds], loc="upper center",
              bbox_to_anchor=(0.5, -0.32), ncol=len(kinds), fontsize=7, frameon=False)
    ax.set_yticks(range(schedule.ranks), [f"rank {r}" for r in range(schedule.ranks)])
    ax.invert_yaxis()
    ax.set_xlim(0, timeline.makespan)
    ax.set_xlabel("time (forward = 1)")
    ax.set_title(title or f"{schedule.name}: p={schedule.ranks}, m={schedule.microbatches}, "
                 f"bubble {timeline.bubble_fraction():.0%}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
