"""Every registered strategy name, in one table: ``Trainer(strategy="zero3_offload")``.

Each preset is a strategy class with fixed arguments; each is registered once per start method, with the suffix
Lightning uses for its own names (``ddp``, ``ddp_spawn``, ``ddp_fork``). Adding a method means adding rows here,
not another registration loop.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from typing import Any

from lightning_par.strategies.base import LightningParStrategy
from lightning_par.strategies.data_parallel import DataParallelStrategy
from lightning_par.strategies.hybrid import HybridParallelStrategy
from lightning_par.strategies.pipeline import PipelineStrategy
from lightning_par.strategies.tensor_parallel import TensorParallel1DStrategy
from lightning_par.strategies.tensor_parallel_2d import (
    TensorParallel2DStrategy,
    TensorParallel2p5DStrategy,
    TensorParallel3DStrategy,
)
from lightning_par.strategies.zero import ZeroStrategy

START_METHODS = {"": "popen", "_spawn": "spawn", "_fork": "fork"}


@dataclass(frozen=True)
class Preset:
    name: str
    strategy: type[LightningParStrategy]
    description: str
    arguments: dict[str, Any] = field(default_factory=dict)


PRESETS = (
    Preset("dp", DataParallelStrategy, "data parallel (bucketed all-reduce)"),
    Preset("hybrid", HybridParallelStrategy, "data x pipeline x tensor parallel, ZeRO over the data axis"),
    Preset("zero1", ZeroStrategy, "ZeRO stage 1: optimizer state sharded", {"stage": 1}),
    Preset("zero2", ZeroStrategy, "ZeRO stage 2: optimizer state and gradients sharded", {"stage": 2}),
    Preset("zero3", ZeroStrategy, "ZeRO stage 3: optimizer state, gradients and parameters sharded", {"stage": 3}),
    Preset("zero2_offload", ZeroStrategy, "ZeRO-Offload: stage 2, optimizer state and step on the host",
           {"stage": 2, "offload": 1.0}),
    Preset("zero3_offload", ZeroStrategy, "ZeRO stage 3, chunks placed across device and host automatically",
           {"stage": 3, "offload": "auto"}),
    Preset("zero3_nvme", ZeroStrategy, "ZeRO-Infinity: stage 3, optimizer state spilled to NVMe (the temp dir)",
           {"stage": 3, "offload": "auto", "nvme_dir": tempfile.gettempdir()}),
    Preset("tp1d", TensorParallel1DStrategy, "1D tensor parallel (Megatron) x data parallel"),
    Preset("tp2d", TensorParallel2DStrategy, "2D tensor parallel (SUMMA) x data parallel"),
    Preset("tp2.5d", TensorParallel2p5DStrategy, "2.5D tensor parallel (Tesseract) x data parallel"),
    Preset("tp3d", TensorParallel3DStrategy, "3D tensor parallel (a q x q x q cube) x data parallel"),
    Preset("pipeline", PipelineStrategy, "pipeline parallel, 1F1B schedule", {"schedule": "1f1b"}),
    Preset("pipeline_gpipe", PipelineStrategy, "pipeline parallel, GPipe schedule", {"schedule": "gpipe"}),
    Preset("pipeline_interleaved", PipelineStrategy, "pipeline parallel, interleaved 1F1B schedule",
           {"schedule": "interleaved"}),
    Preset("pipeline_zero_bubble", PipelineStrategy, "pipeline parallel, zero-bubble (ZB-H1) schedule",
           {"schedule": "zero_bubble"}),
    Preset("pipeline_chimera", PipelineStrategy, "pipeline parallel, Chimera schedule", {"schedule": "chimera"}),
)


def register_all() -> None:
    """Register every preset under every start method with Lightning's registry; safe to call again (names are
    overridden)."""
    from lightning.pytorch.strategies import StrategyRegistry

    for preset in PRESETS:
        for suffix, start_method in START_METHODS.items():
            StrategyRegistry.register(
                preset.name + suffix,
                preset.strategy,
                description=f"lightning_par {preset.description}, start_method='{start_method}'",
                override=True,  # importing twice must not fail
                start_method=start_method,
                **preset.arguments,
            )
