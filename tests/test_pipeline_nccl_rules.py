"""Issue 11, "Pipeline on NCCL", checked on CPU: the simulator runs NCCL's in-order rule (a rank's batches of
transfers run one after another) and refuses a schedule whose transfers cross; the executor refuses it too; every
schedule passes it at the sizes the strategy uses; on gloo ranks the executor's fast path (recorded shapes, one
batch per slot, no metadata) gives the slow path's results, a shape that changes under the same signature fails
naming the action, and a transfer that never comes fails after ``stall_timeout`` naming rank, action and peer."""

from __future__ import annotations

import os
import time
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import free_port
from lightning_par.pipeline import Action, Costs, ScheduleError, build_schedule, forward_only, one_f_one_b, simulate
from lightning_par.pipeline import executor as executor_module
from lightning_par.pipeline.executor import PipelineExecutor
from lightning_par.pipeline.schedules import Kind, slots
from lightning_par.pipeline.simulate import expected_makespan

# 1F1B on 2 ranks with each RECV posted one compute early in a slot of its own (the placement that hung on NCCL):
# rank 0 posts [SEND_F0 RECV_B0], then [SEND_F1]; rank 1 posts [RECV_F0], then [RECV_F1] before [SEND_B0]. Rank 0's
# first batch needs rank 1's SEND_B0, queued behind RECV_F1, which needs rank 0's SEND_F1, queued behind that batch.
CROSSED = {
    0: "0F0 0SEND_F0 0RECV_B0 0F1 0SEND_F1 0B0 0RECV_B1 0B1",
    1: "1RECV_F0 1F0 1RECV_F1 1B0 1SEND_B0 1F1 1B1 1SEND_B1",
}


def _crossed():
    s = one_f_one_b(2, 2)
    return replace(s, actions=tuple(tuple(map(Action.parse, CROSSED[r].split())) for r in range(2)))


def test_a_crossed_schedule_is_refused_by_the_simulator():
    with pytest.raises(ScheduleError, match="deadlock under NCCL's in-order rule") as info:
        simulate(_crossed())
    assert "rank 0 batch 0 [0SEND_F0 0RECV_B0]" in str(info.value)  # the stuck batches are named
    assert "1RECV_F1" in str(info.value)


def test_the_executor_refuses_a_schedule_the_simulator_refuses():
    with pytest.raises(ScheduleError, match="deadlock under NCCL's in-order rule"):
        PipelineExecutor(_crossed(), 0, None)  # checked before any process group is touched


