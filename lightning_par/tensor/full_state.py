"""Whole-tensor state for tensor-parallel models: gather shards into full tensors for a checkpoint, cut full tensors
into shards on load.

[Note: the interim checkpoint path of tp1d]
A tp1d checkpoint is Lightning's standard single file, written by rank 0, with the model's original parameter
names and full, unpadded shapes, and the optimizer state in full shapes too: it loads in one process, under ``dp``
or under tp1d with another tensor size, and a ``dp`` (or single-process) checkpoint loads under tp1d. Every rank
gathers the full state, which costs one model's worth of memory while saving. The shared sharded (DCP) path of
``lightning_par/checkpoint.py`` stores flat pieces of a ZeRO engine and has no notion of a tensor-parallel shard
yet; when it does, these four functions are what it replaces.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from lightning_par.comm.collectives import gather_along_dim
from lightning_par.tensor.layers_1d import ShardSpec, shard_spec


def _specs(module: nn.Module) -> dict[str, tuple[ShardSpec, torch.Size]]:
    return {n: (spec, p.shape) for n, p in module.named_parameters(remove_duplicate=False)
            if (spec := shard_spec(p)) is not None}


@torch.no_grad()
def _gather(value: Tensor, spec: ShardSpec, group: Optional[ProcessGroup]) -> Tensor:
    return spec.unshard(gather_along_dim(value.contiguous(), spec.dim, group))


def _shard(value: Tensor, spec: ShardSpec, local_shape: torch.Size, rank: int, what: str) -> Tensor:
    full_shape = spec.full_shape(local_shape)
    if tuple(value.shape) != full_shape:
        raise ValueError(f"{what}: the checkpoint holds shape {tuple(value.shape)}, the full model has {full_shape}.")
    return spec.shard(value, rank)


def full_state_dict(module: nn.Module, group: Optional[ProcessGroup],
                    state: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """``module.state_dict()`` (or ``state``, keyed alike) with every sharded parameter gathered to its full shape
    (on every rank)."""
    specs = _specs(module)
    state = module.state_dict() if state is None else state
    return {k: _gather(v, specs[k][0], group) if k in specs else v for k, v in state.items()}


def shard_state_dict(module: nn.Module, state_dict: Mapping[str, Any], rank: int) -> dict[str, Any]:
    """A full state dict cut to this rank's shards of ``module``'s sharded parameters."""
    specs = _specs(module)
    return {k: _shard(v, *specs[k], rank, k) if k in specs else v for k, v in state_dict.items()}


def _optimizer_specs(optimizer: torch.optim.Optimizer, params: Optional[list[nn.Parameter]] = None
                     ) -> dict[int, tuple[ShardSpec, torch.Size]]:
    # Optimizer state dicts number parameters in param_groups order.
    if params is None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
    return {i: (spec, p.shape) for i, p in enumerate(params) if (spec := shard_spec(p)) is not None}


def full_optimizer_state(optimizer: torch.optim.Optimizer, group: Optional[ProcessGroup],
                         state_dict: Optional[Mapping[str, Any]] = None,
                         params: Optional[list[nn.Parameter]] = None) -> dict[str, Any]:
    """``optimizer.state_dict()`` with the state of sharded parameters (tensors shaped like them) made full.

    ``state_dict`` and ``params`` (the parameters it numbers, in order) stand in for an optimizer that holds
    something else (ZeRO's flat pieces)."""
    state_dict = optimizer.state_dict() if state_dict is None else state_dict
    specs = _optimizer_specs(optimizer, params)
    state = {}
    for index in sorted(state_dict["state"]):
        entry = state_dict["state"][index]
        if index in specs:
            spec, shape = specs[index]
            entry = {k: _gather(v, spec, group) if isinstance(v, Tensor) and v.shape == shape else v
                     for k, v in entry.items()}
        state[index] = entry
    return {**state_dict, "state": state}


def shard_optimizer_state(optimizer: torch.optim.Optimizer, state_dict: Mapping[str, Any], rank: int,
                          params: Optional[list[nn.Parameter]] = None) -> dict[str, Any]:
    """A full optimizer state dict (from :func:`full_optimizer_state`, ``dp`` or one process) cut to this rank
    (``params``: as for :func:`full_optimizer_state`)."""
    specs = _optimizer_specs(optimizer, params)
    state = {}
    for index, entry in state_dict["state"].items():
        if index in specs:
            spec, shape = specs[index]
            full_shape = spec.full_shape(shape)
            entry = {k: _shard(v, spec, shape, rank, f"optimizer state {index}.{k}")
                     if isinstance(v, Tensor) and tuple(v.shape) == full_shape else v for k, v in entry.items()}
        state[index] = entry
    return {**state_dict, "state": state}
