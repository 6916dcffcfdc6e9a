"""Plans for 1D tensor parallelism: a mapping from module names to layer styles, and the function that applies one.

A plan is a dict ``{module name or glob pattern: style}``, names as ``named_modules()`` of the LightningModule gives
them (``"model.blocks.*.attn.c_attn"``); a style is a style object or its short name::

    plan = {
        "model.blocks.*.attn": ParallelBlock(divide=("n_head",)),   # or "block"
        "model.blocks.*.attn.c_attn": ColwiseParallel(segments=3),   # fused q/k/v: split each third
        "model.blocks.*.attn.c_proj": "rowwise",
        "model.blocks.*.mlp": "block",
        "model.blocks.*.mlp.c_fc": "colwise",
        "model.blocks.*.mlp.c_proj": "rowwise",
        "model.blocks": "sequence_region",                           # only read with sequence parallelism
        "model.wte": "vocab",
        "model.lm_head": "vocab",
    }

Modules that no entry names stay replicated. Exact names win over patterns; patterns apply in the plan's order.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from lightning_par.comm.collectives import all_gather_along_dim, gather_along_dim, split_along_dim
from lightning_par.tensor.layers_1d import (
    ColumnParallelLinear,
    InputOp,
    RowParallelLinear,
    ShardSpec,
    TensorGroup,
    VocabParallelEmbedding,
    VocabParallelOutput,
    linear_dims,
    make_shard,
    output_segments,
    shard_spec,
)
from lightning_par.tensor.linear_fns import to_compute_dtype
from lightning_par.tensor.mha import ParallelMultiheadAttention
from lightning_par.tensor.replicated_grads import ReplicatedGradSum

from lightning_par.tensor.styles import (
    ColwiseParallel,
    ParallelAttention,
    ParallelBlock,
    ParallelStyle,
    Plan,
    RowwiseParallel,
    SequenceParallelRegion,
    VocabParallel,
    as_style,
    indivisible,
)

# ----- the applied plan -------------------------------------------------------------------------------------------

PLAN_ATTR = "_tensor_parallel_plan"


@dataclass
class AppliedPlan:
    """The result of :func:`parallelize`, kept on the root module (``PLAN_ATTR``): what was done, and the group."""

    tg: TensorGroup
    sequence_parallel: bool
    entries: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: elements of the module's parameters (each shared one counted once, full shapes): all, and those sharded
    total_numel: int = 0
    sharded_numel: int = 0
    #: the replicated parameters of sequence-parallel regions, whose gradients the tensor group sums (None without
    #: sequence parallelism); see :meth:`reduce_replicated_grads`
    replicated_grads: Optional[ReplicatedGradSum] = field(default=None, repr=False)
    # What `unparallelize` undoes (see [Note: making the module whole again]).
    _shards: list[tuple[nn.Parameter, nn.Parameter]] = field(default_factory=list, repr=False)  # (original, shard)
    _replaced: list[tuple[nn.Module, nn.Module, list[tuple[nn.Module, str]]]] = field(default_factory=list, repr=False)
    _divided: list[tuple[nn.Module, str, int]] = field(default_factory=list, repr=False)
    _handles: list[Any] = field(default_factory=list, repr=False)
    _flags: list[tuple[nn.Module, str, Any]] = field(default_factory=list, repr=False)

    @property
    def sharded_share(self) -> float:
        """The fraction of the model's parameters (elements) that the plan shards."""
        return self.sharded_numel / self.total_numel if self.total_numel else 0.0

    def reduce_replicated_grads(self) -> None:
        """Sum the gradients of the replicated parameters of sequence-parallel regions over the tensor group: one
        all-reduce, a collective. The strategy calls it after every backward that synchronises gradients; without
        the strategy, call it on every rank after backward and before anything reads the gradients. See [Note: one
        coalesced sum of the replicated gradients] in ``replicated_grads.py``."""
        if self.replicated_grads is not None:
            self.replicated_grads.reduce()

    def rebind(self, group: Optional[ProcessGroup]) -> None:
        size = self.tg.size
        self.tg.bind(group)
        if self.tg.size != size:
            raise ValueError(f"This module was sharded for tensor size {size}; it cannot run with tensor size "
                             f"{self.tg.size}. Build a new module (or load its checkpoint) for another size.")

    def describe(self) -> str:
        mode = "with" if self.sequence_parallel else "without"
        lines = [f"tensor-parallel plan, tensor size {self.tg.size}, {mode} sequence parallelism, sharded "
                 f"{100 * self.sharded_share:.1f}% of parameters:"]
        width = max((len(n) for n, _ in self.entries), default=0)
        lines += [f"  {name:<{width}}  {what}" for name, what in self.entries]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def applied_plan(module: nn.Module) -> Optional[AppliedPlan]:
    return getattr(module, PLAN_ATTR, None)


