"""`tp1d` on Hugging Face decoders, unchanged (issue 12): Llama (separate q/k/v/o, grouped-query attention, rotary),
GPT-2 (``Conv1D``, fused ``c_attn``, tied embedding) and GPT-NeoX (fused ``query_key_value`` interleaved per head,
partial rotary, parallel residual), built from configs (tests/hf_models.py).

One launch per world size trains every configuration in a row through Lightning's Trainer (gloo ranks joined as
under torchrun, as in test_tp1d.py) and checks, per fit:

- step-by-step loss parity with one process (fp32, SGD), tensor 2 and 4, with and without sequence parallelism,
  and tensor 2 x data 2;
- per-rank bytes of every attention / MLP block = 1/t of the block's full bytes (measured on the sharded module);
  the vocabulary 1/t of its padded size; the plan line reports the sharded share;
- after fit the module is whole: the original classes and full shapes, state dict equal to the same training in
  one process; ``save_pretrained`` / ``from_pretrained`` round trip with equal logits;
- ``strategy.grad_norm`` equals Lightning's ``grad_norm`` in one process;
- ``Trainer.init_module(empty_init=True)``: the model's own initialisation, first loss within 2% of eager (Llama,
  tied Llama, GPT-2);
- the strict error for repeated blocks the plan cannot shard, and ``strict=False``.
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.utilities import grad_norm
from torch import nn
from torch.utils.data import DataLoader

import lightning_par  # noqa: F401  (registers the strategy names)
from helpers import free_port, run_on_ranks
from hf_models import BUILDERS, HFCausalLM, token_data
from lightning_par import TensorParallel1DStrategy
from lightning_par.tensor import applied_plan, auto_plan, shard_spec
from parity import GlobalBatchOrder, global_losses, relative_gap
from test_dp import _as_external_rank

TOL = 1e-5
FIRST_LOSS_TOL = 0.02
STEPS, BATCH = 3, 2
BLOCK_SUFFIXES = (".self_attn", ".attn", ".attention", ".mlp")


class Probe(Callback):
    """Records, while the module is sharded, the bytes of each attention / MLP block and of the vocabulary layers,
    the plan line, and the gradient norms of every step (the strategy's under tp1d, Lightning's in one process)."""

    def __init__(self) -> None:
        self.bytes: dict[str, int] = {}
        self.plan = ""
        self.norms: list[dict[str, float]] = []

    def on_train_start(self, trainer, module) -> None:
        self.bytes = _block_bytes(module)
        plan = applied_plan(module)
        self.plan = plan.describe().splitlines()[0] if plan is not None else ""

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        strategy = trainer.strategy
        norms = strategy.grad_norm(2) if isinstance(strategy, TensorParallel1DStrategy) else grad_norm(module, 2)
        self.norms.append({k: float(v) for k, v in norms.items()})


def _block_bytes(module: nn.Module) -> dict[str, int]:
    out = {}
    for name, m in module.named_modules():
        if name.endswith(BLOCK_SUFFIXES) or name.endswith(("embed_tokens", "wte", "embed_in", "lm_head")):
            out[name] = sum(p.numel() * p.element_size() for p in m.parameters())
    return out


def _fit(family: str, strategy: Any, devices: int, data: int, empty_init: Optional[bool] = None,
         save_dir: Optional[str] = None, **build: Any) -> dict:
    seed_everything(0, verbose=False)
    dataset = token_data(STEPS * BATCH * data)
    if devices == 1:
        loader = DataLoader(dataset, batch_size=BATCH * data, sampler=GlobalBatchOrder(len(dataset), data, BATCH))
    else:
        loader = DataLoader(dataset, batch_size=BATCH)
    probe = Probe()
    trainer = Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_epochs=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, callbacks=[probe])
    if empty_init is None:
        module = BUILDERS[family](**build)
    else:
        with trainer.init_module(empty_init=empty_init):
            module = BUILDERS[family](**build)
    trainer.fit(module, loader)
    out = {"losses": module.recorded, "bytes": probe.bytes, "plan": probe.plan, "norms": probe.norms,
           "state": {k: v.detach().clone() for k, v in module.state_dict().items()},
           "classes": sorted({type(m).__name__ for m in module.modules()}),
           "meta": any(p.is_meta for p in module.parameters()),
           "optimizer": _optimizer_whole(trainer, module)}
    if save_dir is not None:
        out["roundtrip"] = _roundtrip(module, save_dir)
    return out


def _optimizer_whole(trainer: Trainer, module: nn.Module) -> bool:
    """After fit the optimizer holds the module's (whole) parameters and full-shaped momentum."""
    optimizer = trainer.optimizers[0]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    ids = {id(p) for p in module.parameters()}
    return all(id(p) in ids for p in params) and all(
        s["momentum_buffer"].shape == p.shape for p, s in optimizer.state.items() if "momentum_buffer" in s)


