"""Pipeline schedules as data: one pure function per schedule returns, for every rank, its ordered actions.

An :class:`Action` is "kind of work on microbatch ``m`` of virtual stage ``s``" and prints like torch's
``2F0`` (stage 2, forward, microbatch 0) or ``1SEND_B3``. A :class:`Schedule` holds the actions of all ranks and
the placement they assume (which rank runs which virtual stage, which model part a virtual stage computes, which
stages a microbatch visits). Nothing here touches a process group: :mod:`~lightning_par.pipeline.simulate` checks a
schedule in one process, and :mod:`~lightning_par.pipeline.executor` runs one.

[Note: stages, parts and pipelines]
The model is cut into ``parts`` consecutive pieces. A *virtual stage* is a place where one part runs: in GPipe,
1F1B and zero-bubble rank ``r`` runs stage ``r`` = part ``r``; interleaved 1F1B gives rank ``r`` the stages
``r, r + p, ..., r + (v-1)p`` (``v`` chunks); Chimera runs two pipelines in opposite directions over two copies of
the model: stages ``0..p-1`` are the "down" pipeline (part ``s`` on rank ``s``), stages ``p..2p-1`` the "up"
pipeline (part ``j`` on rank ``p-1-j``), and the first half of the microbatches goes down, the second half up.
A part held by two ranks (Chimera) is a replica whose gradients the executor sums after the step.

[Note: communication actions]
Every value that crosses ranks has a SEND on the producer and a RECV on the consumer. Transfers between two ranks
are matched in the order they are posted. The communication actions between two computes of a rank form a *slot*,
which the executor posts as one batch (``dist.batch_isend_irecv``): NCCL runs a rank's batches one after another
on one stream, a batch finishing when each of its operations has met its peer, so a RECV that sits in a batch of
its own ahead of the SEND its peer waits for can block both ranks for ever (see [Note: NCCL's in-order rule] in
:mod:`~lightning_par.pipeline.simulate`). So the batches of all ranks must follow one order: the slot after a
compute holds its SENDs, and each RECV goes into the receiver's first slot, on the clock of the schedule run with
instant transfers, whose window (from the end of the compute before it to the start of the compute after it)
reaches the time its SEND is posted: a rendezvous at the same logical time where the receiver is idle, else right
after the compute it is busy with, and never after the compute that needs it. Where two ranks exchange values in
both directions, both transfers then sit in batches that meet instead of crossing. A RECV is waited right before
its compute. On a GPU the host runs ahead of the device, so a batch is posted while the compute before it still
runs, and the transfer overlaps it.
The simulator models this rule, so "no deadlock in the simulator" means no deadlock in the executor, on NCCL too.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Optional

__all__ = [
    "Kind",
    "Action",
    "Schedule",
    "ScheduleError",
    "gpipe",
    "one_f_one_b",
    "interleaved_1f1b",
    "zero_bubble",
    "chimera",
    "forward_only",
    "SCHEDULES",
    "build_schedule",
    "slots",
]


class ScheduleError(ValueError):
    """A schedule that cannot run: wrong sizes, a missing dependency, mismatched transfers or a deadlock."""


class Kind(str, Enum):
    F = "F"  # forward
    B = "B"  # full backward (input and weight gradients together)
    I = "I"  # backward for the input gradient only  # noqa: E741
    W = "W"  # backward for the weight gradients (after I)
    SEND_F = "SEND_F"
    RECV_F = "RECV_F"
    SEND_B = "SEND_B"
    RECV_B = "RECV_B"

    @property
    def is_compute(self) -> bool:
        return self in (Kind.F, Kind.B, Kind.I, Kind.W)


_ACTION_RE = re.compile(r"^(\d+)(SEND_F|RECV_F|SEND_B|RECV_B|F|B|I|W)(\d+)$")


@dataclass(frozen=True)
class Action:
    stage: int
    kind: Kind
    microbatch: int

    def __str__(self) -> str:
        return f"{self.stage}{self.kind.value}{self.microbatch}"

    __repr__ = __str__

    @staticmethod
    def parse(text: str) -> "Action":
        match = _ACTION_RE.match(text.strip())
        if not match:
            raise ValueError(f"Not an action: {text!r}; expected e.g. '2F0', '1SEND_B3'.")
        return Action(int(match[1]), Kind(match[2]), int(match[3]))


@dataclass(frozen=True)
class Schedule:
    """The actions of every rank, and the placement they assume (see [Note: stages, parts and pipelines])."""

    name: str
    ranks: int
    microbatches: int
    parts: int
    placement: tuple[int, ...]  # virtual stage -> rank
    stage_part: tuple[int, ...]  # virtual stage -> model part
    pipelines: tuple[tuple[int, ...], ...]  # each: the virtual stages a microbatch visits, in order
    route: tuple[int, ...]  # microbatch -> index into ``pipelines``
    actions: tuple[tuple[Action, ...], ...]  # per rank, in execution order

    @property
    def num_stages(self) -> int:
        return len(self.placement)

    @property
    def split_backward(self) -> bool:
        return any(a.kind is Kind.I for rank in self.actions for a in rank)

    def stages_of(self, rank: int) -> tuple[int, ...]:
        return tuple(s for s, r in enumerate(self.placement) if r == rank)

    def parts_of(self, rank: int) -> tuple[int, ...]:
        return tuple(sorted({self.stage_part[s] for s in self.stages_of(rank)}))

    def path(self, microbatch: int) -> tuple[int, ...]:
        return self.pipelines[self.route[microbatch]]

    def prev_stage(self, stage: int, microbatch: int) -> Optional[int]:
        path = self.path(microbatch)
        i = path.index(stage)
        return path[i - 1] if i > 0 else None

    def next_stage(self, stage: int, microbatch: int) -> Optional[int]:
        path = self.path(microbatch)
        i = path.index(stage)
        return path[i + 1] if i + 1 < len(path) else None

    def is_first(self, stage: int) -> bool:
        return self.stage_part[stage] == 0

    def is_last(self, stage: int) -> bool:
        return self.stage_part[stage] == self.parts - 1

    def compute_order(self, rank: int) -> list[Action]:
        return [a for a in self.actions[rank] if a.kind.is_compute]

    def format(self) -> str:
        """The actions of each rank, one rank per line."""
        return "\n".join(f"rank {r}: " + " ".join(map(str, acts)) for r, acts in enumerate(self.actions))


# ----- checks on sizes -------------------------------------------------------------------------------------------


def _check_sizes(name: str, ranks: int, microbatches: int) -> None:
    for what, value in (("ranks", ranks), ("microbatches", microbatches)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ScheduleError(f"{name}: {what} must be a positive integer; got {value!r}.")


# ----- compute orders --------------------------------------------------------------------------------------------


def _one_f_one_b_order(stage: int, ranks: int, microbatches: int, backward: Kind = Kind.B) -> list[Action]:
    warmup = min(ranks - 1 - stage, microbatches)
    order = [Action(stage, Kind.F, m) for m in range(warmup)]
    for i in range(microbatches - warmup):
        order += [Action(stage, Kind.F, warmup + i), Action(stage, backward, i)]
    order += [Action(stage, backward, m) for m in range(microbatches - warmup, microbatches)]
    return order


def _single_pipeline(name: str, ranks: int, microbatches: int, orders: list[list[Action]]) -> Schedule:
    stages = tuple(range(ranks))
    return _with_communication(
        name, ranks, microbatches, parts=ranks, placement=stages, stage_part=stages, pipelines=(stages,),
        route=(0,) * microbatches, orders=orders,
    )


def gpipe(ranks: int, microbatches: int) -> Schedule:
    """GPipe: all forwards, then all backwards. Bubble (p-1)(f+b); stashes all m microbatches."""
    _check_sizes("gpipe", ranks, microbatches)
    orders = [
        [Action(s, Kind.F, m) for m in range(microbatches)] + [Action(s, Kind.B, m) for m in range(microbatches)]
        for s in range(ranks)
    ]
    return _single_pipeline("gpipe", ranks, microbatches, orders)


def one_f_one_b(ranks: int, microbatches: int) -> Schedule:
    """1F1B (PipeDream-flush): p-1-s warm-up forwards on stage s, then alternate. Same bubble as GPipe, stashes at
    most p - s microbatches."""
    _check_sizes("1f1b", ranks, microbatches)
    return _single_pipeline("1f1b", ranks, microbatches,
                            [_one_f_one_b_order(s, ranks, microbatches) for s in range(ranks)])


def interleaved_1f1b(ranks: int, microbatches: int, chunks: int = 2) -> Schedule:
    """Interleaved 1F1B (Megatron-LM): rank r runs the v = ``chunks`` stages r, r+p, ...; the bubble shrinks by v.

    Microbatches go in rounds of p through one chunk before the next chunk, so m must be a multiple of p.
    """
    _check_sizes("interleaved", ranks, microbatches)
    if not isinstance(chunks, int) or chunks < 1:
        raise ScheduleError(f"interleaved: chunks must be a positive integer; got {chunks!r}.")
    if microbatches % ranks:
        raise ScheduleError(
            f"interleaved: the schedule sends microbatches through each chunk in rounds of pipeline size "
            f"{ranks}, so microbatches must be a multiple of {ranks}; got {microbatches}. "
            f"Use microbatches={max(ranks, microbatches // ranks * ranks)} or "
            f"{(microbatches // ranks + 1) * ranks}."
        )
    p, v, m = ranks, chunks, microbatches
    total = m * v

    def forward(k: int, rank: int) -> Action:
        chunk = (k // p) % v
        return Action(chunk * p + rank, Kind.F, (k // (p * v)) * p + k % p)

    def backward(k: int, rank: int) -> Action:
        chunk = v - 1 - (k // p) % v
        return Action(chunk * p + rank, Kind.B, (k // (p * v)) * p + k % p)

    orders = []
    for r in range(p):
        warmup = total if m == p else min((p - r - 1) * 2 + (v - 1) * p, total)
        order = [forward(k, r) for k in range(warmup)]
        for i in range(total - warmup):
            order += [forward(warmup + i, r), backward(i, r)]
        order += [backward(k, r) for k in range(total - warmup, total)]
        orders.append(order)
    stages = tuple(range(p * v))
    return _with_communication(
        "interleaved", p, m, parts=p * v, placement=tuple(s % p for s in stages), stage_part=stages,
        pipelines=(stages,), route=(0,) * m, orders=orders,
    )


def zero_bubble(ranks: int, microbatches: int) -> Schedule:
    """Zero bubble, ZB-H1 (Qi et al. 2024): backward split into I (input gradient, on the critical path) and W
    (weight gradient, deferred into what would be bubbles). Bubble (p-1)(f+i-w) instead of 1F1B's (p-1)(f+b); no
    stage holds activations of more than p microbatches (1F1B's peak on stage 0).

    Stage s runs F and I in 1F1B order (p-1-s warm-up forwards); W(j) follows I(j+s), and the last s W passes fill
    the cooldown. (This lag is the only one of its family that reaches the bound for every m >= p: an exhaustive
    search over warm-up counts and lags per stage, p <= 4, found no other.)
    """
    _check_sizes("zero_bubble", ranks, microbatches)
    if microbatches < ranks:
        raise ScheduleError(
            f"zero_bubble: ZB-H1 fills the cooldown with deferred weight-gradient passes, which needs at least one "
            f"microbatch per stage: microbatches must be >= the pipeline size {ranks}; got {microbatches}."
        )
    orders = []
    for s in range(ranks):
        order: list[Action] = []
        next_w = 0
        for action in _one_f_one_b_order(s, ranks, microbatches, backward=Kind.I):
            order.append(action)
            if action.kind is Kind.I and action.microbatch >= s:
                order.append(Action(s, Kind.W, next_w))
                next_w += 1
        order += [Action(s, Kind.W, j) for j in range(next_w, microbatches)]
        orders.append(order)
    return _single_pipeline("zero_bubble", ranks, microbatches, orders)


def chimera(ranks: int, microbatches: int) -> Schedule:
    """Chimera (Li & Hoefler 2021): two pipelines in opposite directions over two replicas of the model.

    Built as in the paper, in slots where a forward and a backward take one slot each: in every unit of p
    microbatches, p/2 go down (part s on rank s) and p/2 go up (part j on rank p-1-j), each pipeline injecting one
    microbatch every two slots; the forwards of one direction and the backwards of the other then never collide.
    Units follow each other 2p slots apart (a rank's work per unit), again without collisions. In slots the bubble
    is p-2 for any number of units: (p-2)/(2m+p-2) of the time, against (p-1)/(m+p-1) for 1F1B.
    """
    _check_sizes("chimera", ranks, microbatches)
    if ranks % 2:
        raise ScheduleError(
            f"chimera: the two pipelines pair rank r with rank p-1-r, so the pipeline size must be even; got {ranks}."
        )
    if microbatches % ranks:
        raise ScheduleError(
            f"chimera: microbatches go in units of pipeline size {ranks} (half down, half up), so microbatches must be "
            f"a multiple of {ranks}; got {microbatches}. Use {max(ranks, microbatches // ranks * ranks)} or "
            f"{(microbatches // ranks + 1) * ranks}."
        )
    p, half = ranks, ranks // 2
    slotted: list[list[tuple[int, Action]]] = [[] for _ in range(p)]
    for unit in range(microbatches // p):
        offset = 2 * p * unit
        for k in range(half):
            down, up = unit * p + k, unit * p + half + k
            for rank in range(p):
                j = p - 1 - rank  # position of this rank in the up pipeline
                slotted[rank] += [
                    (offset + 2 * k + rank, Action(rank, Kind.F, down)),
                    (offset + 2 * k + 2 * p - 1 - rank, Action(rank, Kind.B, down)),
                    (offset + 2 * k + j, Action(p + j, Kind.F, up)),
                    (offset + 2 * k + 2 * p - 1 - j, Action(p + j, Kind.B, up)),
                ]
    orders = [[action for _, action in sorted(slots, key=lambda x: x[0])] for slots in slotted]
    down_stages, up_stages = tuple(range(p)), tuple(range(p, 2 * p))
    return _with_communication(
        "chimera", p, microbatches, parts=p, placement=down_stages + tuple(p - 1 - j for j in range(p)),
        stage_part=down_stages + down_stages, pipelines=(down_stages, up_stages),
        route=tuple(0 if m % p < half else 1 for m in range(microbatches)), orders=orders, costs=(1, 1, 1, 1),
    )


def forward_only(schedule: Schedule, microbatches: Optional[int] = None) -> Schedule:
    """Forward passes only, on ``schedule``'s placement: for validation, test and predict.

    Each rank runs its forwards in order of (microbatch, position on the path), which is a topological order that
    every rank agrees on; with Chimera both directions are used as in training.
    """
    m = schedule.microbatches if microbatches is None else microbatches
    _check_sizes(f"{schedule.name} forward", schedule.ranks, m)
    if len(schedule.pipelines) > 1 and m < len(schedule.pipelines):
        route = (0,) * m
    else:
        half = max(1, m // len(schedule.pipelines))
        route = tuple(min(i // half, len(schedule.pipelines) - 1) for i in range(m))
    orders: list[list[Action]] = [[] for _ in range(schedule.ranks)]
    for mb in range(m):
        for stage in schedule.pipelines[route[mb]]:
            orders[schedule.placement[stage]].append(Action(stage, Kind.F, mb))
    return _with_communication(
        f"{schedule.name}_forward", schedule.ranks, m, parts=schedule.parts, placement=schedule.placement,
        stage_part=schedule.stage_part, pipelines=schedule.pipelines, route=route, orders=orders,
    )


SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "1f1b": one_f_one_b,
    "gpipe": gpipe,
    "interleaved": interleaved_1f1b,
    "zero_bubble": zero_bubble,
    "chimera": chimera,
}


def build_schedule(name: str, ranks: int, microbatches: int, chunks: int = 2) -> Schedule:
    """The schedule called ``name`` (a key of :data:`SCHEDULES`); ``chunks`` only applies to ``interleaved``."""
    if name not in SCHEDULES:
        raise ScheduleError(f"Unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}.")
    if name == "interleaved":
        return interleaved_1f1b(ranks, microbatches, chunks)
    return SCHEDULES[name](ranks, microbatches)


# ----- communication ---------------------------------------------------------------------------------------------


def _with_communication(name: str, ranks: int, microbatches: int, *, parts: int, placement: tuple[int, ...],
                        stage_part: tuple[int, ...], pipelines: tuple[tuple[int, ...], ...], route: tuple[int, ...],
                        orders: list[list[Action]], costs: tuple[float, float, float, float] = (1, 2, 1, 1)) -> Schedule:
    """Insert SEND and RECV actions into per-rank compute orders (see [Note: communication actions])."""
    bare = Schedule(name, ranks, microbatches, parts, placement, stage_part, pipelines, route,
                    tuple(tuple(o) for o in orders))
    # The compute on each rank that consumes a received value: F for activations, B or I for gradients.
    consumer: dict[tuple[Kind, int, int], Action] = {}
    for order in orders:
        for action in order:
            if action.kind is Kind.F:
                consumer[(Kind.RECV_F, action.stage, action.microbatch)] = action
            elif action.kind in (Kind.B, Kind.I):
                consumer[(Kind.RECV_B, action.stage, action.microbatch)] = action
    send_of: dict[Action, Action] = {}
    channel: dict[tuple[int, int], list[Action]] = defaultdict(list)  # (src, dst) -> RECVs in the sender's order
    consumer_of: dict[Action, Action] = {}  # RECV -> the compute that uses it
    for src, order in enumerate(orders):
        for action in order:
            transfer = _transfer(bare, action)
            if transfer is None or placement[transfer[1].stage] == src:
                continue
            send, recv = transfer
            send_of[action] = send
            channel[(src, placement[recv.stage])].append(recv)
            consumer_of[recv] = consumer[(recv.kind, recv.stage, recv.microbatch)]

    # Each RECV goes into the receiver's first slot whose window on the ideal clock reaches the time its SEND is
    # posted (see [Note: communication actions]); on the same channel those times grow, so the order is kept.
    start, end = _ideal_times(bare, orders, costs)
    slot_recvs: list[dict[int, list[tuple[float, int, Action]]]] = [defaultdict(list) for _ in orders]
    for (src, dst), queue in channel.items():
        order = orders[dst]
        for position, recv in enumerate(queue):
            sent_at = end[_producer(bare, recv)]
            consumer = order.index(consumer_of[recv])
            # Slot j sits before compute j; its window is [end of compute j-1, start of compute j].
            j = next(j for j in range(consumer + 1) if j == consumer or start[order[j]] >= sent_at)
            slot_recvs[dst][j].append((sent_at, src * len(queue) + position, recv))
    actions = []
    for rank, order in enumerate(orders):
        out: list[Action] = []
        for j, compute in enumerate(order):
            out += [recv for _, _, recv in sorted(slot_recvs[rank][j], key=lambda x: (x[0], x[1]))]
            out.append(compute)
            if compute in send_of:
                out.append(send_of[compute])
        actions.append(tuple(out))
    return Schedule(name, ranks, microbatches, parts, placement, stage_part, pipelines, route, tuple(actions))


def _producer(schedule: Schedule, recv: Action) -> Action:
    s, m = recv.stage, recv.microbatch
    if recv.kind is Kind.RECV_F:
        prev = schedule.prev_stage(s, m)
        assert prev is not None
        return Action(prev, Kind.F, m)
    nxt = schedule.next_stage(s, m)
    assert nxt is not None
    kinds = [a.kind for a in schedule.actions[schedule.placement[nxt]] if a.stage == nxt and a.microbatch == m]
    return Action(nxt, Kind.I if Kind.I in kinds else Kind.B, m)


def _ideal_times(schedule: Schedule, orders: list[list[Action]],
                 costs: tuple[float, float, float, float]) -> tuple[dict[Action, float], dict[Action, float]]:
    """Start and end of every compute with instant transfers: the logical clock that places the RECVs."""
    cost = {Kind.F: costs[0], Kind.B: costs[1], Kind.I: costs[2], Kind.W: costs[3]}
    start: dict[Action, float] = {}
    end: dict[Action, float] = {}
    clock, pointer = [0.0] * len(orders), [0] * len(orders)
    moved = True
    while moved:
        moved = False
        for rank, order in enumerate(orders):
            while pointer[rank] < len(order):
                a = order[pointer[rank]]
                s, m = a.stage, a.microbatch
                if a.kind is Kind.F:
                    prev = schedule.prev_stage(s, m)
                    needs = [] if prev is None else [Action(prev, Kind.F, m)]
                elif a.kind is Kind.W:
                    needs = [Action(s, Kind.I, m)]
                else:
                    nxt = schedule.next_stage(s, m)
                    needs = [Action(s, Kind.F, m)] + ([] if nxt is None else [Action(nxt, a.kind, m)])
                if any(n not in end for n in needs):
                    break  # the checker (simulate) says what is wrong with an order that never gets here
                start[a] = max([clock[rank]] + [end[n] for n in needs])
                end[a] = clock[rank] = start[a] + cost[a.kind]
                pointer[rank] += 1
                moved = True
    for order in orders:  # unreachable computes keep the order they are in
        for a in order:
            if a not in start:
                start[a] = end[a] = float("inf")
    return start, end


def _transfer(schedule: Schedule, action: Action) -> Optional[tuple[Action, Action]]:
    """The (SEND, RECV) pair that carries ``action``'s result to the next compute of its microbatch, if any."""
    s, m = action.stage, action.microbatch
    if action.kind is Kind.F:
        nxt = schedule.next_stage(s, m)
        return None if nxt is None else (Action(s, Kind.SEND_F, m), Action(nxt, Kind.RECV_F, m))
    if action.kind in (Kind.B, Kind.I):
        prev = schedule.prev_stage(s, m)
        return None if prev is None else (Action(s, Kind.SEND_B, m), Action(prev, Kind.RECV_B, m))
    return None




def slots(actions: tuple[Action, ...]) -> list[tuple[Action, ...]]:
    """``actions`` cut into computes (1-tuples) and slots: maximal runs of SEND / RECV actions, each posted as one
    batch (see [Note: communication actions])."""
    out: list[tuple[Action, ...]] = []
    run: list[Action] = []
    for action in actions:
        if action.kind.is_compute:
            if run:
                out.append(tuple(run))
                run = []
            out.append((action,))
        else:
            run.append(action)
    if run:
        out.append(tuple(run))
    return out
