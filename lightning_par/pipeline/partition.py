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
  forward by raising :class:`StageExit` with the hidden state (unless this is the last part);
- the children before / after the blocks that another part owns are *ghosts*: modules without parameters that
  return zeros of the right shape and dtype (computed on the meta device, free), so the code before the blocks runs
  unchanged and its result is ignored by *inject*.

So the last part's ``training_step`` returns the real loss, computed by the user's code from the real output, while
earlier parts stop at *capture*. The contract, checked where it can be: every block takes the hidden state as its
first argument and returns the new hidden state (a tensor or a tuple of tensors); other block arguments may only
depend on the model's inputs (every rank sees the real microbatch); nothing computed before the blocks is used
after them; the code does not index the blocks container. Parameter and buffer names do not change (kept blocks
keep their index), so state dicts of the parts add up to the full model's.
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
        memo = {id(t): (nn.Parameter(torch.empty_like(t, device="meta"), t.requires_grad)
                        if isinstance(t, nn.Parameter) else torch.empty_like(t, device="meta"))
                for t in [*module.parameters(), *module.buffers()]}
        object.__setattr__(self, "_meta", copy.deepcopy(module, memo))
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


class _StageBlocks(nn.Module):
    """Replaces the blocks container: holds this rank's blocks under their original indices (names unchanged) and,
    inside :meth:`Partition.stage`, yields inject, the part's blocks and capture."""

    def __init__(self, blocks: dict[int, nn.Module], path: str) -> None:
        super().__init__()
        for index, block in blocks.items():
            self.add_module(str(index), block)
        self._run: Optional[list[Callable]] = None
        self._path = path

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
        raise RuntimeError(f"{self._path}[{index!r}]: a pipeline stage holds only some blocks; iterate over the "
                           "blocks instead of indexing them.")

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
        self._owner_parts = self._parts_of_names(module)
        self.real: dict[str, nn.Module] = {}
        self.ghosts: dict[str, _Ghost] = {}
        for name in (*layout.before, *layout.after):
            child = self.root.get_submodule(name)
            self.ghosts[name] = _Ghost(child)
            owner = 0 if name in layout.before else self.num_parts - 1
            if owner in self.parts:
                self.real[name] = child
            else:
                setattr(self.root, name, self.ghosts[name])
        kept = {i: b for i, b in enumerate(blocks) if self._part_of[i] in self.parts}
        self.blocks = _StageBlocks(kept, layout.blocks_path)
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
        """Arrange the root to compute ``part``: inject ``received`` (unless part 0), stop at capture (unless last)."""
        if part not in self.parts:
            raise ValueError(f"part {part} is not on this rank (it holds {self.parts})")
        first, last = part == 0, part == self.num_parts - 1

        def inject(x: Any, *args: Any, **kwargs: Any) -> Any:
            return received

        def capture(x: Any, *args: Any, **kwargs: Any) -> Any:
            raise StageExit(x)

        sequence: list[Callable] = [] if first else [inject]
        sequence += [self.blocks.get_submodule(str(i)) for i in self.block_range(part)]
        sequence += [] if last else [capture]
        swapped = {}
        for name, real in self.real.items():
            wanted = (name in self.layout.before and first) or (name in self.layout.after and last)
            if not wanted:
                swapped[name] = real
                setattr(self.root, name, self.ghosts[name])
        self.blocks._run = sequence
        try:
            yield
        finally:
            self.blocks._run = None
            for name, real in swapped.items():
                setattr(self.root, name, real)
