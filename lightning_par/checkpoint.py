"""Sharded checkpoints: each rank writes its pieces into one torch.distributed.checkpoint (DCP) directory.

[Note: format]
A checkpoint is a directory holding a DCP checkpoint and ``meta.pt`` (Lightning's metadata: epoch, loops,
callbacks, schedulers, hyper-parameters; plus the model's parameter names, shapes and tied aliases, and each
optimizer's parameter groups by name). Tensors are keyed by what they are, not by who wrote them:

    state_dict/<param name>|<start>:<stop>                       a flat range of the fp32 parameter
    buffers/<buffer name>                                        module buffers (written once, by rank 0)
    optimizer_states/<i>/<param name>|<start>:<stop>/<state>     the same range of optimizer state ``state``

so any topology can read any other's: a rank asks for the saved ranges that overlap the ones it owns
(``overlaps``, a pure function) and copies the intersections. ``consolidate`` assembles whole tensors into a plain
Lightning checkpoint file, and ``load_full`` does the same in memory for strategies that hold whole parameters.

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
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
import torch.distributed.checkpoint as dcp
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

if TYPE_CHECKING:
    from lightning_par.zero.engine import ZeroEngine

META_FILE = "meta.pt"
FORMAT = 1


def piece_key(name: str, start: int, stop: int) -> str:
    return f"{name}|{start}:{stop}"


def parse_piece_key(key: str) -> tuple[str, int, int]:
    name, span = key.rsplit("|", 1)
    start, stop = span.split(":")
    return name, int(start), int(stop)


def overlaps(saved: list[tuple[int, int]], start: int, stop: int) -> list[tuple[int, int]]:
    """The saved flat ranges that intersect [start, stop), in order; raises if they leave a gap."""
    hits = sorted((a, b) for a, b in saved if a < stop and b > start)
    covered = start
    for a, b in hits:
        if a > covered:
            break
        covered = max(covered, b)
    if covered < stop:
        raise ValueError(f"the checkpoint does not cover elements [{covered}, {stop}) of this parameter")
    return hits


def is_sharded_checkpoint(path: Any) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, META_FILE))


# ----- safe reading (see [Note: safe loading]) ---------------------------------------------------------------------

_REFUSED_HINT = ("Its content is not only tensors and plain containers, so it was not read (nothing in it has run). "
                 "If you trust where it comes from, load it with weights_only=False: ZeroStrategy(weights_only=False) "
                 "for the ZeRO strategies, Trainer.fit(..., weights_only=False) for the others, "
                 "lightning-par-consolidate --no-weights-only.")


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


# ----- what a ZeRO engine contributes ---------------------------------------------------------------------------


def model_pieces(engine: "ZeroEngine") -> dict[str, Tensor]:
    out = {}
    for piece in engine.layout.pieces(engine.rank):
        chunk = engine.chunks[piece.chunk]
        out[piece_key(piece.name, piece.start, piece.stop)] = chunk.master[
            piece.shard_offset : piece.shard_offset + piece.numel
        ]
    return out


def optimizer_pieces(engine: "ZeroEngine", optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    state = {}
    for name, piece, q in engine.optimizer_pieces(optimizer):
        entries = {k: v for k, v in engine.piece_state(optimizer, piece, q).items() if isinstance(v, Tensor)}
        if entries:
            state[piece_key(name, piece.start, piece.stop)] = entries
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return {"sharded_state": state, "param_groups": groups, "param_names": engine.optimizer_param_names[optimizer]}


def _model_meta(module: torch.nn.Module) -> dict[str, Any]:
    canonical = {id(p): n for n, p in module.named_parameters()}
    aliases = {n: canonical[id(p)] for n, p in module.named_parameters(remove_duplicate=False) if canonical[id(p)] != n}
    return {
        "shapes": {n: tuple(p.shape) for n, p in module.named_parameters()},
        "aliases": aliases,
        "buffer_names": [n for n, _ in module.named_buffers()],
    }


# ----- save -----------------------------------------------------------------------------------------------------


def save(checkpoint: dict[str, Any], filepath: Any, *, is_global_zero: bool, barrier: Callable[[], None],
         module: torch.nn.Module) -> None:
    """Write ``checkpoint`` (Lightning's dict, with piece tensors from the functions above) atomically."""
    path = Path(filepath)
    tmp = path.with_name(path.name + ".tmp")
    old = path.with_name(path.name + ".old")
    if is_global_zero:
        shutil.rmtree(tmp, ignore_errors=True)  # debris of a crashed save
        if not path.exists() and is_sharded_checkpoint(old):
            os.replace(old, path)  # a save crashed between its two moves: put the previous checkpoint back first
        tmp.mkdir(parents=True)
    barrier()
    tensors: dict[str, Any] = {"state_dict": checkpoint.pop("state_dict")}
    optimizer_states = checkpoint.pop("optimizer_states", [])
    tensors["optimizer_states"] = {str(i): s["sharded_state"] for i, s in enumerate(optimizer_states)}
    if is_global_zero:
        tensors["buffers"] = {n: b.detach() for n, b in module.named_buffers()}
    dcp.save(tensors, checkpoint_id=str(tmp))
    if is_global_zero:
        meta = dict(checkpoint)
        meta["lightning_par"] = {
            "format": FORMAT,
            "model": _model_meta(module),
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


class _Index:
    """What a sharded checkpoint holds, read from its DCP metadata: saved ranges per parameter and state shapes."""

    def __init__(self, path: Path, weights_only: Optional[bool] = None) -> None:
        self.path = path
        self.weights_only = weights_only
        self.meta = load_file(path / META_FILE, weights_only)
        self.params: dict[str, list[tuple[int, int]]] = {}
        self.states: dict[int, dict[str, dict[tuple[int, int], dict[str, tuple[int, ...]]]]] = {}
        self.buffers: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self.dtypes: dict[str, torch.dtype] = {}  # by DCP key ("state_dict.<piece>", "optimizer_states.<i>...")
        for key, info in _reader(path, weights_only).read_metadata().state_dict_metadata.items():
            size = tuple(getattr(info, "size", ()))
            properties = getattr(info, "properties", None)
            self.dtypes[key] = getattr(properties, "dtype", torch.float32)
            if key.startswith("buffers."):
                self.buffers[key[len("buffers."):]] = (size, self.dtypes[key])
            elif key.startswith("state_dict."):
                name, a, b = parse_piece_key(key[len("state_dict."):])
                self.params.setdefault(name, []).append((a, b))
            elif key.startswith("optimizer_states."):
                index, rest = key[len("optimizer_states."):].split(".", 1)
                piece, state = rest.rsplit(".", 1)
                name, a, b = parse_piece_key(piece)
                by_range = self.states.setdefault(int(index), {}).setdefault(name, {})
                by_range.setdefault((a, b), {})[state] = size

    @property
    def model(self) -> dict[str, Any]:
        return self.meta["lightning_par"]["model"]

    @property
    def optimizers(self) -> list[dict[str, Any]]:
        return self.meta["lightning_par"]["optimizers"]

    def check_model(self, shapes: dict[str, tuple[int, ...]]) -> None:
        saved = self.model["shapes"]
        missing = sorted(set(shapes) - set(saved))
        unexpected = sorted(set(saved) - set(shapes))
        mismatched = sorted(n for n in set(shapes) & set(saved) if tuple(saved[n]) != tuple(shapes[n]))
        if not (missing or unexpected or mismatched):
            return
        details = []
        if missing:
            details.append(f"missing from the checkpoint: {missing[:5]}")
        if unexpected:
            details.append(f"not in the model: {unexpected[:5]}")
        if mismatched:
            n = mismatched[0]
            details.append(f"different shapes, e.g. {n}: checkpoint {tuple(saved[n])}, model {tuple(shapes[n])}")
        raise ValueError(f"The checkpoint at {self.path} was written for a different model; {'; '.join(details)}.")

    def read(self, param_ranges: dict[str, list[tuple[int, int]]], state_ranges: dict[int, dict[str, list]],
             buffers: dict[str, Tensor], *, collective: bool = True) -> dict[str, Any]:
        """Load the saved pieces that overlap the requested flat ranges: all ranks together (``collective``), or
        this process alone."""
        request: dict[str, Any] = {"state_dict": {}, "optimizer_states": {}, "buffers": dict(buffers)}
        for name, spans in param_ranges.items():
            for start, stop in spans:
                for a, b in overlaps(self.params[name], start, stop):
                    key = piece_key(name, a, b)
                    request["state_dict"][key] = torch.empty(b - a, dtype=self.dtypes["state_dict." + key])
        for i, by_name in state_ranges.items():
            out = request["optimizer_states"].setdefault(str(i), {})
            for name, spans in by_name.items():
                saved = self.states.get(i, {}).get(name, {})
                for start, stop in spans:
                    for a, b in overlaps(list(saved), start, stop) if saved else []:
                        key = piece_key(name, a, b)
                        out[key] = {s: torch.empty(size, dtype=self.dtypes[f"optimizer_states.{i}.{key}.{s}"])
                                    for s, size in saved[(a, b)].items()}
        dcp.load(request, storage_reader=_reader(self.path, self.weights_only), no_dist=not collective)
        return request


def _copy_range(target: Tensor, start: int, stop: int, saved: dict[tuple[int, int], Tensor]) -> None:
    for (a, b), value in saved.items():
        lo, hi = max(a, start), min(b, stop)
        if lo < hi:
            target[lo - start : hi - start].copy_(value[lo - a : hi - a])


def _index_pieces(loaded: dict[str, Any]) -> dict[str, dict[tuple[int, int], Any]]:
    """Loaded ``name|start:stop`` entries grouped by parameter name, in one pass."""
    out: dict[str, dict[tuple[int, int], Any]] = {}
    for key, value in loaded.items():
        name, a, b = parse_piece_key(key)
        out.setdefault(name, {})[(a, b)] = value
    return out


def _resolve(path: Any) -> Path:
    path = Path(path)
    if not path.exists():
        old = path.with_name(path.name + ".old")
        if is_sharded_checkpoint(old):
            return old  # a crash between the two moves of `save`
        raise FileNotFoundError(f"No checkpoint at {path}.")
    return path


def load_into_engine(path: Any, engine: "ZeroEngine", module: torch.nn.Module,
                     optimizers: list[torch.optim.Optimizer], weights_only: Optional[bool] = None) -> dict[str, Any]:
    """Load a sharded checkpoint of any world size, or a plain Lightning file, into ``engine``'s shards."""
    path = _resolve(path)
    shapes = {n: tuple(p.shape) for n, p in module.named_parameters()}
    if not is_sharded_checkpoint(path):
        full = load_file(path, weights_only, map_location="cpu")
        return _load_full_into_engine(full, engine, module, optimizers)
    index = _Index(path, weights_only)
    index.check_model(shapes)
    if optimizers and len(index.optimizers) != len(optimizers):
        raise ValueError(f"The checkpoint at {path} has {len(index.optimizers)} optimizer(s); the module "
                         f"configures {len(optimizers)}.")
    mine = engine.layout.pieces(engine.rank)
    param_ranges: dict[str, list[tuple[int, int]]] = {}
    for piece in mine:
        param_ranges.setdefault(piece.name, []).append((piece.start, piece.stop))
    state_ranges = {i: {} for i in range(len(optimizers))}
    for i, optimizer in enumerate(optimizers):
        for name, piece, _ in engine.optimizer_pieces(optimizer):
            state_ranges[i].setdefault(name, []).append((piece.start, piece.stop))
    buffers = {n: torch.empty_like(b, device="cpu") for n, b in module.named_buffers() if n in index.model["buffer_names"]}
    loaded = index.read(param_ranges, state_ranges, buffers)
    with torch.no_grad():
        params_loaded = _index_pieces(loaded["state_dict"])
        for piece in mine:
            chunk = engine.chunks[piece.chunk]
            target = chunk.master[piece.shard_offset : piece.shard_offset + piece.numel]
            _copy_range(target, piece.start, piece.stop, params_loaded[piece.name])
        named_buffers = dict(module.named_buffers())
        for n, value in loaded["buffers"].items():
            named_buffers[n].copy_(value)
        for i, optimizer in enumerate(optimizers):
            states = _index_pieces(loaded["optimizer_states"].get(str(i), {}))
            for name, piece, q in engine.optimizer_pieces(optimizer):
                saved = states.get(name)
                if saved:
                    optimizer.state[q] = _state_for_range(saved, piece.start, piece.stop, q.device)
            for group, saved_group in zip(optimizer.param_groups, index.optimizers[i]["param_groups"]):
                group.update(saved_group)
        engine.refresh_compute()
    meta = dict(index.meta)
    meta.pop("lightning_par")
    return meta


def _state_for_range(saved: dict[tuple[int, int], dict[str, Tensor]], start: int, stop: int,
                     device: torch.device) -> dict[str, Tensor]:
    names = next(iter(saved.values())).keys()
    state = {}
    for s in names:
        sample = next(iter(saved.values()))[s]
        if sample.dim() == 0:  # a per-parameter scalar such as Adam's step
            state[s] = sample.clone()
            continue
        target = torch.zeros(stop - start, dtype=sample.dtype)
        _copy_range(target, start, stop, {r: v[s] for r, v in saved.items()})
        state[s] = target.to(device)
    return state


# ----- whole tensors: plain Lightning files in and out ------------------------------------------------------------


def _load_full_into_engine(full: dict[str, Any], engine: "ZeroEngine", module: torch.nn.Module,
                           optimizers: list[torch.optim.Optimizer]) -> dict[str, Any]:
    """A plain Lightning checkpoint (whole tensors, e.g. written by ``dp``) into the shards."""
    load_params_into_engine(full["state_dict"], engine, module)
    load_optimizers_into_engine(full.get("optimizer_states", []), engine, optimizers)
    return {k: v for k, v in full.items() if k not in ("state_dict", "optimizer_states")}


@torch.no_grad()
def load_params_into_engine(state_dict: dict[str, Any], engine: "ZeroEngine", module: torch.nn.Module) -> None:
    """Whole parameters and buffers, by name, into ``engine``'s master shards and ``module``'s buffers."""
    module_state = module.state_dict(keep_vars=True)  # names and shapes only: stage 3 has released the values
    missing = sorted(set(module_state) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(module_state))
    mismatched = sorted(n for n in set(module_state) & set(state_dict) if state_dict[n].shape != module_state[n].shape)
    if missing or unexpected or mismatched:
        raise ValueError(f"The checkpoint was written for a different model: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, different shapes {mismatched[:5]}.")
    for piece in engine.layout.pieces(engine.rank):
        chunk = engine.chunks[piece.chunk]
        flat = state_dict[piece.name].reshape(-1)[piece.start : piece.stop]
        chunk.master[piece.shard_offset : piece.shard_offset + piece.numel].copy_(flat)
    for n, b in module.named_buffers():
        b.copy_(state_dict[n])
    engine.refresh_compute()


@torch.no_grad()
def load_optimizers_into_engine(states: list[dict[str, Any]], engine: "ZeroEngine",
                                optimizers: list[torch.optim.Optimizer]) -> None:
    """Whole optimizer state dicts (numbered as one process numbers them) into the optimizers' pieces."""
    for optimizer, saved in zip(optimizers, states):
        names = [n for group in engine.optimizer_param_names[optimizer] for n in group]
        by_name = {names[i]: s for i, s in saved["state"].items()}
        for name, piece, q in engine.optimizer_pieces(optimizer):
            if name in by_name:
                optimizer.state[q] = {
                    k: (v.clone() if v.dim() == 0 else v.reshape(-1)[piece.start : piece.stop].clone().to(q.device))
                    for k, v in by_name[name].items() if isinstance(v, Tensor)
                }
        for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
            group.update({k: v for k, v in saved_group.items() if k != "params"})


def load_full(path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
    """A sharded checkpoint as a plain Lightning checkpoint dict: whole tensors, optimizer state by index.

    Reads every piece in this one process (no process group needed): for strategies that hold whole parameters
    (``dp``) and for ``consolidate``.
    """
    path = _resolve(path)
    index = _Index(path, weights_only)
    everything = {name: [(0, _numel(shape))] for name, shape in index.model["shapes"].items()}
    states = {i: {name: [(0, _numel(index.model["shapes"][name]))] for name in by_name}
              for i, by_name in index.states.items()}
    buffers = {n: torch.empty(size, dtype=dtype) for n, (size, dtype) in index.buffers.items()}
    saved = index.read(everything, states, buffers, collective=False)
    meta = dict(index.meta)
    info = meta.pop("lightning_par")
    shapes, aliases = info["model"]["shapes"], info["model"]["aliases"]
    state_dict: dict[str, Tensor] = {}
    params_saved = _index_pieces(saved["state_dict"])
    for name, shape in shapes.items():
        numel = _numel(shape)
        full = torch.empty(numel)
        _copy_range(full, 0, numel, params_saved[name])
        state_dict[name] = full.reshape(shape)
    for alias, name in aliases.items():
        state_dict[alias] = state_dict[name]
    state_dict.update(saved.get("buffers", {}))
    optimizer_states = []
    for i, opt in enumerate(info["optimizers"]):
        pieces = _index_pieces(saved.get("optimizer_states", {}).get(str(i), {}))
        names = [n for group in opt["param_names"] for n in group]
        state = {}
        for index, name in enumerate(names):
            mine = pieces.get(name)
            if mine:
                flat = _state_for_range(mine, 0, _numel(shapes[name]), torch.device("cpu"))
                state[index] = {k: (v if v.dim() == 0 else v.reshape(shapes[name])) for k, v in flat.items()}
        groups, start = [], 0
        for group, group_names in zip(opt["param_groups"], opt["param_names"]):
            groups.append({**group, "params": list(range(start, start + len(group_names)))})
            start += len(group_names)
        optimizer_states.append({"state": state, "param_groups": groups})
    return {**meta, "state_dict": state_dict, "optimizer_states": optimizer_states}


def _numel(shape: Any) -> int:
    numel = 1
    for d in shape:
        numel *= d
    return numel


def consolidate(path: Any, out: Any, weights_only: Optional[bool] = None) -> None:
    """Write a sharded checkpoint as one plain Lightning checkpoint file (loads without lightning_par)."""
    torch.save(load_full(path, weights_only), out)


def load_any(path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
    """Any strategy's checkpoint as a plain Lightning checkpoint dict on the CPU: a sharded directory (ZeRO) through
    :func:`load_full`, a single file (``dp``, pipeline, ``tp1d``, one process) through ``torch.load``."""
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
