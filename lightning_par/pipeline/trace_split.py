"""Split a module into pipeline parts by tracing its forward with ``torch.fx``, for modules without a blocks container.

[Note: splitting by tracing the forward]
``torch.fx.symbolic_trace`` turns the module's forward into a graph of nodes in execution order: the forward's
inputs (placeholders), parameter reads (get_attr), calls of ``torch.nn`` layers (call_module), of functions and of
methods, and the output. A cut between two nodes splits the graph; the values *crossing* it are those computed
before it and used after it — a skip connection over the cut crosses it too, and a value that goes over a whole part
is received and sent on by that part. Each local part becomes a GraphModule whose inputs are the forward's own
inputs (every rank of the pipeline has the microbatch, so they are not sent) and the values crossing the cut before
it, and whose output is the values crossing the cut after it (the last part returns the forward's output). These
values are exactly what the executor sends. Parameters and buffers live on the parts that read them; one read by
two parts (a tied embedding) is held by both and its gradients are summed after backward, as with the blocks split;
those the forward does not read (a loss module's) stay on every rank. The others are unregistered on this rank, so
the optimizer, the state dict and the memory hold only the local ones, under their original names.

Where the cuts go: every node that first reads parameters weighs their count; the cuts are balanced over these
nodes (:func:`~lightning_par.pipeline.partition.balance`) and, between two of them, placed where the fewest values
cross (the latest such place: an activation stays with the layer before it). Or at ``split_points``: names of
modules, part k + 1 starting at the first node inside the k-th one.

On every rank the user's step runs unchanged, as with the blocks split: the module's ``forward`` is replaced by one
that runs the part being computed and, unless it is the last, stops the step by raising
:class:`~lightning_par.pipeline.partition.StageExit` with the crossing values. What tracing fixes at trace time
stays fixed: Python values the forward reads (``self.training``, sizes from the config) are constants in the graph.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import fx, nn

from lightning_par.pipeline.partition import PartitionError, StageExit, balance

__all__ = ["TracePartition", "trace_forward"]

# Nodes whose value is a Python number or size, not a tensor: a cut avoids sending them when it can.
_SIZE_METHODS = {"size", "dim", "numel", "item", "tolist", "stride"}


def trace_forward(module: nn.Module) -> fx.Graph:
    """The forward of ``module`` as an fx graph; a :class:`PartitionError` that says what to do when it cannot be
    traced."""
    try:
        return fx.Tracer().trace(module)
    except Exception as error:  # noqa: BLE001 (fx raises TraceError, TypeError, AttributeError, ...)
        hf = _hugging_face_blocks(module)
        if hf is not None:
            raise PartitionError(
                f"Cannot split {type(module).__name__} into pipeline stages by tracing: it holds a Hugging Face "
                f"model ({hf[0]}), whose forward torch.fx cannot trace ({type(error).__name__}: {error}). Split it "
                f"by its layers instead: split='blocks' (the default split='auto' does), blocks='{hf[1]}'. "
                "See docs/huggingface.md."
            ) from error
        raise PartitionError(
            f"Cannot split {type(module).__name__} into pipeline stages by tracing its forward with torch.fx "
            f"({type(error).__name__}: {error}). Tracing fails on Python control flow that depends on tensor values "
            "or sizes (`if x.sum() > 0`, `if T > self.block_size`). Either keep the repeated layers in one "
            "nn.ModuleList / nn.Sequential and split by it (split='blocks', with split_points=[...] to place the "
            "cuts), or move that control flow out of forward (e.g. into training_step)."
        ) from error


def _hugging_face_blocks(module: nn.Module) -> Optional[tuple[str, str]]:
    """(class name, path of its largest layer list) of the first ``transformers`` model inside ``module``, if any."""
    for name, sub in module.named_modules():
        if any(c.__module__.startswith("transformers.") and c.__name__ == "PreTrainedModel"
               for c in type(sub).__mro__):
            lists = [(n, m) for n, m in sub.named_modules() if isinstance(m, (nn.ModuleList, nn.Sequential)) and n]
            if not lists:
                return None
            path = max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))[0]
            return type(sub).__name__, f"{name}.{path}" if name else path
    return None


class TracePartition:
    """This rank's share of ``module`` split into ``num_parts`` parts by tracing (see [Note: splitting by tracing
    the forward]); ``parts`` are the parts it computes. Applied in place, like
    :class:`~lightning_par.pipeline.partition.Partition`, with the same interface for the strategy."""

    def __init__(self, module: nn.Module, num_parts: int, parts: Sequence[int],
                 split_points: Optional[Sequence[str]] = None) -> None:
        self.module = module
        self.num_parts = num_parts
        self.parts = tuple(sorted(set(parts)))
        graph = trace_forward(module)
        self._signature = inspect.signature(module.forward)
        nodes = list(graph.nodes)
        self._nodes = nodes
        index = {n: i for i, n in enumerate(nodes)}
        values = [n for n in nodes if n.op not in ("placeholder", "get_attr", "output")]
        self._last_use = {n: max((index[u] for u in n.users), default=index[n]) for n in values}
        tensors = self._tensors_read(nodes)
        starts = (self._cuts_at(split_points, nodes) if split_points is not None
                  else self._balanced_cuts(nodes, values, tensors))
        self.starts = starts
        ends = (*starts[1:], len(nodes))
        self._crossing = [self._live(c) for c in (*starts, len(nodes))]  # [k]: values entering part k
        # Which parts read each parameter / buffer (by identity: aliases of a tied weight share the answer).
        holders: dict[int, set[int]] = {}
        for k, (a, b) in enumerate(zip(starts, ends)):
            for n in nodes[a:b]:
                for t in tensors.get(n, ()):
                    holders.setdefault(id(t), set()).add(k)
        everywhere = frozenset(range(num_parts))
        self._owner_parts: dict[str, frozenset[int]] = {}
        for name, t in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
            self._owner_parts[name] = frozenset(holders[id(t)]) if id(t) in holders else everywhere
        self._graphs = {k: self._part_module(graph, k, starts[k], ends[k]) for k in self.parts}
        self._drop_others()
        self._active: Optional[tuple[int, Any]] = None
        module.forward = self._forward  # an instance attribute shadows the class's forward

    # ----- where the cuts go ----------------------------------------------------------------------------------------

    def _tensors_read(self, nodes: list[fx.Node]) -> dict[fx.Node, list[torch.Tensor]]:
        """The parameters and buffers each node reads: a layer's own, or those of get_attr nodes among its inputs."""
        out: dict[fx.Node, list[torch.Tensor]] = {}
        for n in nodes:
            found: list[torch.Tensor] = []
            if n.op == "call_module":
                sub = self.module.get_submodule(n.target)
                found += [*sub.parameters(), *sub.buffers()]
            for arg in n.all_input_nodes:
                if arg.op == "get_attr":
                    attr = _fetch(self.module, arg.target)
                    found += [*attr.parameters(), *attr.buffers()] if isinstance(attr, nn.Module) else (
                        [attr] if isinstance(attr, torch.Tensor) else [])
            if found:
                out[n] = found
        return out

    def _live(self, cut: int) -> list[fx.Node]:
        """The values crossing a cut before node ``cut``, in graph order."""
        return [n for n in self._nodes[:cut] if n in self._last_use and self._last_use[n] >= cut]

    def _balanced_cuts(self, nodes: list[fx.Node], values: list[fx.Node],
                       tensors: dict[fx.Node, list[torch.Tensor]]) -> tuple[int, ...]:
        index = {n: i for i, n in enumerate(nodes)}
        seen: set[int] = set()
        units, weights = [], []
        for n in values:
            fresh = [t for t in tensors.get(n, ()) if id(t) not in seen]
            seen.update(id(t) for t in fresh)
            if fresh:
                units.append(index[n])
                weights.append(float(sum(t.numel() for t in fresh)))
        if len(units) < self.num_parts:
            raise PartitionError(
                f"Cannot split {type(self.module).__name__} into {self.num_parts} pipeline parts by tracing: its forward "
                f"reads parameters at only {len(units)} places, and every part needs at least one. Use at most "
                f"{len(units)} stages (or stages x chunks <= {len(units)})."
            )
        first_units = balance(weights, self.num_parts)
        cuts = [0]
        for u in first_units[1:]:
            # Anywhere after the previous weighted node and up to this one: fewest (then fewest non-tensor)
            # values crossing, the latest of those.
            candidates = range(units[u - 1] + 1, units[u] + 1)
            cuts.append(min(candidates, key=lambda c: (_maybe_not_tensor(self._live(c)), len(self._live(c)), -c)))
        return tuple(cuts)

    def _cuts_at(self, names: Sequence[str], nodes: list[fx.Node]) -> tuple[int, ...]:
        if len(names) != self.num_parts - 1:
            raise PartitionError(f"split_points={list(names)} must name the {self.num_parts - 1} modules where parts "
                                 f"1..{self.num_parts - 1} start (the model is split into {self.num_parts} parts).")
        cuts = [0]
        for name in names:
            first = next((i for i, n in enumerate(nodes) if n.op not in ("placeholder", "get_attr", "output")
                          and _inside(n, str(name))), None)
            if first is None:
                raise PartitionError(f"split_points: no call of a module named {name!r} in the traced forward of "
                                     f"{type(self.module).__name__} (names are dotted paths, e.g. 'model.l4').")
            if first <= cuts[-1]:
                raise PartitionError(f"split_points={list(names)}: {name!r} is not called after the previous split "
                                     "point; name modules in the order forward calls them.")
            cuts.append(first)
        return tuple(cuts)

    # ----- the parts ------------------------------------------------------------------------------------------------

    def _part_module(self, graph: fx.Graph, k: int, a: int, b: int) -> fx.GraphModule:
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for n in self._nodes:
            if n.op == "placeholder":
                env[n] = g.node_copy(n)
        for n in self._crossing[k]:
            env[n] = g.placeholder(f"received_{n.name}")

        def lookup(n: fx.Node) -> fx.Node:
            if n not in env and n.op == "get_attr":  # parameters are read where they are used
                env[n] = g.get_attr(n.target)
            return env[n]

        for n in self._nodes[a:b]:
            if n.op == "output":
                g.node_copy(n, lookup)
            elif n.op not in ("placeholder", "get_attr"):
                env[n] = g.node_copy(n, lookup)
        if k < self.num_parts - 1:
            g.output(tuple(env[n] for n in self._crossing[k + 1]))
        g.lint()
        return fx.GraphModule(self.module, g, class_name=f"{type(self.module).__name__}Part{k}")

    def _drop_others(self) -> None:
        """Unregister the parameters and buffers no local part holds (their memory is freed on this rank)."""
        local = set(self.parts)
        for kind, named in (("parameter", self.module.named_parameters(remove_duplicate=False)),
                            ("buffer", self.module.named_buffers(remove_duplicate=False))):
            for name, _ in list(named):
                if not self._owner_parts[name] & local:
                    owner_name, _, leaf = name.rpartition(".")
                    owner = self.module.get_submodule(owner_name)
                    (owner._parameters if kind == "parameter" else owner._buffers)[leaf] = None

    def parts_holding(self, name: str) -> frozenset[int]:
        return self._owner_parts[name]

    def crossing(self, part: int) -> list[str]:
        """Names of the graph values that part ``part`` receives (empty for part 0)."""
        return [n.name for n in self._crossing[part]]

    @contextmanager
    def stage(self, part: int, received: Any = None) -> Iterator[None]:
        """Make the module's forward compute ``part`` on ``received`` (the crossing values of the cut before it)."""
        if part not in self.parts:
            raise ValueError(f"part {part} is not on this rank (it holds {self.parts})")
        self._active = (part, received)
        try:
            yield
        finally:
            self._active = None

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._active is None:
            raise RuntimeError(f"{type(self.module).__name__} is split into pipeline stages (traced); it runs through "
                               "the pipeline strategy's training/validation/test/predict steps, not called directly.")
        part, received = self._active
        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        if part == 0:
            received = ()
        elif not isinstance(received, tuple):
            received = (received,)
        out = self._graphs[part](*bound.arguments.values(), *received)
        if part == self.num_parts - 1:
            return out
        for node, value in zip(self._crossing[part + 1], out):
            if not isinstance(value, torch.Tensor):
                raise PartitionError(
                    f"The value {node.name!r} crossing the cut after pipeline part {part} is a {type(value).__name__}; "
                    "only tensors travel between stages. Place the cuts elsewhere with split_points=['module.name', "
                    "...], or compute that value from the inputs inside the module that uses it."
                )
        raise StageExit(tuple(out))


def _fetch(module: nn.Module, target: str) -> Any:
    obj: Any = module
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def _inside(node: fx.Node, name: str) -> bool:
    if node.op == "call_module" and (node.target == name or str(node.target).startswith(name + ".")):
        return True
    stack = node.meta.get("nn_module_stack", {})
    return any(path == name or str(path).startswith(name + ".")
               for path, _ in stack.values()) if isinstance(stack, dict) else False


def _maybe_not_tensor(nodes: list[fx.Node]) -> int:
    """How many of ``nodes`` may be Python numbers or sizes rather than tensors (a static guess)."""
    def sizes(n: fx.Node) -> bool:
        if n.op == "call_method" and n.target in _SIZE_METHODS:
            return True
        if n.op == "call_function" and n.target is getattr:
            return True
        return n.op == "call_function" and bool(n.all_input_nodes) and all(
            sizes(a) for a in n.all_input_nodes) and "torch" not in getattr(n.target, "__module__", "")
    return sum(sizes(n) for n in nodes)
