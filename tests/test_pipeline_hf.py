"""Hugging Face models (built from a config, nothing downloaded) under the pipeline strategies, split unchanged by
their blocks (``model.model.layers`` of Llama, ``model.transformer.h`` of GPT-2): 1F1B and interleaved at 2 gloo
ranks match one process step by step (fp32, SGD); ``self.print`` after the forward prints on rank 0 once per
microbatch; ``split="trace"`` says to split by blocks; at one device every strategy is distributed as DDP is (a
DistributedSampler for training and predict).

One launch runs every pipelined fit (starting processes is the expensive part), as in test_pipeline.py.
"""

from __future__ import annotations

import contextlib
import io
import os

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, DistributedSampler

pytest.importorskip("transformers")

import lightning_par  # noqa: E402,F401  (registers the strategy names)
from helpers import free_port, run_on_ranks  # noqa: E402
from lightning_par import PipelineStrategy  # noqa: E402
from lightning_par.demo.hf import HFCausalLM  # noqa: E402
from lightning_par.pipeline.partition import PartitionError  # noqa: E402
from parity import Run, fit, relative_gap, token_dataset  # noqa: E402

TOL = 1e-5
VOCAB = 32  # parity.token_dataset's
CONFIGS = {
    # Eager attention: a 4-d causal mask is passed to every layer (and crosses stages with cos/sin and positions).
    "llama": ("LlamaConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=32, attn_implementation="eager")),
    # SDPA: no mask tensor; the tied embedding is held by the first stage and by lm_head on every stage.
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=4, n_head=4, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
                                attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)),
}


class PipelinedHF(HFCausalLM):
    """The user's module: forward calls the Hugging Face model with its defaults and returns ``.logits``; the step
    prints after the forward. Records the step loss Lightning received, on every rank."""

    def __init__(self, arch: str = "llama", printing: bool = False) -> None:
        config_class, config = CONFIGS[arch]
        super().__init__(config=config, config_class=config_class, vocab_size=VOCAB, optimizer="sgd",
                         learning_rate=0.1)
        self.printing = printing
        self.recorded: list[float] = []

    def forward(self, idx):
        return self.model(idx).logits

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        if self.printing:
            self.print(f"step {batch_idx} loss {loss.item():.6f}")
        self.log("train_loss", loss)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.recorded.append(outputs["loss"].item())

    def predict_step(self, batch, batch_idx):
        return self(batch[0])


def _configs():
    configs = {}
    for arch in CONFIGS:
        for schedule in ("1f1b", "interleaved"):  # interleaved: 2 ranks x 2 chunks = 4 parts of one layer
            configs[f"{arch}_{schedule}"] = (PipelineStrategy(schedule=schedule, microbatches=4),
                                             Run(steps=3, module_kwargs={"arch": arch,
                                                                         "printing": schedule == "1f1b"}))
    # Zero bubble's W takes the weight matmuls of nn.Linear (Llama) and of Conv1D's torch.addmm (GPT-2).
    for arch in ("gpt2", "llama"):
        configs[f"{arch}_zero_bubble"] = (PipelineStrategy(schedule="zero_bubble", microbatches=4),
                                          Run(steps=3, module_kwargs={"arch": arch, "printing": False}))
    return configs


def _as_external_rank(rank, world_size, port):
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def _train_all(rank, world_size, port):
    _as_external_rank(rank, world_size, port)
    out = {}
    for name, (strategy, run) in _configs().items():
        trainers = []
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            losses = fit(run, strategy, world_size, data_parallel=1, trainers=trainers, module_class=PipelinedHF)
        out[name] = {"losses": losses, "printed": printed.getvalue(),
                     "layers": sorted(k for k in trainers[0].lightning_module.state_dict() if ".0." in k)[:1]}
    try:
        fit(Run(steps=1, module_kwargs={"arch": "llama"}), PipelineStrategy(split="trace", microbatches=2),
            world_size, 1, module_class=PipelinedHF)
        out["trace"] = "no error"
    except PartitionError as error:
        out["trace"] = str(error)
    return out


