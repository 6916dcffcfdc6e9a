"""Sharded checkpoints: each rank writes its pieces into one torch.distributed.checkpoint (DCP) directory.

[Note: format]
A checkpoint is a directory holding a DCP checkpoint and ``meta.pt`` (Lightning's metadata: epoch, loops,
callbacks, schedulers, hyper-parameters; plus the model's parameter names, global shapes and tied aliases, and each
optimizer's parameter groups by name). Every strategy that does not hold whole tensors on one rank writes it: ZeRO,
tensor parallel, pipelines, hybrid. Tensors are keyed by what they are, not by who wrote them:

    state_dict/<param name>|<offsets>+<sizes>                    a box of the parameter (its global shape)
    buffers/<buffer name>                                        module buffers (from the ranks the strategy picks)
    optimizer_states/<i>/<param name>|<offsets>+<sizes>/<state>  the same box of optimizer state ``state``

Each axis reports the boxes a rank holds (``Holding``, [Note: pieces of global tensors] in ``pieces.py``): a ZeRO
flat range, a tensor-parallel shard, a stage's whole tensors, or all of these at once under ``hybrid``. Any
topology reads any other's: a rank intersects the boxes it needs with the saved ones and copies the intersections
(``load_into``). ``load_full`` and ``consolidate`` assemble whole tensors into a plain Lightning checkpoint, which
every strategy also loads. Format 1 (ZeRO's flat ranges, ``name|start:stop``) is still read.

[Note: atomic writes]
Shards are written to ``<path>.tmp``; only when every rank is done does rank 0 move the previous checkpoint aside,
move the new one in and delete the old one. A crash before that leaves the previous checkpoint untouched; a crash
between the two moves leaves it at ``<path>.old``, which ``load`` falls back to and the next ``save`` moves back
before it replaces anything.

[Note: safe loading]
Opening a checkpoint must not run code from it. Everything written here is tensors, plain containers and numbers,
so every read uses ``weights_only=True`` unless the caller passes ``weights_only=False`` (as torch >= 2.6 and
Lightning do): ``meta.pt`` through ``torch.load``, and DCP's own ``.metadata``, which torch unpickles without
restriction, through ``_SafeReader``, whose unpickler admits only DCP's metadata classes, torch dtypes and sizes.
A refused file raises ``pickle.UnpicklingError`` naming the file and the way out; nothing in it has run.
``save`` checks that ``meta.pt`` reads back under ``weights_only=True`` and warns if it does not (a
hyper-parameter of a custom class, say), so the problem shows at save time, not at resume.
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_par.pieces import Holding, Shape, box_key, flat_boxes, intersection, parse_box_key, sub_box

META_FILE = "meta.pt"
FORMAT = 2


def is_sharded_checkpoint(path: Any) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, META_FILE))


# ----- safe reading (see [Note: safe loading]) ---------------------------------------------------------------------

_REFUSED_HINT = ("Its content is not only tensors and plain containers, so it was not read (nothing in it has run). "
                 "If you trust where it comes from, load it with weights_only=False: the strategy's own argument "
                 "(e.g. ZeroStrategy(weights_only=False), HybridParallelStrategy(weights_only=False)), "
                 "Trainer.fit(..., weights_only=False) for dp, lightning-par-consolidate --no-weights-only.")


def load_file(path: Any, weights_only: Optional[bool] = None, **kwargs: Any) -> Any:
    """``torch.load`` with ``weights_only=True`` unless the caller passes False; a refusal names the file."""
    try:
        return torch.load(path, weights_only=weights_only is not False, **kwargs)
    except pickle.UnpicklingError as e:
        raise pickle.UnpicklingError(f"Refused to load {path} with weights_only=True. {_REFUSED_HINT}\n"
                                     f"torch said: {str(e).splitlines()[0]}") from None


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata``: its own dataclasses, torch dtypes, sizes and layouts, paths; nothing else."""

    _ALLOWED = {
        "torch.distributed.checkpoint.metadata": {
            "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
            "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING"},
        "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
        "torch.serialization": {"_get_layout"},
        "torch": {"Size"},
        "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"},
        "collections": {"OrderedDict"},
    }

    def find_class(self, module: str, name: str) -> Any:
        if name in self._ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's metadata")


