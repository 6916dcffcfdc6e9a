"""Split a standard module into pipeline parts by its sequence of blocks, without rewriting its code.

[Note: how a module is split without being rewritten]
The module must hold its layers in one ``nn.ModuleList`` / ``nn.Sequential`` (the *blocks*, e.g. ``model.blocks``)
inside a *root* module (e.g. ``model``) whose forward runs some children before the blocks (embeddings), passes the
hidden state through every block in order, and runs other children after them (final norm, head). The children
registered before the blocks belong to part 0, those registered after to the last part, and each block to the part
its index falls in. Anything else (parameters of the root itself, modules outside the root such as a loss module)
is kept on every rank.

On every rank the user's own code runs — ``training_step`` calls ``forward``, which runs the root's forward — with
the root rearranged for the part being computed (:meth:`Partition.stage`):

- the blocks container yields, instead of all blocks, an *inject* callable that returns the activation received
  from the previous part (unless this is part 0), then this part's blocks, then a *capture* callable that stops the
  forward by raising :class:`StageExit` with the hidden state (unless this is the last part). Iterating, slicing
  over all blocks (``self.layers[: config.num_hidden_layers]``, as Hugging Face models do), ``len`` and indexing
  (``for i in range(len(self.h)): self.h[i](x)``) see this sequence;
- the children before / after the blocks that another part owns are *ghosts*: modules without parameters that
  return zeros of the right shape and dtype (computed on the meta device, free), so the code before the blocks runs
  unchanged and its result is ignored by *inject*. Children without parameters (rotary position embeddings,
  dropout) are not ghosts: they run on every rank (their buffers are on every rank too).

So the last part's ``training_step`` returns the real loss, computed by the user's code from the real output, while
earlier parts stop at *capture*. The contract, checked where it can be: every block takes the hidden state as its
first argument and returns the new hidden state (a tensor or a tuple of tensors); nothing computed before the blocks
is used after them; the code indexes the blocks container only as the sequence it iterates (not to reach block k).
Parameter and buffer names do not change (kept blocks keep their index), so state dicts of the parts add up to the
full model's.

[Note: what crosses a stage boundary]
Besides the hidden state, the other tensors the model passes to the blocks cross too: the tensors among the
positional and keyword arguments of the call where *capture* stops (position embeddings (cos, sin), attention
masks, position ids), found in tuples, lists and dicts; other values (``None``, flags, a cache object) do not cross.
They go as one flat tuple after the hidden state's tensors. The receiving part runs the same code, so it makes the
same call to *inject* with its own copies of these values: their structure tells how to unflatten the tuple, and
each received tensor replaces, in every call of a block of this part (and at *capture*), the local tensor at its
place — the same object, so a model that passes different masks to different layers keeps the others. So values
computed on part 0 from its weights (a learned position embedding passed to every block) are the real ones on
every part, and their gradients flow back through the executor like the hidden state's.
"""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map

__all__ = ["BlockLayout", "StageExit", "PartitionError", "find_blocks", "balance", "choose_split_points",
           "measure_block_times", "Partition"]


class PartitionError(ValueError):
    """The module cannot be split as asked."""


class StageExit(BaseException):
    """Raised by *capture* to stop a part's forward; a BaseException so that ``except Exception`` lets it pass."""

    def __init__(self, output: Any) -> None:
        super().__init__()
        self.output = output


@dataclass(frozen=True)
class BlockLayout:
    """Where the blocks are: ``root`` (dotted path, "" for the module itself) holds them as child ``blocks``."""

    root: str
    blocks: str
    before: tuple[str, ...]
    after: tuple[str, ...]

    @property
    def blocks_path(self) -> str:
        return f"{self.root}.{self.blocks}" if self.root else self.blocks


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _has_parameters(module: nn.Module) -> bool:
    return next(iter(module.parameters()), None) is not None