def _roundtrip(module: HFCausalLM, save_dir: str) -> float:
    """save_pretrained after fit (rank 0 writes), from_pretrained on every rank: the largest logit difference."""
    if dist.get_rank() == 0:
        module.model.save_pretrained(save_dir)
    dist.barrier()
    loaded = type(module.model).from_pretrained(save_dir)
    mine, theirs = module.model.state_dict(), loaded.state_dict()
    assert set(theirs) <= set(mine), set(theirs) - set(mine)
    for k in theirs:
        assert mine[k].shape == theirs[k].shape and torch.equal(mine[k], theirs[k]), k
    x = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(3))
    module.eval()
    loaded.eval()
    with torch.no_grad():
        return float((module(x) - loaded(input_ids=x).logits).abs().max())


def tp(tensor: int, sp: bool, **kwargs: Any) -> TensorParallel1DStrategy:
    return TensorParallel1DStrategy(tensor_size=tensor, sequence_parallel=sp, **kwargs)


# name -> (family, tensor, sequence parallel, builder kwargs)
PARITY = {
    2: {f"{fam}_t2{'_sp' if sp else ''}": (fam, 2, sp, {}) for fam in BUILDERS for sp in (False, True)},
    4: {**{f"{fam}_t4{'_sp' if sp else ''}": (fam, 4, sp, {"kv_heads": 4} if fam == "llama" else {})
           for fam in BUILDERS for sp in (False, True)},
        "llama_t2d2_sp": ("llama", 2, True, {}), "gpt2_t2d2": ("gpt2", 2, False, {})},
}


# ----- the strict error ---------------------------------------------------------------------------------------------


