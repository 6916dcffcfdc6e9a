"""Hugging Face Llama and GPT-2 (built from configs, nothing downloaded) under `hybrid` on 4 gloo ranks: the tp1d
plan cuts the model, then the pipeline splits the cut model by its layers (pipeline 2 x tensor 2), or ZeRO-3 shards
it over the data axis (data 2 x tensor 2); each matches one process step by step (fp32, SGD)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from helpers import free_port, run_on_ranks  # noqa: E402
from lightning_par import HybridParallelStrategy  # noqa: E402
from parity import Run, fit, global_losses, relative_gap  # noqa: E402
from test_dp import _as_external_rank  # noqa: E402
from test_pipeline_hf import PipelinedHF  # noqa: E402

TOL = 1e-5
WORLD = 4


def _configs() -> dict[str, tuple[dict, str]]:
    """name -> (hybrid's arguments, architecture)."""
    return {
        "llama_p2_t2": (dict(pipeline_size=2, tensor_size=2, microbatches=4), "llama"),
        "gpt2_p2_t2": (dict(pipeline_size=2, tensor_size=2, microbatches=4), "gpt2"),
        "llama_d2_t2_zero3": (dict(tensor_size=2, zero_stage=3), "llama"),
    }


def _run(arch: str) -> Run:
    return Run(steps=3, module_kwargs={"arch": arch})


def _data(arguments: dict) -> int:
    return HybridParallelStrategy(**arguments).topology_for(WORLD).data


def _train(rank: int, world: int, port: int) -> dict:
    _as_external_rank(rank, world, port)
    return {name: fit(_run(arch), HybridParallelStrategy(**arguments), world, _data(arguments),
                      module_class=PipelinedHF)
            for name, (arguments, arch) in _configs().items()}


def test_hugging_face_models_under_hybrid_match_one_process():
    per_rank = run_on_ranks(_train, WORLD, free_port())
    for name, (arguments, arch) in _configs().items():
        data = _data(arguments)
        replicas = [d * WORLD // data for d in range(data)]  # data is the outermost axis
        ours = global_losses([r[name] for r in per_rank], data, ranks=replicas)
        reference = fit(_run(arch), "auto", 1, data, module_class=PipelinedHF)
        assert reference[-1] < reference[0]
        assert relative_gap(ours, reference) <= TOL, (name, ours, reference)