def test_hugging_face_llama_and_gpt2_pipelined_match_one_process():
    per_rank = run_on_ranks(_train_all, 2, free_port())
    for name, (_, run) in _configs().items():
        reference = fit(run, "auto", 1, data_parallel=1, module_class=PipelinedHF)
        assert len(reference) == run.steps and reference[-1] < reference[0], (name, reference)
        for rank in range(2):
            ours = per_rank[rank][name]["losses"]
            assert relative_gap(ours, reference) <= TOL, (name, rank, ours, reference)
    # self.print after the forward: the last stage (rank 1) ran it, rank 0 printed it, once per microbatch.
    for name in ("llama_1f1b", "gpt2_1f1b"):
        lines = [line for line in per_rank[0][name]["printed"].splitlines() if line.startswith("step ")]
        assert [line.split(" loss ")[0] for line in lines] == [f"step {s}" for s in range(3) for _ in range(4)], name
        assert all(float(line.split(" loss ")[1]) > 0 for line in lines)
        assert "step " not in per_rank[1][name]["printed"], name
    # The parts hold their own layers: the first layer on rank 0 only.
    assert per_rank[0]["llama_1f1b"]["layers"] and not per_rank[1]["llama_1f1b"]["layers"]
    message = per_rank[0]["trace"]
    assert "Hugging Face model (LlamaForCausalLM)" in message and "split='blocks'" in message
    assert "blocks='model.model.layers'" in message


@pytest.mark.parametrize("arch", sorted(CONFIGS))
@pytest.mark.parametrize("parts", [2, 4])
def test_parts_of_a_hugging_face_model_compose_to_the_full_model(arch, parts):
    """In one process: the parts, each run by the model's own forward with what the previous one sent (hidden
    state, and the other tensors passed to the layers), give the full model's logits."""
    import copy

    from lightning_par.pipeline.partition import Partition, StageExit, choose_split_points, find_blocks

    torch.manual_seed(0)
    full = PipelinedHF(arch)
    x = torch.randint(0, VOCAB, (2, 16))
    expected = full(x)
    layout = find_blocks(full)
    assert layout.blocks_path == {"llama": "model.model.layers", "gpt2": "model.transformer.h"}[arch]
    starts = choose_split_points(full, layout, parts)
    partitions = [Partition(copy.deepcopy(full), layout, starts, [k]) for k in range(parts)]
    received = None
    for k, partition in enumerate(partitions):
        with partition.stage(k, received):
            try:
                out = partition.module(x)
            except StageExit as stop:
                sent = stop.output
                # The hidden state, then Llama's mask, cos, sin and position ids; GPT-2's position ids (SDPA: no mask).
                assert isinstance(sent, tuple) and len(sent) == (5 if arch == "llama" else 2)
                received = tuple(t.detach() for t in sent)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    with partitions[0].stage(0):
        with pytest.raises(RuntimeError, match="only a slice over all of them"):
            partitions[0].blocks[1:]


@pytest.mark.parametrize("strategy", ["dp", "zero3", "pipeline"])
def test_one_device_is_distributed_as_ddp(strategy):
    """Lightning's DDP is distributed at any world size: a DistributedSampler for training (shuffled, seeded) and
    for predict (the indices tracked). Ours too, so that one device behaves as N do."""
    environ = dict(os.environ)
    try:
        trainer = Trainer(accelerator="cpu", devices=1, strategy=strategy, max_steps=1, logger=False,
                          enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        assert trainer.strategy.is_distributed and trainer._accelerator_connector.is_distributed
        module = PipelinedHF("gpt2")
        trainer.fit(module, DataLoader(token_dataset(8), batch_size=4))
        assert isinstance(trainer.train_dataloader.sampler, DistributedSampler)
        predictions = trainer.predict(module, DataLoader(token_dataset(6), batch_size=2))
        sampler = trainer.predict_dataloaders.batch_sampler.sampler  # inside Lightning's index-tracking wrapper
        assert isinstance(sampler, DistributedSampler) and not sampler.shuffle
        assert len(predictions) == 3 and predictions[0].shape == (2, 16, VOCAB)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)
