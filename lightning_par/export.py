"""Export any strategy's checkpoint as a Hugging Face model directory (``model.safetensors`` + ``config.json``).

[Note: export to safetensors]
``export_safetensors`` writes the module's weights as a Hugging Face model directory: ``model.safetensors`` holds
the consolidated state dict's entries under ``prefix`` (the LightningModule attribute holding the model, "model."
by default) with the prefix removed, so the names are the Hugging Face model's own; ``config.json`` comes from
``hf_config`` (a config.json file or a directory holding one), or else is written from the checkpoint's
hyper-parameters when the module is lightning_par.demo.hf.HFCausalLM (or has its ``config`` / ``config_class``
hyper-parameters). Tied weights (one tensor under two names, e.g. ``lm_head.weight`` and
``model.embed_tokens.weight``) are written once, under the first name in state-dict order: the input embedding,
which is the name ``save_pretrained`` keeps (it drops the keys of ``_tied_weights_keys``); ``from_pretrained``
ties the other back. The export reads the consolidated state dict only, so it works for every strategy.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_par.checkpoint import load_any

__all__ = ["export_safetensors"]


def _strip_prefix(state_dict: dict[str, Any], prefix: str) -> dict[str, Tensor]:
    tensors = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix) and isinstance(v, Tensor)}
    if not tensors:
        heads = sorted({k.split(".", 1)[0] + "." for k in state_dict})
        raise ValueError(f"No entry of the checkpoint's state dict starts with prefix={prefix!r}; its top-level "
                         f"prefixes are {heads}. Pass --prefix with the attribute that holds the model.")
    return tensors


def _single_copies(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """One entry per shared tensor (tied weights: the first name in order); other overlapping views are copied,
    since safetensors refuses tensors that share memory."""
    out: dict[str, Tensor] = {}
    seen: dict[tuple, str] = {}
    storages: dict[int, str] = {}
    for name, t in tensors.items():
        if t.device.type == "meta":
            raise ValueError(f"{name} is on the meta device; the checkpoint holds no values for it.")
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            continue  # a tied weight: written once
        if t.numel():
            seen[key] = name
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in storages:
            t = t.clone()  # a different view of a tensor already written
        elif t.numel():
            storages[ptr] = name
        out[name] = t.detach().contiguous()
    return out


def _hf_config_from_hyper_parameters(hparams: Any) -> Any:
    """A transformers config from HFCausalLM's hyper-parameters (``config`` dict, ``config_class``), else None."""
    if not isinstance(hparams, dict) or not isinstance(hparams.get("config"), dict) or "config_class" not in hparams:
        return None
    from lightning_par.demo.hf import build_config, model_config

    config = model_config(hparams["config"], hparams.get("vocab_size"), hparams.get("block_size"))
    return build_config(config, hparams["config_class"])


def export_safetensors(checkpoint: Any, out_dir: Any, prefix: str = "model.", hf_config: Optional[Any] = None,
                       dtype: Optional[torch.dtype] = None, weights_only: Optional[bool] = None) -> Path:
    """Write ``out_dir/model.safetensors`` (and ``config.json`` when known) from any strategy's checkpoint so that
    ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads it. See [Note: export to safetensors]. Returns the
    safetensors file's path."""
    try:
        from safetensors.torch import save_file
    except ImportError as error:
        raise ImportError("--format safetensors needs the safetensors package: pip install lightning-par[hf] "
                          "(or pip install safetensors).") from error
    full = load_any(checkpoint, weights_only)
    tensors = _single_copies(_strip_prefix(full["state_dict"], prefix))
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "model.safetensors"
    save_file(tensors, str(target), metadata={"format": "pt"})
    config_file = out / "config.json"
    if hf_config is not None:
        source = Path(hf_config)
        source = source / "config.json" if source.is_dir() else source
        if not source.is_file():
            raise FileNotFoundError(f"--hf-config {hf_config}: no config.json there.")
        if source.resolve() != config_file.resolve():
            shutil.copyfile(source, config_file)
    else:
        config = _hf_config_from_hyper_parameters(full.get("hyper_parameters"))
        if config is not None:
            if dtype is not None:
                config.torch_dtype = str(dtype).removeprefix("torch.")
            config.save_pretrained(str(out))
    return target