class NormedAttention(nn.Module):
    """An attention the plan cannot shard: a norm between its projections (parameters besides its Linears)."""

    def __init__(self, dim: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.n_heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(self.q_norm(q), k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class UnshardableBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(64)
        self.attn = NormedAttention()

    def forward(self, x):
        return x + self.attn(self.norm(x))


class Unshardable(HFCausalLM):
    def __init__(self) -> None:
        super().__init__(None)
        self.embed = nn.Embedding(128, 64)
        self.blocks = nn.ModuleList(UnshardableBlock() for _ in range(2))
        self.head = nn.Linear(64, 128)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _strict(world: int) -> dict:
    seed_everything(0, verbose=False)
    loader = DataLoader(token_data(STEPS * BATCH), batch_size=BATCH)
    out = {}
    for strict in (True, False):
        trainer = Trainer(accelerator="cpu", devices=world, strategy=tp(2, False, strict=strict), max_steps=1,
                          logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False)
        module = Unshardable()
        try:
            trainer.fit(module, loader)
            out[strict] = f"trained {len(module.recorded)}"
        except ValueError as error:
            out[strict] = str(error)
    return out


# ----- the launches -------------------------------------------------------------------------------------------------


def _train_all(rank: int, world: int, port: int, tmpdir: str) -> dict:
    _as_external_rank(rank, world, port)
    out = {}
    for name, (fam, tensor, sp, build) in PARITY[world].items():
        save = os.path.join(tmpdir, name) if name in ("llama_t2_sp", "gpt2_t2", "neox_t2_sp", "gpt2_t4_sp") else None
        out[name] = _fit(fam, tp(tensor, sp), world, world // tensor, save_dir=save, **build)
    if world == 2:
        out["llama_meta"] = _fit("llama", tp(2, True), world, 1, empty_init=True)
        out["llama_tied_meta"] = _fit("llama", tp(2, True), world, 1, empty_init=True, tie=True)
        out["llama_tied"] = _fit("llama", tp(2, True), world, 1, tie=True)
        out["gpt2_meta"] = _fit("gpt2", tp(2, False), world, 1, empty_init=True)
        out["strict"] = _strict(world)
    return out


def _reference(cache: dict, fam: str, data: int, **build: Any) -> dict:
    key = (fam, data, tuple(sorted(build.items())))
    if key not in cache:
        cache[key] = _fit(fam, "auto", 1, data, **build)
    return cache[key]


def _check_parity(name: str, per_rank: list, world: int, refs: dict) -> None:
    fam, tensor, sp, build = PARITY[world][name]
    data = world // tensor
    ref = _reference(refs, fam, data, **build)
    runs = [r[name] for r in per_rank]
    losses = [r["losses"] for r in runs]
    ours = global_losses(losses, data, ranks=list(range(0, world, tensor)))
    assert len(ours) == STEPS and relative_gap(ours, ref["losses"]) <= TOL, (name, ours, ref["losses"])
    seed_everything(0, verbose=False)
    initial = BUILDERS[fam](**build).state_dict()  # what _fit starts from: training moved every weight matrix
    assert all(not torch.equal(initial[k], v) for k, v in ref["state"].items() if k.endswith("proj.weight")), name

    # The plan line reports the sharded share; every attention / MLP block holds 1/t of its bytes on each rank, the
    # vocabulary 1/t of its padded size (128 rows: no padding at 2 and 4).
    assert "sharded " in runs[0]["plan"] and "% of parameters" in runs[0]["plan"], runs[0]["plan"]
    share = float(runs[0]["plan"].split("sharded ")[1].split("%")[0])
    assert share > 90.0, (name, runs[0]["plan"])
    whole = BUILDERS[fam](**build)
    full = _block_bytes(whole)
    blocks = [k for k in full if k.endswith(BLOCK_SUFFIXES)]
    assert len(blocks) == 2 * 2, blocks  # attention and MLP of both layers
    # The bias of a row-parallel layer is added after the reduction: replicated, the one part not divided.
    rowwise = [n for n, s in auto_plan(whole).plan.items() if s.name == "rowwise"]
    replicated = {k: sum(whole.get_submodule(n).bias.numel() * 4 for n in rowwise
                         if n.startswith(k + ".") and whole.get_submodule(n).bias is not None) for k in full}
    for run in runs:
        for k, full_bytes in full.items():
            expected = (full_bytes - replicated[k]) // tensor + replicated[k]
            assert run["bytes"][k] == expected, (name, k, run["bytes"][k], full_bytes)

    # After fit: whole again on every rank, the original classes, the single-process state.
    for run in runs:
        assert not any("Parallel" in c for c in run["classes"]), run["classes"]
        assert run["optimizer"], name
        assert set(run["state"]) == set(ref["state"])
        for k, v in ref["state"].items():
            assert run["state"][k].shape == v.shape, (name, k)
            assert torch.allclose(run["state"][k], v, rtol=1e-4, atol=1e-6), (name, k, (run["state"][k] - v).abs().max())
        if "roundtrip" in run:
            assert run["roundtrip"] <= 1e-5, (name, run["roundtrip"])

    # grad_norm: the whole gradients' norms (one replica's: data-averaged gradients are the same on every rank).
    for step, (mine, theirs) in enumerate(zip(runs[0]["norms"], ref["norms"])):
        assert set(mine) == set(theirs), (name, set(mine) ^ set(theirs))
        for k in theirs:
            assert mine[k] == pytest.approx(theirs[k], rel=1e-4, abs=1e-7), (name, step, k)


@pytest.mark.parametrize("world", [2, 4])
def test_tp1d_hugging_face_decoders(world, tmp_path):
    per_rank = run_on_ranks(_train_all, world, free_port(), str(tmp_path))
    refs: dict = {}
    for name in PARITY[world]:
        _check_parity(name, per_rank, world, refs)
    if world != 2:
        return
    # Meta device: the model's own initialisation (a different draw), never uninitialised memory.
    for meta, fam, build in (("llama_meta", "llama", {}), ("gpt2_meta", "gpt2", {}),
                             ("llama_tied_meta", "llama", {"tie": True})):
        eager = per_rank[0][meta.replace("_meta", "")] if "tied" in meta else _reference(refs, fam, 1, **build)
        first = per_rank[0][meta]["losses"][0]
        assert abs(first - eager["losses"][0]) / eager["losses"][0] <= FIRST_LOSS_TOL, (meta, first, eager["losses"])
        assert all(math.isfinite(x) for x in per_rank[0][meta]["losses"]) and not per_rank[0][meta]["meta"]
        for r in per_rank:
            assert r[meta]["losses"] == per_rank[0][meta]["losses"]
    # Tied embeddings stay tied through meta init, sharding and teardown: one tensor in the state.
    tied = per_rank[0]["llama_tied_meta"]["state"]
    assert torch.equal(tied["model.lm_head.weight"], tied["model.model.embed_tokens.weight"])
    strict = per_rank[0]["strict"]
    assert "UnshardableBlock" in strict[True] and "'blocks'" in strict[True] and "plan=" in strict[True], strict
    assert "strict=False" in strict[True] and strict[False] == "trained 1", strict


def test_plan_for_hugging_face_families_in_one_process():
    """What the automatic plan finds, without ranks: every block of the three families, the heads it divides, the
    grouped-query constraint, and the strict message."""
    llama = auto_plan(BUILDERS["llama"]())
    assert llama.divisor() == 2 and llama.strict_error() is None
    assert str(llama.plan["model.model.layers.1.self_attn"].describe()) == "block"  # nothing to divide: view(-1)
    with pytest.raises(ValueError, match="key/value heads = 2 cannot be split over tensor size 4"):
        auto_plan(BUILDERS["llama"](), 4)
    gpt2 = auto_plan(BUILDERS["gpt2"]())
    assert gpt2.plan["model.transformer.h.0.attn"].divide == ("num_heads", "split_size")
    assert gpt2.plan["model.transformer.h.0.attn.c_attn"].segments == (64, 64, 64)
    assert gpt2.plan["model.transformer.h.1.mlp.c_proj"].name == "rowwise"
    neox = auto_plan(BUILDERS["neox"]())
    assert neox.plan["model.gpt_neox.layers.0.attention.query_key_value"].segments is None  # per head, contiguous
    for plan in (llama, gpt2, neox):
        blocks = [n for n, s in plan.plan.items() if s.name == "block"]
        assert len(blocks) == 4, blocks
    message = auto_plan(Unshardable()).strict_error()
    assert "2 repeated UnshardableBlock blocks of 'blocks'" in message and "q_norm" in message
