"""Export to a Hugging Face model directory: ``lightning-par-consolidate CKPT OUT --format safetensors`` writes
``model.safetensors`` (names of the Hugging Face model, tied weights once) and ``config.json``, which
``AutoModelForCausalLM.from_pretrained(OUT)`` loads with the trained module's logits.

- a ``zero3`` checkpoint (a sharded directory) of a tiny tied Llama built on the meta device, 2 gloo ranks; the
  config written from HFCausalLM's hyper-parameters;
- a single-file checkpoint (as ``dp``, pipeline and ``tp1d`` write) of a tiny GPT-2, in one process, with
  ``--hf-config`` and ``--dtype bfloat16``;
- the errors: a prefix that matches nothing, safetensors missing.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from torch.utils.data import DataLoader

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import lightning_par  # noqa: E402,F401
from helpers import free_port, run_on_ranks  # noqa: E402
from lightning_par.checkpoint import export_safetensors, main  # noqa: E402
from lightning_par.demo.hf import HFCausalLM  # noqa: E402
from parity import token_dataset  # noqa: E402

VOCAB = 32
LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=32, tie_word_embeddings=True)
GPT2 = dict(n_embd=32, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            bos_token_id=0, eos_token_id=0)
PROBE = torch.arange(2 * 16).reshape(2, 16) % VOCAB


def _train(strategy, devices, module, ckpt):
    seed_everything(0, verbose=False)
    trainer = Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=3, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(token_dataset(24, vocab=VOCAB), batch_size=4))
    trainer.save_checkpoint(ckpt)
    with torch.no_grad():
        return module.model(input_ids=PROBE).logits


def _zero3_llama(rank, world_size, port, ckpt):
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    # Built in configure_model: under zero3 the parameters start on the meta device.
    module = HFCausalLM(config=LLAMA, vocab_size=VOCAB, build_in_configure_model=True, optimizer="sgd",
                        learning_rate=0.1)
    return _train("zero3", world_size, module, ckpt)


def _loaded(out):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(out))


def test_zero3_checkpoint_exports_to_a_hugging_face_directory(tmp_path):
    ckpt, out = tmp_path / "zero3.ckpt", tmp_path / "hf"
    trained = run_on_ranks(_zero3_llama, 2, free_port(), str(ckpt))[0]
    assert ckpt.is_dir()  # a sharded checkpoint
    main([str(ckpt), str(out), "--format", "safetensors"])
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names  # tied: written once
    model = _loaded(out)
    assert type(model).__name__ == "LlamaForCausalLM" and model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=PROBE).logits, trained, rtol=1e-5, atol=1e-6)


def test_single_file_checkpoint_exports_with_a_given_config_and_dtype(tmp_path):
    ckpt, out, config_dir = tmp_path / "single.ckpt", tmp_path / "hf", tmp_path / "config"
    module = HFCausalLM(config=GPT2, config_class="GPT2Config", vocab_size=VOCAB, optimizer="sgd", learning_rate=0.1)
    trained = _train("auto", 1, module, ckpt)
    module.model.config.save_pretrained(str(config_dir))
    main([str(ckpt), str(out), "--format", "safetensors", "--hf-config", str(config_dir)])
    model = _loaded(out)
    assert type(model).__name__ == "GPT2LMHeadModel" and model.lm_head.weight is model.transformer.wte.weight
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=PROBE).logits, trained, rtol=1e-5, atol=1e-6)
    half = tmp_path / "bf16"
    export_safetensors(ckpt, half, hf_config=config_dir / "config.json", dtype=torch.bfloat16)
    _loaded(half)
    from safetensors import safe_open

    with safe_open(str(half / "model.safetensors"), "pt") as f:
        assert f.get_tensor("transformer.wte.weight").dtype == torch.bfloat16
    # The plain format still writes one Lightning checkpoint file, from a file too.
    main([str(ckpt), str(tmp_path / "plain.ckpt")])
    assert torch.load(tmp_path / "plain.ckpt", weights_only=False)["state_dict"].keys() == \
        torch.load(ckpt, weights_only=False)["state_dict"].keys()


def test_export_errors(tmp_path, monkeypatch):
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": {"net.weight": torch.ones(2)}}, ckpt)
    with pytest.raises(ValueError, match=r"prefix='model\.'.*\['net\.'\]"):
        export_safetensors(ckpt, tmp_path / "out")
    out = tmp_path / "out2"
    export_safetensors(ckpt, out, prefix="net.")
    assert (out / "model.safetensors").exists() and not (out / "config.json").exists()
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match=r"pip install lightning-par\[hf\]"):
        export_safetensors(ckpt, tmp_path / "out3", prefix="net.")
