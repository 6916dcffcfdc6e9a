"""Lightning strategies: one composed strategy (``composed.py``) and its presets, one class per method family."""

from lightning_par.strategies.base import LightningParStrategy
from lightning_par.strategies.composed import ComposedStrategy
from lightning_par.strategies.data_parallel import DataParallelStrategy
from lightning_par.strategies.hybrid import HybridParallelStrategy
from lightning_par.strategies.pipeline import PipelineStrategy
from lightning_par.strategies.tensor_parallel import TensorParallel1DStrategy
from lightning_par.strategies.tensor_parallel_2d import (
    TensorParallel2DStrategy,
    TensorParallel2p5DStrategy,
    TensorParallel3DStrategy,
)
from lightning_par.strategies.registry import PRESETS, register_all
from lightning_par.strategies.zero import ZeroStrategy

__all__ = ["ComposedStrategy", "DataParallelStrategy", "HybridParallelStrategy", "LightningParStrategy", "PipelineStrategy", "PRESETS",
           "TensorParallel1DStrategy", "TensorParallel2DStrategy", "TensorParallel2p5DStrategy",
           "TensorParallel3DStrategy",
           "ZeroStrategy", "register_all"]