# ----- applying a plan ----------------------------------------------------------------------------------------------


def _match(plan: Plan, names: list[str]) -> dict[str, ParallelStyle]:
    styles = {key: as_style(value) for key, value in plan.items()}
    chosen: dict[str, ParallelStyle] = {}
    for key, style in styles.items():
        hits = [key] if key in names else [n for n in names if fnmatch.fnmatchcase(n, key)]
        if not hits:
            sample = ", ".join(names[1:6])
            raise ValueError(f"Plan entry {key!r} matches no module; module names look like: {sample}, ...")
        for name in hits:
            if name not in chosen or name == key:
                chosen[name] = style
    return chosen


def _ancestors(name: str) -> list[str]:
    """Strict ancestors of the module ``name``, closest first; the root is ``""``."""
    if not name:
        return []
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, -1, -1)]


def _ancestor(name: str, among: Mapping[str, Any]) -> Optional[str]:
    return next((a for a in _ancestors(name) if a in among), None)


def _check(name: str, module: nn.Module, style: ParallelStyle, t: int) -> None:
    def need(types: tuple, label: str) -> None:
        if not isinstance(module, types):
            raise ValueError(f"{name}: style {style.name!r} applies to {label}, not {type(module).__name__}.")

    if isinstance(style, (ColwiseParallel, RowwiseParallel)):
        dims = linear_dims(module)
        if dims is None:
            raise ValueError(f"{name}: style {style.name!r} applies to nn.Linear, not {type(module).__name__} (a "
                             f"Hugging Face Conv1D works too).")
        if isinstance(style, ColwiseParallel):
            for n in output_segments(dims[1], style.segments):
                if n % t:
                    raise indivisible(name, "output features" + (" per segment" if style.segments else ""), n, t)
        elif dims[0] % t:
            raise indivisible(name, "input features", dims[0], t)
    elif isinstance(style, VocabParallel):
        need((nn.Embedding, nn.Linear), "nn.Embedding or nn.Linear")
        if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.sparse
                                                 or module.scale_grad_by_freq):
            raise ValueError(f"{name}: max_norm, sparse and scale_grad_by_freq embeddings cannot be vocab-parallel.")
    elif isinstance(style, ParallelAttention):
        need((nn.MultiheadAttention,), "nn.MultiheadAttention")
        if module.bias_k is not None or module.add_zero_attn:
            raise ValueError(f"{name}: nn.MultiheadAttention with add_bias_kv / add_zero_attn is not supported.")
        if module.num_heads % t:
            raise indivisible(name, "num_heads", module.num_heads, t)
    elif isinstance(style, ParallelBlock):
        for attr in style.divide:
            value = getattr(module, attr, None)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name}: attribute {attr!r} to divide is {value!r}, not an int.")
            if value % t:
                raise indivisible(name, attr, value, t)
    elif isinstance(style, SequenceParallelRegion):
        need((nn.ModuleList, nn.Sequential), "nn.ModuleList or nn.Sequential")
        if len(module) == 0:
            raise ValueError(f"{name}: an empty module list cannot be a sequence-parallel region.")