class _SafeReader(dcp.FileSystemReader):
    """A DCP reader whose ``.metadata`` goes through ``_MetadataUnpickler`` instead of a bare ``pickle.load``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        path = Path(self.path) / ".metadata"
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except pickle.UnpicklingError as e:
            raise pickle.UnpicklingError(f"Refused to load {path}. {_REFUSED_HINT}\n{e}") from None
        storage_meta = getattr(metadata, "storage_meta", None)
        if storage_meta is not None and hasattr(self, "load_id"):
            storage_meta.load_id = self.load_id  # as FileSystemReader.read_metadata does
        return metadata


def _reader(path: Path, weights_only: Optional[bool]) -> dcp.FileSystemReader:
    return dcp.FileSystemReader(str(path)) if weights_only is False else _SafeReader(str(path))


def _serialized_meta(meta: dict[str, Any], filepath: Any) -> bytes:
    """``meta`` as ``torch.save`` writes it, read back once under ``weights_only=True``: a warning if refused."""
    buffer = io.BytesIO()
    torch.save(meta, buffer)
    try:
        torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    except pickle.UnpicklingError as e:
        rank_zero_warn(f"The checkpoint at {filepath} holds metadata that weights_only=True loading refuses "
                       f"({str(e).splitlines()[0]}); it will load only with weights_only=False. Keep "
                       f"hyper-parameters and callback states to numbers, strings, tensors and plain containers.")
    return buffer.getvalue()


# ----- what a rank holds (built by the strategy from its components) ----------------------------------------------


@dataclass
class HeldTensor:
    """A holding and the tensor with its values: read when saving, written into when loading."""

    holding: Holding
    value: Tensor


@dataclass
class HeldState:
    """A holding's optimizer state: ``get`` reads it (tensors shaped like the holding's local values, or 0-d),
    ``put`` replaces it; loaded state goes to ``device``, 0-d state (Adam's ``step``) to ``scalar_device``."""

    holding: Holding
    get: Callable[[], Mapping[str, Any]]
    put: Callable[[dict[str, Any]], None]
    device: torch.device
    scalar_device: torch.device = torch.device("cpu")


def scalar_device(group: Mapping[str, Any], param: Tensor) -> torch.device:
    """Where the optimizer keeps 0-d state (Adam's ``step``) of ``param`` in parameter group ``group``: on the
    parameter's device when fused or capturable, else on the host (as ``Optimizer.load_state_dict`` places it)."""
    return param.device if group.get("fused") or group.get("capturable") else torch.device("cpu")


@dataclass
class HeldOptimizer:
    optimizer: Optional[torch.optim.Optimizer]  # None: state read into plain dicts (``load_full``)
    names: list[list[str]]  # each parameter group's global names, in the order one process numbers them
    states: list[HeldState]


@dataclass
class Holdings:
    """What one rank keeps of the model and its optimizers, as pieces of global tensors."""

    params: list[HeldTensor]
    model_names: list[str]  # every global parameter name of the model, in module order
    buffers: dict[str, Tensor] = field(default_factory=dict)  # by name; only on the ranks that write them
    aliases: dict[str, str] = field(default_factory=dict)  # a tied parameter's other names -> its global name
    optimizers: list[HeldOptimizer] = field(default_factory=list)


def _meta_boxes(holding: Holding) -> list[tuple[Shape, Shape]]:
    return [(o, tuple(v.shape)) for o, v in holding.boxes(torch.empty(holding.local_shape, device="meta"))]


def model_pieces(holdings: Holdings) -> dict[str, Tensor]:
    """This rank's boxes of every parameter, by checkpoint key (Lightning's ``state_dict`` entry)."""
    out = {}
    for held in holdings.params:
        for offsets, view in held.holding.boxes(held.value):
            out[box_key(held.holding.name, offsets, tuple(view.shape))] = view
    return out


def optimizer_pieces(held: HeldOptimizer) -> dict[str, Any]:
    """This rank's boxes of one optimizer's state (Lightning's ``optimizer_states`` entry)."""
    state: dict[str, dict[str, Tensor]] = {}
    for entry in held.states:
        values = {k: v for k, v in entry.get().items() if isinstance(v, Tensor)}
        if not values:
            continue
        h = entry.holding
        for k, v in values.items():
            if v.dim() and tuple(v.shape) != h.local_shape:
                raise ValueError(f"The optimizer state {k!r} of {h.name} has shape {tuple(v.shape)}, not its "
                                 f"parameter's {h.local_shape}: lightning_par checkpoints hold optimizer state shaped "
                                 "like the parameter (SGD, Adam, AdamW, ...) or scalars.")
        boxes = {k: h.boxes(v) for k, v in values.items() if v.dim()}
        for j, (offsets, sizes) in enumerate(_meta_boxes(h)):
            state[box_key(h.name, offsets, sizes)] = {k: (boxes[k][j][1] if k in boxes else v) for k, v in values.items()}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in held.optimizer.param_groups]
    return {"sharded_state": state, "param_groups": groups, "param_names": held.names}