@pytest.mark.parametrize("ranks", [2, 4, 8])
def test_every_schedule_passes_the_in_order_rule_with_its_bubble(ranks):
    for name in ("1f1b", "gpipe", "interleaved", "zero_bubble", "chimera"):
        for m in (ranks, 2 * ranks, 3 * ranks):
            schedule = build_schedule(name, ranks, m, chunks=2)
            costs = Costs(1, 1, 1, 1) if name == "chimera" else Costs()
            assert simulate(schedule, costs).makespan == expected_makespan(schedule, costs), (name, ranks, m)
            simulate(forward_only(schedule))
            simulate(forward_only(schedule, max(1, m // 3)))  # a smaller last evaluation batch
            for rank in range(ranks):  # sends of a compute follow it in the slot right after it
                acts = schedule.actions[rank]
                for i, a in enumerate(acts):
                    if a.kind in (Kind.SEND_F, Kind.SEND_B):
                        assert any(b.kind.is_compute for b in acts[:i])


# ----- gloo ranks ---------------------------------------------------------------------------------------------------


def _worker(rank, fn, world_size, port, results, event):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results[rank] = fn(rank, world_size, event)
    except BaseException as error:  # noqa: BLE001 - reported to the test
        results[rank] = f"{type(error).__name__}: {error}"
    # A timed-out gloo receive leaves the group unusable: no barrier, no destroy.
    os._exit(0)


def _spawn(fn, world_size=2):
    with mp.Manager() as manager:
        results, event = manager.dict(), manager.Event()
        mp.spawn(_worker, args=(fn, world_size, free_port(), results, event), nprocs=world_size, join=True)
        return [results[r] for r in range(world_size)]


WIDTH = 6


def _weights(schedule):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(WIDTH, WIDTH, generator=g, requires_grad=True) for _ in range(schedule.parts)]


def _stage_fns(schedule, weights, batch):
    micro = batch.chunk(schedule.microbatches)

    def forward(stage, mb, received):
        # Every stage but the last passes a tuple (two tensors): both wire shapes are covered.
        x = micro[mb] if received is None else received[0] + 0.5 * received[1]
        h = torch.tanh(x @ weights[schedule.stage_part[stage]])
        return h if schedule.is_last(stage) else (h, h * h)

    def loss(stage, mb, out):
        return out.pow(2).sum() / schedule.microbatches

    return forward, loss


def _fast_path(rank, world_size, event):
    schedule = build_schedule("1f1b", world_size, 4)
    weights = _weights(schedule)
    executor = PipelineExecutor(schedule, rank, dist.group.WORLD, stall_timeout=60)
    posted = []
    real_post = executor_module.post_batch

    def counting(ops, group):
        posted.append(len(ops))
        return real_post(ops, group)

    executor_module.post_batch = counting
    outputs, grads = [], []
    batch = torch.randn(8, WIDTH, generator=torch.Generator().manual_seed(1))
    for step in range(3):
        if step == 1:  # from now on no metadata may be encoded or decoded
            def refuse(*args, **kwargs):
                raise AssertionError("metadata on the fast path")
            executor_module.decode_meta = executor_module.encode_meta = refuse
        for w in weights:
            w.grad = None
        posted.clear()
        forward, loss = _stage_fns(schedule, weights, batch)
        outputs.append(executor.run(forward, loss, signature=("a",)))
        grads.append([w.grad.clone() if w.grad is not None else None for w in weights])
        assert len(posted) == sum(1 for item in slots(schedule.actions[rank]) if not item[0].kind.is_compute)
    return outputs, grads, sorted(executor._shapes, key=str)


def test_the_fast_path_gives_the_first_steps_results_without_metadata():
    per_rank = _spawn(_fast_path)
    for rank, result in enumerate(per_rank):
        assert not isinstance(result, str), result
        outputs, grads, signatures = result
        for later in (1, 2):
            assert outputs[later].keys() == outputs[0].keys()
            for m in outputs[0]:
                assert torch.equal(outputs[later][m], outputs[0][m])
            for a, b in zip(grads[later], grads[0]):
                assert (a is None and b is None) or torch.equal(a, b)
        assert signatures == [("a",)]
    assert sorted(per_rank[1][0][0]) == [0, 1, 2, 3]  # the last stage returns every microbatch


def _new_signature(rank, world_size, event):
    schedule = build_schedule("zero_bubble", world_size, 2)
    weights = _weights(schedule)
    executor = PipelineExecutor(schedule, rank, dist.group.WORLD, stall_timeout=60)
    got = {}
    for step, (signature, size) in enumerate([("a", 8), ("a", 8), ("b", 4), ("b", 4), ("a", 8)]):
        batch = torch.randn(size, WIDTH, generator=torch.Generator().manual_seed(size))
        forward, loss = _stage_fns(schedule, weights, batch)
        got[step] = executor.run(forward, loss, signature=signature)
    return {k: {m: v.tolist() for m, v in out.items()} for k, out in got.items()}


def test_a_new_signature_runs_the_slow_path_then_both_stay_fast():
    per_rank = _spawn(_new_signature)
    assert not isinstance(per_rank[1], str), per_rank[1]
    steps = per_rank[1]
    assert steps[0] == steps[1] == steps[4] and steps[2] == steps[3] and steps[0] != steps[2]


def _shape_changes(rank, world_size, event):
    schedule = build_schedule("1f1b", world_size, 2)
    weights = _weights(schedule)
    executor = PipelineExecutor(schedule, rank, dist.group.WORLD, stall_timeout=3)
    try:
        for size in (8, 6):  # same signature, different shapes: data-dependent as far as the executor knows
            forward, loss = _stage_fns(schedule, weights, torch.randn(size, WIDTH))
            executor.run(forward, loss, signature="same")
        return "no error"
    finally:
        if rank == 1:
            event.set()
        else:
            event.wait(60)  # stay up until the receiver has timed out (else it sees a closed connection)


def test_shapes_that_change_under_one_signature_fail_naming_the_action():
    errors = _spawn(_shape_changes)
    assert "pipeline rank 0: 0SEND_F0 to rank 1 has shapes (float32[3, 6], float32[3, 6])" in errors[0], errors[0]
    assert "static per input signature" in errors[0]
    assert errors[1].startswith("RuntimeError: pipeline rank 1: 1RECV_F0 waiting on rank 0 for 3 s"), errors[1]


def _never_sends(rank, world_size, event):
    schedule = build_schedule("gpipe", world_size, 2)
    weights = _weights(schedule)
    executor = PipelineExecutor(schedule, rank, dist.group.WORLD, stall_timeout=2)
    forward, loss = _stage_fns(schedule, weights, torch.randn(4, WIDTH))

    def broken(stage, mb, received):
        if rank == 0:
            raise ValueError("rank 0 fails before sending")
        return forward(stage, mb, received)

    start = time.monotonic()
    try:
        executor.run(broken, loss, signature=None)
    except Exception as error:  # noqa: BLE001
        return f"{type(error).__name__}: {error}", time.monotonic() - start
    finally:
        if rank == 1:
            event.set()
        else:
            event.wait(60)
    return "no error", 0.0


def test_a_transfer_that_never_comes_fails_after_the_stall_timeout():
    (error0, _), (error1, waited) = _spawn(_never_sends)
    assert "rank 0 fails before sending" in error0
    assert error1.startswith("RuntimeError: pipeline rank 1: 1RECV_F0 waiting on rank 0 for 2 s"), error1
    assert "stall_timeout=2 s" in error1
    assert 1.5 < waited < 30


def test_the_strategy_takes_a_stall_timeout():
    from lightning_par import PipelineStrategy

    assert PipelineStrategy(stall_timeout=5).stall_timeout == 5.0
    assert PipelineStrategy().stall_timeout == 600.0
    with pytest.raises(ValueError, match="stall_timeout must be a positive number of seconds"):
        PipelineStrategy(stall_timeout=0)
