"""A Hugging Face causal language model built from its config (nothing downloaded), as a LightningModule.

``HFCausalLM`` is what ``recipes/hf_llama_zero3.yaml`` and ``recipes/hf_llama_tp1d.yaml`` train through
``lightning-par fit`` on the bundled character corpus (:mod:`lightning_par.demo.data`), and the shape of a user's own
module: ``forward`` calls the Hugging Face model and returns ``.logits``, the step is the next-token cross-entropy.
Nothing here is specific to a strategy; see ``docs/huggingface.md``.

``transformers`` is imported when the model is built, so the package works without it (``pip install
lightning-par[hf]`` installs it).
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch

from lightning_par.demo.model import CausalLMSteps

__all__ = ["HFCausalLM", "build_causal_lm", "build_config", "model_config"]


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as error:  # pragma: no cover - the tests run with transformers installed
        raise ImportError("HFCausalLM builds a Hugging Face model: pip install lightning-par[hf] "
                          "(or pip install transformers).") from error
    return transformers


def model_config(config: Optional[dict[str, Any]], vocab_size: Optional[int] = None,
                 block_size: Optional[int] = None) -> dict[str, Any]:
    """The configuration arguments: ``config`` with the data's ``vocab_size`` and, when ``config`` sets no maximum
    length, ``max_position_embeddings = block_size``."""
    config = dict(config or {})
    if vocab_size is not None:
        config["vocab_size"] = vocab_size
    if block_size is not None and not {"max_position_embeddings", "n_positions"} & set(config):
        config["max_position_embeddings"] = block_size
    return config


def build_config(config: dict[str, Any], config_class: str = "LlamaConfig") -> Any:
    """``ConfigClass(**config)``: ``config_class`` is a configuration class of ``transformers`` (``"LlamaConfig"``,
    ``"GPT2Config"``) or a model type (``"llama"``, ``"gpt2"``). The key ``attn_implementation`` (``"eager"``,
    ``"sdpa"``) sets the model's attention."""
    transformers = _transformers()
    kwargs = dict(config)
    attn = kwargs.pop("attn_implementation", None)
    cls = getattr(transformers, config_class, None)
    if isinstance(cls, type) and issubclass(cls, transformers.PretrainedConfig):
        hf_config = cls(**kwargs)
    else:
        try:
            hf_config = transformers.AutoConfig.for_model(config_class, **kwargs)
        except ValueError as error:
            raise ValueError(f"config_class={config_class!r} is neither a transformers configuration class (e.g. "
                             "'LlamaConfig') nor a model type (e.g. 'llama').") from error
    if attn is not None:
        hf_config._attn_implementation = attn
    return hf_config


def build_causal_lm(config: dict[str, Any], config_class: str = "LlamaConfig") -> torch.nn.Module:
    """``AutoModelForCausalLM.from_config(build_config(config, config_class))``."""
    return _transformers().AutoModelForCausalLM.from_config(build_config(config, config_class))


class HFCausalLM(CausalLMSteps):
    """A Hugging Face causal LM built from ``config`` (the keyword arguments of ``config_class``), trained on
    next-token cross-entropy.

    Args:
        config: arguments of the configuration class, e.g. ``{"hidden_size": 128, "num_hidden_layers": 4, ...}``.
        config_class: ``"LlamaConfig"`` (default), any configuration class of ``transformers`` or a model type.
        vocab_size: the data's vocabulary (linked by ``lightning-par`` from the corpus); sets ``config["vocab_size"]``.
        block_size: the data's sequence length (linked by ``lightning-par``); sets ``max_position_embeddings``
            when ``config`` does not.
        build_in_configure_model: build the model in ``configure_model`` instead of ``__init__``: under ``zero3``
            its parameters are then created on the meta device and initialised chunk by chunk with the model's own
            ``_init_weights`` (see docs/zero.md), so the whole model never exists on one device.
        learning_rate, weight_decay, optimizer: AdamW (decay on matrices only) or SGD with momentum 0.9.
    """

    def __init__(
        self,
        config: Optional[dict[str, Any]] = None,
        config_class: str = "LlamaConfig",
        vocab_size: Optional[int] = None,
        block_size: Optional[int] = None,
        build_in_configure_model: bool = False,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.1,
        optimizer: Literal["adamw", "sgd"] = "adamw",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not build_in_configure_model:
            self.model = self._build()

    def _build(self) -> torch.nn.Module:
        hp = self.hparams
        return build_causal_lm(model_config(hp.config, hp.vocab_size, hp.block_size), hp.config_class)

    def configure_model(self) -> None:
        if getattr(self, "model", None) is None:
            self.model = self._build()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=idx, use_cache=False).logits