def _model_meta(holdings: Holdings) -> dict[str, Any]:
    """The whole model's names, global shapes, aliases and buffers: the union over every rank (a collective)."""
    mine = {"shapes": {h.holding.name: tuple(h.holding.global_shape) for h in holdings.params},
            "aliases": holdings.aliases, "buffers": {n: tuple(b.shape) for n, b in holdings.buffers.items()}}
    parts = [mine]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
    shapes, aliases, buffers = {}, {}, {}
    for part in parts:
        shapes.update(part["shapes"])
        aliases.update(part["aliases"])
        buffers.update(part["buffers"])
    return {"shapes": {n: shapes[n] for n in holdings.model_names if n in shapes}, "aliases": aliases,
            "buffer_names": list(buffers)}


# ----- save -----------------------------------------------------------------------------------------------------


def save(checkpoint: dict[str, Any], filepath: Any, *, holdings: Holdings, is_global_zero: bool,
         barrier: Callable[[], None]) -> None:
    """Write ``checkpoint`` (Lightning's dict, with the pieces of :func:`model_pieces` and :func:`optimizer_pieces`)
    atomically. Every rank calls it."""
    path = Path(filepath)
    tmp = path.with_name(path.name + ".tmp")
    old = path.with_name(path.name + ".old")
    model = _model_meta(holdings)
    if is_global_zero:
        shutil.rmtree(tmp, ignore_errors=True)  # debris of a crashed save
        if not path.exists() and is_sharded_checkpoint(old):
            os.replace(old, path)  # a save crashed between its two moves: put the previous checkpoint back first
        tmp.mkdir(parents=True)
    barrier()
    tensors: dict[str, Any] = {"state_dict": checkpoint.pop("state_dict")}
    optimizer_states = checkpoint.pop("optimizer_states", [])
    tensors["optimizer_states"] = {str(i): s["sharded_state"] for i, s in enumerate(optimizer_states)}
    tensors["buffers"] = {n: b.detach() for n, b in holdings.buffers.items()}
    dcp.save(tensors, checkpoint_id=str(tmp))
    if is_global_zero:
        meta = dict(checkpoint)
        meta["lightning_par"] = {
            "format": FORMAT,
            "model": model,
            "optimizers": [{"param_groups": s["param_groups"], "param_names": s["param_names"]} for s in optimizer_states],
        }
        (tmp / META_FILE).write_bytes(_serialized_meta(meta, path))  # serialised once, checked, then written
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old) if path.is_dir() else path.rename(old)
        os.replace(tmp, path)
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()
    barrier()


def remove(filepath: Any) -> None:
    path = Path(filepath)
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


# ----- load -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Saved:
    """One saved tensor's box of a global tensor: ``key`` in the checkpoint; a box-shaped tensor, or (format 1, a
    flat range) the box found ``position`` elements into a flat one."""

    key: str
    offsets: Shape
    sizes: Shape
    position: Optional[int] = None

    def view(self, tensor: Tensor) -> Tensor:
        if self.position is None:
            return tensor
        return tensor.reshape(-1)[self.position : self.position + prod(self.sizes)].view(self.sizes)


class _Source:
    """What a checkpoint holds, by global name: the saved boxes of each parameter and of its optimizer state."""

    meta: dict[str, Any]  # Lightning's part of the checkpoint
    shapes: dict[str, Shape]  # global parameter shapes
    aliases: dict[str, str]
    buffer_names: set[str]
    param_groups: list[list[dict[str, Any]]]  # per optimizer: its groups' settings

    def params(self, name: str) -> list[_Saved]:
        raise NotImplementedError

    def states(self, i: int, name: str) -> list[tuple[_Saved, dict[str, tuple[Shape, torch.dtype]]]]:
        raise NotImplementedError

    def fetch(self, params: set[str], states: set[tuple[int, str]], buffers: dict[str, Tensor]
              ) -> tuple[dict[str, Tensor], dict[tuple[int, str], dict[str, Tensor]], dict[str, Tensor]]:
        raise NotImplementedError


