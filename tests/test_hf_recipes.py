"""The Hugging Face recipes end to end: `lightning-par fit --config recipes/hf_llama_<strategy>.yaml`, 2 CPU ranks
through Lightning's default (popen) launcher, shortened to a few steps; the loss falls, a checkpoint is written, and
it exports to a directory that `AutoModelForCausalLM.from_pretrained` loads."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from helpers import run_recipe  # noqa: E402


def _export_and_load(root, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from lightning_par.checkpoint import main

    last = next(p for p in root.rglob("last.ckpt"))
    out = tmp_path / "hf"
    main([str(last), str(out), "--format", "safetensors"])
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == 65
    with torch.no_grad():
        logits = model(input_ids=torch.zeros(1, 8, dtype=torch.long)).logits
    assert logits.shape == (1, 8, 65) and torch.isfinite(logits).all()


@pytest.mark.parametrize("recipe", ["hf_llama_zero3", "hf_llama_tp1d"])
def test_hugging_face_recipe_trains_and_exports(recipe, tmp_path):
    output, losses, root = run_recipe(recipe, tmp_path, max_steps=20)
    assert len(losses) >= 3 and losses[-1] < losses[0], (losses, output[-2000:])
    _export_and_load(root, tmp_path)
