"""The optimizer step in windows, one chunk at a time, for chunks that cannot step with the rest: those whose optimizer
state lives on disk between steps (``zero3_nvme``), and host chunks whose gradient shard is kept in 16 bits
(``host_grads="compute"``: cast to fp32 only for their own step).

[Note: the spilled optimizer step]
The user's optimizer object steps as usual, in several calls: first every chunk held in memory (the windowed
chunks' gradients hidden, so the optimizer skips them), then one windowed chunk at a time with its gradient (cast to
fp32 when kept in 16 bits). For chunk i, its state was read into
flat host buffers while chunk i-1 stepped; the optimizer's state for the chunk's pieces is set to views of those
buffers (scalars such as Adam's ``step`` stay in memory), the chunk steps, and the buffers are written back without
waiting. The last writes finish while the next forward and backward run; the next step waits for them before it
reads. A chunk's step waits for the writes of all but the ``WRITES_IN_FLIGHT`` chunks before it, so host memory
holds the state of at most four chunks at a time however slow the disk (``Plan.window_bytes`` counts them), and any
element-wise ``torch.optim`` optimizer works (a chunk's first step creates its state the usual way, which is then
written). Without that bound the first step, which reads nothing, queued every chunk's new state behind the disk:
at 20 B on an H200 host (126 GiB) a spike of about 15 GiB over the steady state, and the kernel killed the run.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from lightning_par.zero.nvme import NvmeStore
from lightning_par.zero.placement import WRITES_IN_FLIGHT  # (the plan counts the buffers this bound leaves)


class SpilledState:
    def __init__(self, store: Optional[NvmeStore]) -> None:
        self.store = store
        self.scalars: dict[nn.Parameter, dict[str, Any]] = {}  # per piece: what is not a flat tensor (Adam's step)
        self.files: dict[str, dict[str, torch.dtype]] = {}  # key -> the state tensors written under it
        self._mapped: dict[str, dict[str, Tensor]] = {}  # key -> its files mapped (for checkpoints), until rewritten
        self.closed = False

    @staticmethod
    def key(opt_index: int, chunk_index: int) -> str:
        return f"opt{opt_index}_chunk{chunk_index}"

    def step(self, optimizer: torch.optim.Optimizer, opt_index: int, chunks: list[Any],
             original_step: Callable[[], Any], window_grads: Callable[[Any, list], dict]) -> None:
        """One optimizer step: the chunks in memory at once, then ``chunks`` one by one. ``window_grads(chunk,
        pieces)`` gives the fp32 gradients of a chunk whose shard gradient is not held by its pieces (16-bit)."""
        if self.store is not None:
            self.store.wait_all()  # the last step's writes (they overlapped this step's forward and backward)
        mine = {id(q) for g in optimizer.param_groups for q in g["params"]}
        spilled = [(c, [(piece, q) for piece, q in c.pieces if id(q) in mine]) for c in chunks]
        spilled = [(c, pieces) for c, pieces in spilled if pieces]
        # Each call of the optimizer steps exactly the pieces that hold a gradient during it.
        on_disk = {id(q) for _, pieces in spilled for _, q in pieces}
        grads = {q: q.grad for g in optimizer.param_groups for q in g["params"]}
        for q in grads:
            if id(q) in on_disk:
                q.grad = None
        original_step()  # the chunks in memory
        for q in grads:
            q.grad = None
        reading = self._start_read(optimizer, opt_index, *spilled[0]) if spilled else None
        writing: list[Future] = []
        for i, (chunk, pieces) in enumerate(spilled):
            buffers = self._finish_read(optimizer, reading, pieces)
            reading = self._start_read(optimizer, opt_index, *spilled[i + 1]) if i + 1 < len(spilled) else None
            cast = window_grads(chunk, pieces)
            for _, q in pieces:
                q.grad = cast.get(q, grads[q])
            original_step()
            for _, q in pieces:
                q.grad = None
            if chunk.nvme:
                writing.append(self._write(optimizer, self.key(opt_index, chunk.index), chunk, pieces, buffers))
                while len(writing) > WRITES_IN_FLIGHT:
                    writing.pop(0).result()  # (re-raises a failed write here)
        for q, grad in grads.items():
            q.grad = grad

    def _start_read(self, optimizer: torch.optim.Optimizer, opt_index: int, chunk: Any,
                    pieces: list) -> Optional[tuple[Future, dict[str, Tensor]]]:
        key = self.key(opt_index, chunk.index)
        if not chunk.nvme or key not in self.files or any(q in optimizer.state for _, q in pieces):
            return None  # first step (the optimizer creates the state), or state loaded from a checkpoint
        buffers = {name: torch.empty(chunk.shard_numel, dtype=dtype) for name, dtype in self.files[key].items()}
        return self.store.read(key, buffers), buffers

    def _finish_read(self, optimizer: torch.optim.Optimizer, reading: Optional[tuple[Future, dict[str, Tensor]]],
                     pieces: list) -> Optional[dict[str, Tensor]]:
        if reading is None:
            return None
        future, buffers = reading
        future.result()
        for piece, q in pieces:
            if q in self.scalars:  # (a piece that had no state when written gets it from the optimizer)
                lo, hi = piece.shard_offset, piece.shard_offset + piece.numel
                optimizer.state[q] = {**self.scalars[q], **{n: b[lo:hi] for n, b in buffers.items()}}
        return buffers

    def _write(self, optimizer: torch.optim.Optimizer, key: str, chunk: Any, pieces: list,
               buffers: Optional[dict[str, Tensor]]) -> Future:
        # Pieces whose state the optimizer created in this step (a chunk's first step, or a piece unfrozen since) hold
        # their own tensors: copy them into the flat buffers; the others stepped on views of the buffers already.
        buffers = dict(buffers or {})
        for piece, q in pieces:
            for name, value in optimizer.state.get(q, {}).items():
                if _is_flat(value):
                    if name not in buffers:
                        buffers[name] = torch.zeros(chunk.shard_numel, dtype=value.dtype)
                    target = buffers[name][piece.shard_offset : piece.shard_offset + piece.numel]
                    if value.data_ptr() != target.data_ptr():
                        target.copy_(value)
        for _, q in pieces:
            if q in optimizer.state:
                self.scalars[q] = {n: v for n, v in optimizer.state.pop(q).items() if not _is_flat(v)}
        self.files[key] = {name: b.dtype for name, b in buffers.items()}
        self._mapped.pop(key, None)  # the write replaces the files: a map of the old ones would read stale state
        assert self.store is not None
        return self.store.write(key, buffers)  # the store's tasks hold the buffers until written

    def state_of(self, opt_index: int, chunk: Any, piece: Any, q: nn.Parameter) -> dict[str, Any]:
        """A piece's state for a checkpoint, read through a memory map of its files (no copy in host memory)."""
        key = self.key(opt_index, chunk.index)
        if self.closed:
            raise RuntimeError(
                "The optimizer state spilled to disk was removed when fit ended, so this checkpoint cannot include "
                "it. Save checkpoints during fit (a ModelCheckpoint callback, or trainer.save_checkpoint in a hook)."
            )
        if key not in self.files:
            return {}
        if key not in self._mapped:  # once per chunk, not per piece
            assert self.store is not None
            self.store.wait_all()
            self._mapped[key] = {
                name: torch.from_file(str(self.store.path / f"{key}.{name}.bin"), shared=False,
                                      size=chunk.shard_numel, dtype=dtype)
                for name, dtype in self.files[key].items()
            }
        lo, hi = piece.shard_offset, piece.shard_offset + piece.numel
        return {**self.scalars.get(q, {}), **{name: flat[lo:hi] for name, flat in self._mapped[key].items()}}

    def bytes_on_disk(self) -> int:
        if self.closed or self.store is None:
            return 0
        self.store.wait_all()
        return sum(f.stat().st_size for f in self.store.path.glob("*.bin"))

    def close(self) -> None:
        self.closed = True
        self._mapped.clear()
        if self.store is not None:
            self.store.close()


def _is_flat(v: Any) -> bool:
    return isinstance(v, Tensor) and v.dim() > 0