class _Index(_Source):
    """A sharded checkpoint directory, read from its DCP metadata (format 1 flat ranges and format 2 boxes)."""

    def __init__(self, path: Path, weights_only: Optional[bool] = None, collective: bool = True) -> None:
        self.path, self.weights_only, self.collective = path, weights_only, collective
        meta = load_file(path / META_FILE, weights_only)
        info = meta.pop("lightning_par")
        self.meta = meta
        self.shapes = {n: tuple(s) for n, s in info["model"]["shapes"].items()}
        self.aliases = info["model"]["aliases"]
        self.buffer_names = set(info["model"]["buffer_names"])
        self.optimizers = info["optimizers"]
        self.param_groups = [o["param_groups"] for o in self.optimizers]
        self.sizes: dict[str, tuple[Shape, torch.dtype]] = {}  # DCP key -> saved size and dtype
        self._params: dict[str, list[_Saved]] = {}
        self._states: dict[tuple[int, str], list[tuple[_Saved, dict[str, tuple[Shape, torch.dtype]]]]] = {}
        by_piece: dict[tuple[int, str], dict[str, tuple[Shape, torch.dtype]]] = {}
        for key, info in _reader(path, weights_only).read_metadata().state_dict_metadata.items():
            properties = getattr(info, "properties", None)
            self.sizes[key] = (tuple(getattr(info, "size", ())), getattr(properties, "dtype", torch.float32))
            if key.startswith("state_dict."):
                piece = key[len("state_dict."):]
                self._params.setdefault(self._name(piece), []).extend(self._saved(piece))
            elif key.startswith("optimizer_states."):
                index, rest = key[len("optimizer_states."):].split(".", 1)
                piece, state = rest.rsplit(".", 1)
                by_piece.setdefault((int(index), piece), {})[state] = self.sizes[key]
        self._state_kinds = by_piece
        for (i, piece), kinds in by_piece.items():
            for saved in self._saved(piece):
                self._states.setdefault((i, self._name(piece)), []).append((saved, kinds))

    @staticmethod
    def _name(piece: str) -> str:
        return piece.rsplit("|", 1)[0]

    def _saved(self, piece: str) -> list[_Saved]:
        name, box = piece.rsplit("|", 1)
        if "+" in box:  # format 2: a box
            _, offsets, sizes = parse_box_key(piece)
            return [_Saved(piece, offsets, sizes)]
        start, stop = (int(x) for x in box.split(":"))  # format 1: a flat range of the whole parameter
        return [_Saved(piece, o, s, f) for o, s, f in flat_boxes(self.shapes[name], start, stop)]

    def params(self, name: str) -> list[_Saved]:
        return self._params.get(name, [])

    def states(self, i: int, name: str) -> list[tuple[_Saved, dict[str, tuple[Shape, torch.dtype]]]]:
        return self._states.get((i, name), [])

    def fetch(self, params, states, buffers):
        request: dict[str, Any] = {"state_dict": {}, "optimizer_states": {}, "buffers": dict(buffers)}
        for key in params:
            size, dtype = self.sizes["state_dict." + key]
            request["state_dict"][key] = torch.empty(size, dtype=dtype)
        for i, key in states:
            request["optimizer_states"].setdefault(str(i), {})[key] = {
                state: torch.empty(size, dtype=dtype) for state, (size, dtype) in self._state_kinds[(i, key)].items()}
        dcp.load(request, storage_reader=_reader(self.path, self.weights_only), no_dist=not self.collective)
        loaded_states = {(int(i), key): value for i, by_key in request["optimizer_states"].items()
                         for key, value in by_key.items()}
        return request["state_dict"], loaded_states, request["buffers"]


