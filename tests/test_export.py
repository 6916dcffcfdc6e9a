"""Export to a Hugging Face model directory: ``lightning-par-consolidate CKPT OUT --format safetensors`` writes
``model.safetensors`` (names of the Hugging Face model, tied weights once) and ``config.json``, which
``AutoModelForCausalLM.from_pretrained(OUT)`` loads with the trained module's logits.

- a ``zero3`` checkpoint (a sharded directory) of a tiny tied Llama built on the meta device, 2 gloo ranks; the
  config written from HFCausalLM's hyper-parameters;
- ``tp1d`` checkpoints (single files with full tensors) of a tiny untied Llama trained with tensor size 2 on the same
  2 gloo ranks (one launch for both strategies): one written by ``ModelCheckpoint`` during fit (the module sharded,
  its shards gathered for the save), one by ``trainer.save_checkpoint`` after fit (the module whole again); both load
  with the logits of the trained module after fit;
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
from lightning.pytorch.callbacks import LambdaCallback, ModelCheckpoint
from torch.utils.data import DataLoader

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import lightning_par  # noqa: E402,F401
from helpers import free_port, run_on_ranks  # noqa: E402
from lightning_par import TensorParallel1DStrategy  # noqa: E402
from lightning_par.checkpoint import main  # noqa: E402
from lightning_par.export import export_safetensors  # noqa: E402
from lightning_par.demo.hf import HFCausalLM  # noqa: E402
from parity import token_dataset  # noqa: E402

VOCAB = 32
LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=32, tie_word_embeddings=True)
GPT2 = dict(n_embd=32, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            bos_token_id=0, eos_token_id=0)
PROBE = torch.arange(2 * 16).reshape(2, 16) % VOCAB


def _train(strategy, devices, module, ckpt, callbacks=()):
    seed_everything(0, verbose=False)
    trainer = Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=3, logger=False,
                      enable_checkpointing=bool(callbacks), callbacks=list(callbacks), enable_progress_bar=False,
                      enable_model_summary=False)
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


def _tp1d_llama(world_size, tmpdir):
    """Tensor size 2 (an untied Llama: ``lm_head`` exported too). ModelCheckpoint saves after the last step while
    the module is sharded; ``_train`` saves again after fit, when the module is whole (docs/tp1d.md)."""
    module = HFCausalLM(config={**LLAMA, "tie_word_embeddings": False}, vocab_size=VOCAB, optimizer="sgd",
                        learning_rate=0.1)
    during = ModelCheckpoint(dirpath=tmpdir, filename="tp1d_during", every_n_train_steps=3, save_top_k=-1)
    shapes = []  # q_proj's weight on this rank while training: the rows of its shard
    record = LambdaCallback(on_train_batch_end=lambda trainer, pl_module, *_: shapes.append(
        tuple(pl_module.model.model.layers[0].self_attn.q_proj.weight.shape)))
    strategy = TensorParallel1DStrategy(tensor_size=world_size)
    logits = _train(strategy, world_size, module, os.path.join(tmpdir, "tp1d_after.ckpt"), callbacks=[record, during])
    sharded = any("Parallel" in type(m).__name__ for m in module.modules())
    return {"logits": logits, "shapes": shapes, "sharded_after_fit": sharded}


def _both(rank, world_size, port, tmpdir):
    """One launch for the two strategies: zero3, then tp1d, on the same ranks."""
    zero3 = _zero3_llama(rank, world_size, port, os.path.join(tmpdir, "zero3.ckpt"))
    return {"zero3": zero3, "tp1d": _tp1d_llama(world_size, tmpdir)}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The checkpoints written on 2 gloo ranks (one multi-process launch shared by the tests below) and the logits
    of the trained modules on rank 0."""
    tmpdir = tmp_path_factory.mktemp("two_ranks")
    return tmpdir, run_on_ranks(_both, 2, free_port(), str(tmpdir))[0]


def _loaded(out):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(out))


def test_zero3_checkpoint_exports_to_a_hugging_face_directory(two_ranks, tmp_path):
    tmpdir, trained = two_ranks
    ckpt, out, trained = tmpdir / "zero3.ckpt", tmp_path / "hf", trained["zero3"]
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


def test_tp1d_checkpoint_exports_to_a_hugging_face_directory(two_ranks, tmp_path):
    tmpdir, trained = two_ranks
    trained = trained["tp1d"]
    assert trained["shapes"] == [(16, 32)] * 3  # sharded while training (during the first save too)
    assert not trained["sharded_after_fit"]  # the logits below are the whole module's
    from safetensors import safe_open

    for name in ("tp1d_during.ckpt", "tp1d_after.ckpt"):
        ckpt, out = tmpdir / name, tmp_path / name.replace(".ckpt", "")
        # sharded during fit (a directory of pieces); after fit the module is whole (Lightning's single file)
        assert ckpt.is_dir() if name == "tp1d_during.ckpt" else ckpt.is_file()
        main([str(ckpt), str(out), "--format", "safetensors"])
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"], name
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            assert f.get_tensor("lm_head.weight").shape == (VOCAB, LLAMA["hidden_size"]), name  # untied, unpadded
            assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").shape == (32, 32), name
        model = _loaded(out)
        assert type(model).__name__ == "LlamaForCausalLM"
        assert model.lm_head.weight is not model.model.embed_tokens.weight
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=PROBE).logits, trained["logits"], rtol=1e-5, atol=1e-6,
                                       msg=lambda m, name=name: f"{name}: {m}")


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