def _tensor_leaves(value: Any) -> list[torch.Tensor]:
    """The tensors in ``value``, looking into tuples, lists and dicts (not into other objects), each object once."""
    found: dict[int, torch.Tensor] = {}

    def visit(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            found.setdefault(id(v), v)
        elif type(v) in (tuple, list) or (isinstance(v, tuple) and hasattr(v, "_fields")):
            for item in v:
                visit(item)
        elif type(v) is dict:
            for item in v.values():
                visit(item)

    visit(value)
    return list(found.values())


def _replace_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``value`` rebuilt with every tensor ``t`` found as :func:`_tensor_leaves` finds them replaced by ``fn(t)``."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_replace_tensors(v, fn) for v in value))
    if type(value) in (tuple, list):
        return type(value)(_replace_tensors(v, fn) for v in value)
    if type(value) is dict:
        return {k: _replace_tensors(v, fn) for k, v in value.items()}
    return value


def _meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` on the meta device (no memory), for shapes and attributes."""
    memo = {id(t): (nn.Parameter(torch.empty_like(t, device="meta"), t.requires_grad)
                    if isinstance(t, nn.Parameter) else torch.empty_like(t, device="meta"))
            for t in [*module.parameters(), *module.buffers()]}
    return copy.deepcopy(module, memo)


def find_blocks(module: nn.Module, path: Optional[str] = None) -> BlockLayout:
    """The block layout of ``module``: the ``nn.ModuleList`` / ``nn.Sequential`` at ``path`` (e.g.
    ``"model.blocks"``), or else the one holding the most parameters."""
    if path is None:
        containers = [(name, m) for name, m in module.named_modules()
                      if isinstance(m, (nn.ModuleList, nn.Sequential)) and name and len(m) > 0]
        if not containers:
            raise PartitionError(
                f"{type(module).__name__} has no nn.ModuleList or nn.Sequential of layers to split into pipeline "
                "stages. Keep the repeated layers in one (e.g. `self.blocks = nn.ModuleList(...)`), or name it with "
                "`blocks='path.to.blocks'`."
            )
        path = max(containers, key=lambda item: _numel(item[1]))[0]  # max keeps the first of equals
    try:
        container = module.get_submodule(path)
    except AttributeError as error:
        raise PartitionError(f"blocks={path!r}: {type(module).__name__} has no submodule {path!r}.") from error
    if not isinstance(container, (nn.ModuleList, nn.Sequential)):
        raise PartitionError(f"blocks={path!r} is a {type(container).__name__}; it must be an nn.ModuleList or "
                             "nn.Sequential of layers applied in order.")
    root, _, name = path.rpartition(".")
    children = [child for child, _ in module.get_submodule(root).named_children()]
    i = children.index(name)
    return BlockLayout(root, name, tuple(children[:i]), tuple(children[i + 1:]))


def balance(weights: Sequence[float], parts: int, first: float = 0.0, last: float = 0.0) -> tuple[int, ...]:
    """Cut ``weights`` (one per block) into ``parts`` contiguous non-empty runs minimising the heaviest run, where
    part 0 also carries ``first`` and the last part ``last``. Returns the block index each part starts at."""
    n = len(weights)
    if parts > n:
        raise PartitionError(f"Cannot split {n} blocks into {parts} pipeline parts: every part needs at least one "
                             f"block. Use at most {n} stages (or stages x chunks <= {n}), or a model with more layers.")
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + w)

    def cost(i: int, j: int, k: int) -> float:  # blocks i..j-1 as part k
        return prefix[j] - prefix[i] + (first if k == 0 else 0.0) + (last if k == parts - 1 else 0.0)

    # best[k][j]: lightest heaviest-run for blocks 0..j-1 cut into k+1 parts; ties go to the earliest cut.
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(parts)]
    cut = [[0] * (n + 1) for _ in range(parts)]
    for j in range(1, n + 1):
        best[0][j] = cost(0, j, 0)
    for k in range(1, parts):
        for j in range(k + 1, n + 1):
            for i in range(k, j):
                value = max(best[k - 1][i], cost(i, j, k))
                if value < best[k][j] - 1e-12:
                    best[k][j], cut[k][j] = value, i
    starts, j = [], n
    for k in range(parts - 1, 0, -1):
        j = cut[k][j]
        starts.append(j)
    return (0, *reversed(starts))


def choose_split_points(module: nn.Module, layout: BlockLayout, parts: int, split_points: Optional[Sequence[int]] = None,
                        block_times: Optional[Sequence[float]] = None) -> tuple[int, ...]:
    """The block index each part starts at: the user's ``split_points`` (where parts 1..P-1 start), else balanced
    by ``block_times`` if given, else by parameter count (embedding counted with part 0, head with the last)."""
    blocks = module.get_submodule(layout.blocks_path)
    n = len(blocks)
    if split_points is not None:
        points = tuple(int(x) for x in split_points)
        if len(points) != parts - 1 or list(points) != sorted(set(points)) or (points and not 0 < points[0]) or (
                points and points[-1] >= n):
            raise PartitionError(
                f"split_points={list(split_points)} must name where parts 1..{parts - 1} start: {parts - 1} "
                f"increasing block indices between 1 and {n - 1} ({layout.blocks_path} has {n} blocks)."
            )
        if parts > n:
            balance([1.0] * n, parts)  # raises the error that says so
        return (0, *points)
    if block_times is not None:
        if len(block_times) != n:
            raise PartitionError(f"block_times has {len(block_times)} entries for {n} blocks.")
        return balance(list(block_times), parts)
    root = module.get_submodule(layout.root)
    first = sum(_numel(root.get_submodule(name)) for name in layout.before)
    last = sum(_numel(root.get_submodule(name)) for name in layout.after)
    return balance([float(_numel(b)) for b in blocks], parts, first, last)


def measure_block_times(module: nn.Module, layout: BlockLayout, run: Callable[[], torch.Tensor],
                        repeats: int = 3) -> list[float]:
    """Seconds of forward + backward of each block, from ``run()`` (a forward returning a tensor), median of
    ``repeats`` after one warm-up."""
    blocks = list(module.get_submodule(layout.blocks_path))
    samples: list[list[float]] = [[] for _ in blocks]
    marks: dict[tuple[str, int], float] = {}
    handles = []
    for i, block in enumerate(blocks):
        handles += [
            block.register_forward_pre_hook(lambda m, a, i=i: marks.__setitem__(("f", i), time.perf_counter())),
            block.register_forward_hook(
                lambda m, a, o, i=i: marks.__setitem__(("fd", i), time.perf_counter() - marks[("f", i)])),
            block.register_full_backward_pre_hook(lambda m, g, i=i: marks.__setitem__(("b", i), time.perf_counter())),
            block.register_full_backward_hook(
                lambda m, gi, go, i=i: marks.__setitem__(("bd", i), time.perf_counter() - marks[("b", i)])),
        ]
    try:
        for rep in range(repeats + 1):
            marks.clear()
            out = run()
            out.float().sum().backward()
            module.zero_grad(set_to_none=True)
            if rep:
                for i in range(len(blocks)):
                    samples[i].append(marks.get(("fd", i), 0.0) + marks.get(("bd", i), 0.0))
    finally:
        for handle in handles:
            handle.remove()
    return [sorted(s)[len(s) // 2] for s in samples]


class _Ghost(nn.Module):
    """Stands in for a child another part owns: no parameters, returns zeros shaped like the real output."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        # A meta copy (no memory) computes output shapes; kept out of the module tree (no state, no .to()).
        object.__setattr__(self, "_meta", _meta_copy(module))
        self.original_type = type(module).__name__

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        device = tensors[0].device if tensors else torch.device("cpu")
        to_meta = lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t  # noqa: E731
        meta_args, meta_kwargs = tree_map(to_meta, (args, kwargs))
        with torch.no_grad():
            out = self._meta(*meta_args, **meta_kwargs)
        return tree_map(lambda t: torch.zeros((), dtype=t.dtype, device=device).expand(t.shape)
                        if isinstance(t, torch.Tensor) else t, out)

    def extra_repr(self) -> str:
        return f"ghost of {self.original_type}"


class _Boundary:
    """*inject* or *capture*: a callable in the blocks sequence whose attributes are those of the first block after
    the boundary (a model may read e.g. ``layer.attention_type`` to choose the mask it passes), the same block on
    both sides of it."""

    def __init__(self, fn: Callable[..., Any], block: nn.Module) -> None:
        self._fn = fn
        self._block = block

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_block"], name)


class _StageBlocks(nn.Module):
    """Replaces the blocks container: holds this rank's blocks under their original indices (names unchanged) and,
    inside :meth:`Partition.stage`, yields inject, the part's blocks and capture."""

    def __init__(self, blocks: dict[int, nn.Module], path: str, num_blocks: int) -> None:
        super().__init__()
        for index, block in blocks.items():
            self.add_module(str(index), block)
        self._run: Optional[list[Callable]] = None
        self._path = path
        self._num_blocks = num_blocks

    def _sequence(self) -> list[Callable]:
        if self._run is None:
            raise RuntimeError(
                f"This model is split into pipeline stages ({self._path} holds only this rank's blocks); it runs "
                "through the pipeline strategy's training/validation/test/predict steps, not called directly."
            )
        return self._run

    def __iter__(self) -> Iterator[Callable]:
        return iter(self._sequence())

    def __len__(self) -> int:
        return len(self._sequence())

    def __getitem__(self, index: Any) -> Any:
        n = self._num_blocks
        if isinstance(index, slice):
            # A slice over every block (Hugging Face: `self.layers[: config.num_hidden_layers]`) is the sequence.
            if range(n)[index] != range(n):
                raise RuntimeError(
                    f"{self._path}[{index.start}:{index.stop}:{index.step}]: a pipeline stage runs a contiguous run "
                    f"of the {n} blocks; only a slice over all of them (e.g. [:{n}]) can be iterated on a stage.")
            return list(self._sequence())
        if self._run is None:
            raise RuntimeError(f"{self._path}[{index!r}]: a pipeline stage holds only some blocks; iterate over the "
                               "blocks instead of indexing them.")
        # Inside a stage the container is the list it iterates as: `for i in range(len(h)): h[i](x)` works too.
        return self._run[index]

    def forward(self, x: Any) -> Any:  # the nn.Sequential way: self.blocks(x)
        for fn in self._sequence():
            x = fn(x)
        return x


class Partition:
    """This rank's share of a module split into ``len(starts)`` parts; ``parts`` are the parts it computes.

    Applied in place (non-local blocks and children are dropped, so their memory is freed). Holds the global
    picture too, which every rank computes alike: which ranks hold each parameter (:meth:`holders`).
    """

    def __init__(self, module: nn.Module, layout: BlockLayout, starts: tuple[int, ...], parts: Sequence[int]) -> None:
        self.module = module
        self.layout = layout
        self.starts = starts
        self.num_parts = len(starts)
        self.parts = tuple(sorted(set(parts)))
        self.root = module.get_submodule(layout.root)
        blocks = self.root.get_submodule(layout.blocks)
        self.num_blocks = len(blocks)
        if self.num_parts > self.num_blocks:
            balance([1.0] * self.num_blocks, self.num_parts)  # raises with the explanation
        self._part_of = self._block_parts(starts, self.num_blocks)
        # Children without parameters (rotary embeddings, dropout) run on every rank: see the note above.
        self.everywhere = frozenset(name for name in (*layout.before, *layout.after)
                                    if not _has_parameters(self.root.get_submodule(name)))
        self._owner_parts = self._parts_of_names(module)
        self.real: dict[str, nn.Module] = {}
        self.ghosts: dict[str, _Ghost] = {}
        for name in (*layout.before, *layout.after):
            if name in self.everywhere:
                continue
            child = self.root.get_submodule(name)
            self.ghosts[name] = _Ghost(child)
            owner = 0 if name in layout.before else self.num_parts - 1
            if owner in self.parts:
                self.real[name] = child
            else:
                setattr(self.root, name, self.ghosts[name])
        kept = {i: b for i, b in enumerate(blocks) if self._part_of[i] in self.parts}
        # For capture's attributes: the first block of the next part (a meta copy when another rank holds it).
        self._after_boundary: dict[int, nn.Module] = {}
        for part in self.parts:
            if part < self.num_parts - 1:
                i = self.starts[part + 1]
                self._after_boundary[part] = kept[i] if i in kept else _meta_copy(blocks[i])
        self.blocks = _StageBlocks(kept, layout.blocks_path, self.num_blocks)
        setattr(self.root, layout.blocks, self.blocks)

    @staticmethod
    def _block_parts(starts: tuple[int, ...], n: int) -> list[int]:
        ends = (*starts[1:], n)
        return [k for k, (a, b) in enumerate(zip(starts, ends)) for _ in range(a, b)]

    def _parts_of_names(self, module: nn.Module) -> dict[str, frozenset[int]]:
        """Every parameter/buffer name of the full module -> the parts that hold it."""
        everywhere = frozenset(range(self.num_parts))
        prefix = f"{self.layout.root}." if self.layout.root else ""
        owner: dict[str, frozenset[int]] = {}
        names = [n for n, _ in module.named_parameters(remove_duplicate=False)]
        names += [n for n, _ in module.named_buffers(remove_duplicate=False)]
        for name in names:
            local = name[len(prefix):] if name.startswith(prefix) else None
            parts = everywhere
            if local is not None:
                head, _, rest = local.partition(".")
                if head == self.layout.blocks:
                    parts = frozenset({self._part_of[int(rest.partition(".")[0])]})
                elif head in self.everywhere:
                    parts = everywhere
                elif head in self.layout.before:
                    parts = frozenset({0})
                elif head in self.layout.after:
                    parts = frozenset({self.num_parts - 1})
            owner[name] = parts
        return owner

    def parts_holding(self, name: str) -> frozenset[int]:
        return self._owner_parts[name]

    def block_range(self, part: int) -> range:
        ends = (*self.starts[1:], self.num_blocks)
        return range(self.starts[part], ends[part])

    @contextmanager
    def stage(self, part: int, received: Any = None) -> Iterator[None]:
        """Arrange the root to compute ``part``: inject ``received`` (unless part 0), stop at capture (unless last).

        See [Note: what crosses a stage boundary] for the values besides the hidden state."""
        if part not in self.parts:
            raise ValueError(f"part {part} is not on this rank (it holds {self.parts})")
        first, last = part == 0, part == self.num_parts - 1
        substitutes: dict[int, Any] = {}  # id(local tensor) -> the one received in its place
        kept_alive: list[torch.Tensor] = []  # the local tensors, so that their ids stay theirs

        def substitute(value: Any) -> Any:
            return _replace_tensors(value, lambda t: substitutes.get(id(t), t)) if substitutes else value

        def inject(x: Any, *args: Any, **kwargs: Any) -> Any:
            extras = _tensor_leaves((args, kwargs))
            if not extras:
                return received
            got = [received] if isinstance(received, torch.Tensor) else list(received)
            hidden = _tensor_leaves(x)
            if len(got) != len(hidden) + len(extras):
                raise PartitionError(
                    f"Pipeline part {part} received {len(got)} tensors from part {part - 1} but its first block "
                    f"{self.layout.blocks_path}[{self.starts[part]}] is called with {len(hidden)} hidden-state tensors "
                    f"and {len(extras)} other tensor arguments. Every part must call the blocks with the same kinds "
                    "of arguments (they may depend on the model's inputs, not on which part runs).")
            kept_alive.extend(extras)
            substitutes.update({id(t): r for t, r in zip(extras, got[len(hidden):])})
            values = iter(got[: len(hidden)])
            return _replace_tensors(x, lambda t: next(values))

        def capture(x: Any, *args: Any, **kwargs: Any) -> Any:
            extras = _tensor_leaves(substitute((args, kwargs)))
            raise StageExit((*_tensor_leaves(x), *extras) if extras else x)

        def arguments(block: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple[tuple, dict]]:
            return (args[:1] + substitute(args[1:]), substitute(kwargs)) if substitutes else None

        local = [self.blocks.get_submodule(str(i)) for i in self.block_range(part)]
        sequence: list[Callable] = [] if first else [_Boundary(inject, local[0])]
        sequence += local
        sequence += [] if last else [_Boundary(capture, self._after_boundary[part])]
        swapped = {}
        for name, real in self.real.items():
            wanted = (name in self.layout.before and first) or (name in self.layout.after and last)
            if not wanted:
                swapped[name] = real
                setattr(self.root, name, self.ghosts[name])
        hooks = [] if first else [b.register_forward_pre_hook(arguments, with_kwargs=True) for b in local]
        self.blocks._run = sequence
        try:
            yield
        finally:
            self.blocks._run = None
            for hook in hooks:
                hook.remove()
            for name, real in swapped.items():
                setattr(self.root, name, real)