class _Plain(_Source):
    """A plain Lightning checkpoint (whole tensors: one process, ``dp``, Lightning's own strategies, a consolidated
    checkpoint); its optimizer state is numbered as one process numbers it (``names``: per optimizer, its groups'
    global names in that order)."""

    def __init__(self, full: dict[str, Any], names: list[list[list[str]]]) -> None:
        self.tensors: dict[str, Tensor] = full.get("state_dict", {})
        self.meta = {k: v for k, v in full.items() if k not in ("state_dict", "optimizer_states")}
        self.shapes = {n: tuple(t.shape) for n, t in self.tensors.items() if isinstance(t, Tensor)}
        self.aliases, self.buffer_names = {}, set(self.tensors)
        saved = full.get("optimizer_states", [])
        self.param_groups = [[{k: v for k, v in g.items() if k != "params"} for g in s["param_groups"]] for s in saved]
        self.optimizer_states: dict[tuple[int, str], dict[str, Tensor]] = {}
        for i, (state, groups) in enumerate(zip(saved, names)):
            flat = [n for group in groups for n in group]
            counts = [len(g["params"]) for g in state["param_groups"]]
            if counts != [len(g) for g in groups]:
                raise ValueError(f"The checkpoint's optimizer {i} has groups of {counts} parameters; this model's has "
                                 f"{[len(g) for g in groups]}. Was it saved with the same configure_optimizers?")
            ids = [p for g in state["param_groups"] for p in g["params"]]
            for position, name in zip(ids, flat):
                if position in state["state"]:
                    self.optimizer_states[(i, name)] = state["state"][position]

    def params(self, name: str) -> list[_Saved]:
        return [_Saved(name, (0,) * len(self.shapes[name]), self.shapes[name])] if name in self.shapes else []

    def states(self, i: int, name: str) -> list[tuple[_Saved, dict[str, tuple[Shape, torch.dtype]]]]:
        state = self.optimizer_states.get((i, name))
        if not state or name not in self.shapes:
            return []
        kinds = {k: (tuple(v.shape), v.dtype) for k, v in state.items() if isinstance(v, Tensor)}
        return [(_Saved(name, (0,) * len(self.shapes[name]), self.shapes[name]), kinds)]

    def fetch(self, params, states, buffers):
        return ({k: self.tensors[k] for k in params}, {(i, k): self.optimizer_states[(i, k)] for i, k in states},
                {n: self.tensors[n] for n in buffers})


def _fill(name: str, offsets: Shape, target: Tensor, saved: list[tuple[_Saved, Tensor]]) -> None:
    """Copy every saved box's intersection with the target box; the saved boxes are disjoint, so the volumes copied
    add up to the target's exactly when nothing is missing."""
    covered = 0
    for s, value in saved:
        hit = intersection(offsets, tuple(target.shape), s.offsets, s.sizes)
        if hit is not None:
            lo, size = hit
            sub_box(target, offsets, lo, size).copy_(sub_box(s.view(value), s.offsets, lo, size))
            covered += prod(size)
    if covered != target.numel():
        raise ValueError(f"The checkpoint does not hold all of {name} (elements at {offsets} of shape "
                         f"{tuple(target.shape)}): was it written completely?")


def _check_model(source: _Source, holdings: Holdings, path: Any, strict: bool) -> None:
    mine = {h.holding.name: tuple(h.holding.global_shape) for h in holdings.params}
    missing = sorted(n for n in mine if n not in source.shapes) if strict else []
    mismatched = sorted(n for n in mine if n in source.shapes and source.shapes[n] != mine[n])
    known = set(holdings.model_names) | set(holdings.aliases)
    # (A plain state dict mixes buffers among its entries: only a sharded checkpoint tells them apart.)
    unexpected = sorted(n for n in source.shapes if n not in known and n not in source.buffer_names) if strict else []
    if not (missing or unexpected or mismatched):
        return
    details = []
    if missing:
        details.append(f"missing from the checkpoint: {missing[:5]}")
    if unexpected:
        details.append(f"not in the model: {unexpected[:5]}")
    if mismatched:
        n = mismatched[0]
        details.append(f"different shapes, e.g. {n}: checkpoint {source.shapes[n]}, model {mine[n]}")
    raise ValueError(f"The checkpoint at {path} was written for a different model; {'; '.join(details)}.")