def _locations(root: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    where: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in root.modules():
        for attr, child in parent._modules.items():
            if child is not None:
                where.setdefault(id(child), []).append((parent, attr))
    return where


def _first_parameter(module: nn.Module) -> Optional[str]:
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    return params[0].name if params and params[0].kind in (params[0].POSITIONAL_OR_KEYWORD,
                                                           params[0].KEYWORD_ONLY) else None


def _map_hidden(args: tuple, kwargs: dict, fn: Callable[[Tensor], Tensor],
                first: Optional[str] = None) -> tuple[tuple, dict]:
    """Apply ``fn`` to a block's hidden-state argument: its first positional tensor, else the keyword argument named
    like the block's first forward parameter (``first``; Hugging Face layers call ``self_attn(hidden_states=...)``),
    else its first tensor keyword argument; every other argument that is the same tensor object gets the same
    result."""
    hidden = next((a for a in args if isinstance(a, Tensor)), None)
    if hidden is None and first is not None and isinstance(kwargs.get(first), Tensor):
        hidden = kwargs[first]
    if hidden is None:
        hidden = next((v for v in kwargs.values() if isinstance(v, Tensor)), None)
    if hidden is None:
        return args, kwargs
    out = fn(hidden)
    return (tuple(out if a is hidden else a for a in args),
            {k: out if v is hidden else v for k, v in kwargs.items()})


def _first_output(output: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    if isinstance(output, Tensor):
        return fn(output)
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return type(output)([fn(output[0]), *output[1:]])
    return output


def _split_sequence(x: Tensor, seq_dim: int, tg: TensorGroup, region: str) -> Tensor:
    if x.size(seq_dim) % tg.size:
        raise ValueError(f"Sequence parallelism splits the input of {region} along dim {seq_dim} over tensor size "
                         f"{tg.size}, but that dim has size {x.size(seq_dim)} (input shape {tuple(x.shape)}): use a "
                         f"sequence length divisible by {tg.size}, or sequence_parallel=False.")
    return split_along_dim(x, seq_dim, tg.group, chunks=tg.token_chunks)


def parallelize(root: nn.Module, plan: Plan, group: Union[ProcessGroup, TensorGroup, None], *,
                sequence_parallel: bool = False, sequence_dim: int = 1, vocab_parallel_loss: bool = True,
                token_chunks: int = 1, notes: Optional[list[str]] = None,
                reasons: Optional[Mapping[str, str]] = None) -> AppliedPlan:
    """Shard ``root`` in place as ``plan`` says, over ``group``; return (and keep on ``root``) what was done.

    Every rank of the group must hold the same full weights when this runs (the strategy broadcasts them first).
    Checks every entry before changing anything, so an error leaves the module as it was. With sequence
    parallelism, gradients of the replicated parameters in its regions are complete only after
    :meth:`AppliedPlan.reduce_replicated_grads` (the strategy calls it after backward). ``token_chunks``: the
    chunks of the sequence-parallel token layout (see :class:`TensorGroup`), unless ``group`` is a TensorGroup.
    """
    tg = group if isinstance(group, TensorGroup) else TensorGroup(group, token_chunks)
    t = tg.size
    if applied_plan(root) is not None:
        raise ValueError("This module is tensor-parallel already; `parallelize` runs once per module.")
    named = dict(root.named_modules())
    chosen = _match(plan, list(named))
    for name, style in chosen.items():
        _check(name, named[name], style, t)
    sp = sequence_parallel and t > 1
    regions = {n: (s.seq_dim if s.seq_dim is not None else sequence_dim)
               for n, s in chosen.items() if isinstance(s, SequenceParallelRegion)}
    blocks = {n: s for n, s in chosen.items() if isinstance(s, ParallelBlock)}
    result = AppliedPlan(tg, sp, notes=list(notes or []))
    unique = {id(p): p for p in root.parameters()}

    def region_of(name: str) -> Optional[int]:
        """The sequence dim of the region ``name`` lies in (None when not sequence parallel)."""
        region = _ancestor(name, regions) if sp else None
        return regions[region] if region is not None else None

    cache: dict[int, tuple[ShardSpec, nn.Parameter, nn.Parameter]] = {}

    def shard(param: nn.Parameter, spec: ShardSpec) -> nn.Parameter:
        hit = cache.get(id(param))
        if hit is not None:
            if hit[0] != spec:
                raise ValueError(f"A parameter shared by several modules is sharded two ways ({hit[0]} and {spec}).")
            return hit[2]
        new = make_shard(param, spec, tg.rank)
        cache[id(param)] = (spec, param, new)  # keeps the original alive: ids stay unique while we work
        result._shards.append((param, new))
        return new

    # Blocks first: their shared input collective is handed to the column layers inside them.
    block_ops: dict[str, Optional[InputOp]] = {}
    for name, style in blocks.items():
        module = named[name]
        for attr in style.divide:
            result._divided.append((module, attr, getattr(module, attr)))
            setattr(module, attr, getattr(module, attr) // t)
        seq_dim = region_of(name)
        block_ops[name] = InputOp(tg) if seq_dim is None else None
        if t > 1:
            result._handles += _install_block_hooks(module, tg, block_ops[name], seq_dim)

    where = _locations(root)
    for name, style in chosen.items():
        module = named[name]
        seq_dim = region_of(name)
        new: Optional[nn.Module] = None
        if isinstance(style, ColwiseParallel):
            block = _ancestor(name, blocks)
            input_op: Any = block_ops[block] if block is not None else "own"
            new = ColumnParallelLinear.from_linear(module, tg, style.segments, input_op, style.gather_output,
                                                   seq_dim=seq_dim if block is None else None, shard=shard)
        elif isinstance(style, RowwiseParallel):
            new = RowParallelLinear.from_linear(module, tg, seq_dim, style.input_is_parallel, shard=shard)
        elif isinstance(style, VocabParallel):
            if isinstance(module, nn.Embedding):
                new = VocabParallelEmbedding.from_embedding(module, tg, shard=shard)
            else:
                new = VocabParallelOutput.from_linear(module, tg, vocab_parallel_loss, shard=shard)
        elif isinstance(style, ParallelAttention):
            new = ParallelMultiheadAttention(module, tg, seq_dim, shard=shard)
        if new is not None:
            new.train(module.training)
            result._replaced.append((module, new, where.get(id(module), [])))
            for parent, attr in where.get(id(module), []):
                setattr(parent, attr, new)
        if isinstance(style, SequenceParallelRegion):
            seq_dim = regions[name] if sp else None
        detail = _detail(style, module, t, seq_dim)
        if reasons and name in reasons:
            detail = f"{detail}  [{reasons[name]}]"
        result.entries.append((name, detail))

    for param_name, p in root.named_parameters(remove_duplicate=False):
        hit = cache.get(id(p))
        if hit is not None and hit[1] is p:
            raise ValueError(f"{param_name} is tied to a parameter that the plan shards, but its own module is not "
                             f"sharded the same way: shard both (e.g. the embedding and the output layer) or neither.")

    if sp:
        replicated: dict[int, nn.Parameter] = {}  # a parameter shared by two regions is summed once
        for name, seq_dim in regions.items():
            result._handles += _install_region_hooks(root.get_submodule(name), name, tg, seq_dim)
            replicated.update((id(p), p) for p in root.get_submodule(name).parameters()
                              if shard_spec(p) is None and p.requires_grad)
        if replicated:
            result.replicated_grads = ReplicatedGradSum(list(replicated.values()), tg)
            result._handles += result.replicated_grads.handles
    for module in root.modules():
        # torch's nested-tensor fast path reads the attention weights directly; never with sharded layers.
        if isinstance(module, nn.TransformerEncoder) and any(
                isinstance(m, ParallelMultiheadAttention) for m in module.modules()):
            result._flags.append((module, "use_nested_tensor", module.use_nested_tensor))
            module.use_nested_tensor = False
    result.total_numel = sum(p.numel() for p in unique.values())
    result.sharded_numel = sum(original.numel() for original, _ in result._shards if id(original) in unique)
    with torch.no_grad():
        for original, _ in result._shards:  # the shards hold the values now; the originals come back at teardown
            original.data = torch.empty(0, dtype=original.dtype, device=original.device)
    setattr(root, PLAN_ATTR, result)
    return result


# [Note: making the module whole again]
# `parallelize` keeps what it replaced: the original modules (their sharded Parameters emptied, the same Parameter
# objects, so ties between them survive), the attributes it divided, its hooks. `unparallelize` gathers every shard
# into its original Parameter (a collective over the tensor group), puts the original modules back, restores the
# attributes and removes the hooks: the module has its original classes, names and full shapes again, on every
# rank, so that `save_pretrained`, inference or another strategy see the model as it was built. Optimizers that
# hold the shards are pointed at the originals, their state gathered to full shapes.


@torch.no_grad()
def unparallelize(root: nn.Module, optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
    """Undo :func:`parallelize` on ``root`` after training: a collective, called on every rank of the tensor group.
    ``optimizers`` holding the shards are moved to the whole parameters (state gathered)."""
    result = applied_plan(root)
    if result is None:
        return
    group = result.tg.group
    full: dict[int, nn.Parameter] = {}
    for original, shard in result._shards:
        spec = shard_spec(shard)
        value = spec.unshard(gather_along_dim(shard.detach().contiguous(), spec.dim, group)) if result.tg.size > 1 \
            else spec.unshard(shard.detach())
        original.data = value.to(shard.dtype)
        original.requires_grad_(shard.requires_grad)
        full[id(shard)] = original
    def gather(p: Tensor, value: Tensor) -> Tensor:
        spec = shard_spec(p)
        return spec.unshard(gather_along_dim(value.contiguous(), spec.dim, group) if result.tg.size > 1 else value)

    move_optimizers(optimizers, full, gather)
    for original, new, places in reversed(result._replaced):
        original.train(new.training)
        for parent, attr in places:
            setattr(parent, attr, original)
    for module, attr, value in reversed(result._divided):
        setattr(module, attr, value)
    for module, attr, value in result._flags:
        setattr(module, attr, value)
    for handle in result._handles:
        handle.remove()
    result.replicated_grads = None
    result._shards.clear()
    result._replaced.clear()
    delattr(root, PLAN_ATTR)


def move_optimizers(optimizers: Iterable[torch.optim.Optimizer], whole: dict[int, nn.Parameter],
                    gather: Callable[[Tensor, Tensor], Tensor]) -> None:
    """Point ``optimizers`` at the whole parameters (``whole``: id of a piece -> its whole parameter), their state
    made whole by ``gather(piece, value)`` for every state tensor of the piece's shape (a collective: every rank of
    the tensor group calls it in the same order)."""
    for optimizer in optimizers:
        for param_group in optimizer.param_groups:
            for i, p in enumerate(param_group["params"]):
                target = whole.get(id(p))
                if target is None:
                    continue
                state = optimizer.state.pop(p, None)
                if state:
                    optimizer.state[target] = {k: gather(p, v) if isinstance(v, Tensor) and v.shape == p.shape else v
                                               for k, v in state.items()}
                param_group["params"][i] = target


def _detail(style: ParallelStyle, module: nn.Module, t: int, seq_dim: Optional[int]) -> str:
    if isinstance(style, RowwiseParallel):
        return "rowwise, " + ("all-reduce" if seq_dim is None else f"reduce-scatter along dim {seq_dim}")
    if isinstance(style, VocabParallel):
        n = module.num_embeddings if isinstance(module, nn.Embedding) else module.out_features
        padded = -(-n // t) * t
        kind = "embedding" if isinstance(module, nn.Embedding) else "output"
        pad = f", padded to {padded}" if padded != n else ""
        return f"vocab {kind}, {n} rows{pad}, {padded // t} per rank"
    if isinstance(style, ParallelAttention):
        return f"mha, {module.num_heads} heads, {module.num_heads // t} per rank"
    if isinstance(style, SequenceParallelRegion):
        return f"sequence region over {len(module)} blocks" + (f", split along dim {seq_dim}" if seq_dim is not None else "")
    return style.describe()


def _install_block_hooks(module: nn.Module, tg: TensorGroup, op: Optional[InputOp], seq_dim: Optional[int]) -> list:
    first = _first_parameter(module)

    def pre(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if op is not None:
            op.clear()
        if seq_dim is not None:
            # The gathered input feeds only the block's column layers, which compute in the autocast dtype: gather
            # it in that dtype (half the bytes of an fp32 norm output under bf16-mixed).
            args, kwargs = _map_hidden(args, kwargs,
                                       lambda x: all_gather_along_dim(to_compute_dtype(x), seq_dim, tg.group,
                                                                      chunks=tg.token_chunks), first)
        return args, kwargs

    def post(mod: nn.Module, args: tuple, output: Any) -> None:
        if op is not None:
            op.clear()  # do not keep the block's input alive past its forward

    return [module.register_forward_pre_hook(pre, with_kwargs=True), module.register_forward_hook(post)]


def _install_region_hooks(region: nn.Module, name: str, tg: TensorGroup, seq_dim: int) -> list:
    first, last = region[0], region[len(region) - 1]
    first_param = _first_parameter(first)

    def split(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return _map_hidden(args, kwargs, lambda x: _split_sequence(x, seq_dim, tg, name), first_param)

    def gather(mod: nn.Module, args: tuple, output: Any) -> Any:
        return _first_output(output, lambda y: gather_along_dim(y, seq_dim, tg.group, chunks=tg.token_chunks))

    return [first.register_forward_pre_hook(split, with_kwargs=True), last.register_forward_hook(gather)]


def sharded_parameter_bytes(module: nn.Module) -> tuple[int, int]:
    """(bytes this rank holds of the sharded parameters, bytes of the same parameters unsharded)."""
    local = full = 0
    for p in module.parameters():
        spec = shard_spec(p)
        if spec is not None:
            local += p.numel() * p.element_size()
            full += torch.Size(spec.full_shape(p.shape)).numel() * p.element_size()
    return local, full