@torch.no_grad()
def load_into(source: _Source, holdings: Holdings, path: Any = "", strict: bool = True) -> dict[str, Any]:
    """Copy what ``holdings`` needs out of ``source`` (every rank together for a sharded checkpoint); returns
    Lightning's part of the checkpoint. ``strict=False`` (``LightningModule.strict_loading``) leaves parameters the
    checkpoint lacks as they are and ignores those it has in excess, as ``load_state_dict(strict=False)`` does."""
    _check_model(source, holdings, path, strict)
    if holdings.optimizers and len(source.param_groups) != len(holdings.optimizers):
        raise ValueError(f"The checkpoint at {path} has {len(source.param_groups)} optimizer(s); the module "
                         f"configures {len(holdings.optimizers)}.")
    targets = [(held.holding.name, held.holding.boxes(held.value)) for held in holdings.params
               if held.holding.name in source.shapes]
    need_params = {s.key for name, boxes in targets for o, v in boxes for s in source.params(name)
                   if intersection(o, tuple(v.shape), s.offsets, s.sizes) is not None}
    states = []  # (optimizer index, entry, the state's new tensors, their boxes, the saved boxes)
    for i, held in enumerate(holdings.optimizers):
        for entry in held.states:
            saved = source.states(i, entry.holding.name)
            if not saved:
                continue
            kinds = saved[0][1]
            new = {k: torch.zeros(() if size == () else entry.holding.local_shape, dtype=dtype)
                   for k, (size, dtype) in kinds.items()}
            boxes = {k: entry.holding.boxes(v) for k, v in new.items() if v.dim()}
            meta_boxes = _meta_boxes(entry.holding)
            hits = [s for s, _ in saved
                    if any(intersection(o, size, s.offsets, s.sizes) is not None for o, size in meta_boxes)]
            states.append((i, entry, new, boxes, hits))
    need_states = {(i, s.key) for i, _, _, _, hits in states for s in hits}
    buffers = {n: torch.empty_like(b, device="cpu") for n, b in holdings.buffers.items() if n in source.buffer_names}
    params, loaded_states, loaded_buffers = source.fetch(need_params, need_states, buffers)
    for name, boxes in targets:
        saved = [(s, params[s.key]) for s in source.params(name) if s.key in params]
        for offsets, view in boxes:
            _fill(name, offsets, view, saved)
    for n, value in loaded_buffers.items():
        holdings.buffers[n].copy_(value)
    for i, entry, new, boxes, hits in states:
        for k, value in new.items():
            if value.dim() == 0:
                value.copy_(loaded_states[(i, hits[0].key)][k])
                continue
            saved = [(s, loaded_states[(i, s.key)][k]) for s in hits]
            for offsets, view in boxes[k]:
                _fill(f"optimizer state {k!r} of {entry.holding.name}", offsets, view, saved)
        entry.put({k: v.to(entry.device if v.dim() else entry.scalar_device) for k, v in new.items()})
    for held, groups in zip(holdings.optimizers, source.param_groups):
        for group, saved_group in zip(held.optimizer.param_groups if held.optimizer else [], groups):
            group.update({k: v for k, v in saved_group.items() if k != "params"})
    return dict(source.meta)


def _resolve(path: Any) -> Path:
    path = Path(path)
    if not path.exists():
        old = path.with_name(path.name + ".old")
        if is_sharded_checkpoint(old):
            return old  # a crash between the two moves of `save`
        raise FileNotFoundError(f"No checkpoint at {path}.")
    return path


def load(path: Any, holdings: Holdings, weights_only: Optional[bool] = None, strict: bool = True) -> dict[str, Any]:
    """Load any checkpoint (sharded, of any strategy and world size, or a plain Lightning file) into ``holdings``.
    Every rank calls it."""
    path = _resolve(path)
    if is_sharded_checkpoint(path):
        source: _Source = _Index(path, weights_only)
    else:
        source = _Plain(load_file(path, weights_only, map_location="cpu"), [h.names for h in holdings.optimizers])
    return load_into(source, holdings, path, strict)


# ----- whole tensors: plain Lightning files out -----------------------------------------------------------------


def load_full(path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
    """A sharded checkpoint as a plain Lightning checkpoint dict: whole tensors, optimizer state numbered as one
    process numbers it. Reads every piece in this one process (no process group needed)."""
    index = _Index(_resolve(path), weights_only, collective=False)
    values = {}
    for name, shape in index.shapes.items():
        saved = index.params(name)
        dtype = index.sizes["state_dict." + saved[0].key][1] if saved else torch.float32
        values[name] = torch.empty(shape, dtype=dtype)
    names = [o["param_names"] for o in index.optimizers]
    states: list[dict[int, dict[str, Tensor]]] = [{} for _ in names]
    optimizers = []
    for i, groups in enumerate(names):
        entries = []
        for position, name in enumerate(n for group in groups for n in group):
            entries.append(HeldState(Holding(name, index.shapes[name]), dict,
                                     lambda state, i=i, position=position: states[i].__setitem__(position, state),
                                     torch.device("cpu")))
        optimizers.append(HeldOptimizer(None, groups, entries))
    holdings = Holdings([HeldTensor(Holding(n, tuple(v.shape)), v) for n, v in values.items()], list(values),
                        {n: torch.empty(index.sizes["buffers." + n][0], dtype=index.sizes["buffers." + n][1])
                         for n in index.buffer_names}, index.aliases, optimizers)
    meta = load_into(index, holdings, path)
    state_dict: dict[str, Tensor] = dict(values)
    for alias, name in index.aliases.items():
        state_dict[alias] = state_dict[name]
    state_dict.update(holdings.buffers)
    optimizer_states = []
    for i, (groups, settings) in enumerate(zip(names, index.param_groups)):
        param_groups, start = [], 0
        for group, members in zip(settings, groups):
            param_groups.append({**group, "params": list(range(start, start + len(members)))})
            start += len(members)
        optimizer_states.append({"state": dict(sorted(states[i].items())), "param_groups": param_groups})
    return {**meta, "state_dict": state_dict, "optimizer_states": optimizer_states}


def consolidate(path: Any, out: Any, weights_only: Optional[bool] = None) -> None:
    """Write any strategy's checkpoint as one plain Lightning checkpoint file (loads without lightning_par)."""
    torch.save(load_any(path, weights_only), out)


def load_any(path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
    """Any strategy's checkpoint as a plain Lightning checkpoint dict on the CPU: a sharded directory through
    :func:`load_full`, a single file (``dp``, one process, Lightning's own strategies) through ``torch.load``."""
    if is_sharded_checkpoint(path):
        return load_full(path, weights_only)
    if Path(path).is_dir():
        raise FileNotFoundError(f"{path} is a directory but not a lightning_par sharded checkpoint (no {META_FILE}).")
    return load_file(path, weights_only, map_location="cpu")


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="lightning-par-consolidate",
        description="Turn a lightning_par checkpoint (a sharded directory or any strategy's single file) into one "
                    "plain Lightning checkpoint file, or into a Hugging Face model directory (--format safetensors).",
    )
    parser.add_argument("checkpoint", help="the checkpoint: a sharded directory (zero) or a file (dp, pipeline, tp1d)")
    parser.add_argument("output", help="lightning: the file to write (loads with torch.load / "
                                       "LightningModule.load_from_checkpoint); safetensors: the directory to write")
    parser.add_argument("--format", choices=("lightning", "safetensors"), default="lightning",
                        help="lightning (default): a plain Lightning checkpoint; safetensors: model.safetensors (+ "
                             "config.json) that transformers' from_pretrained loads")
    parser.add_argument("--prefix", default="model.",
                        help="safetensors: the state-dict prefix of the submodule to export, removed from the names "
                             "(default 'model.': the LightningModule's self.model); '' exports every entry")
    parser.add_argument("--hf-config", default=None,
                        help="safetensors: a config.json (or a directory holding one) to copy beside the weights; by "
                             "default written from the hyper-parameters of lightning_par.demo.hf.HFCausalLM")
    parser.add_argument("--dtype", choices=tuple(_DTYPES), default=None,
                        help="safetensors: cast floating-point weights (default: as saved, fp32)")
    parser.add_argument("--no-weights-only", dest="weights_only", action="store_false",
                        help="read a checkpoint that weights_only=True refuses (objects beyond tensors and plain "
                             "containers in its metadata); only for checkpoints from a source you trust")
    args = parser.parse_args(argv)
    if args.format == "lightning":
        if args.prefix != "model." or args.hf_config is not None or args.dtype is not None:
            parser.error("--prefix, --hf-config and --dtype apply to --format safetensors")
        torch.save(load_any(args.checkpoint, args.weights_only), args.output)
        print(f"wrote {args.output}")
        return
    from lightning_par.export import export_safetensors

    target = export_safetensors(args.checkpoint, args.output, args.prefix, args.hf_config,
                                _DTYPES[args.dtype] if args.dtype else None, args.weights_only)
    config = Path(args.output) / "config.json"
    print(f"wrote {target}" + (f" and {config}" if config.exists() else
                               "; put the model's config.json beside it (or pass --hf-config) to load it with "
                               "from_pretrained"))


if __name__ == "__main__":
    main()
