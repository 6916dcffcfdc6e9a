"""lightning_par: parallel training strategies of the Colossal-AI family for PyTorch Lightning.

Importing the package registers the strategy names (``Trainer(strategy="dp")``).
"""

from lightning_par.strategies import (
    ComposedStrategy,
    DataParallelStrategy,
    HybridParallelStrategy,
    LightningParStrategy,
    PipelineStrategy,
    TensorParallel1DStrategy,
    TensorParallel2DStrategy,
    TensorParallel2p5DStrategy,
    TensorParallel3DStrategy,
    ZeroStrategy,
    register_all,
)
from lightning_par.topology import Topology

register_all()

__version__ = "0.1.0"
__all__ = [
    "ComposedStrategy",
    "DataParallelStrategy",
    "HybridParallelStrategy",
    "LightningParStrategy",
    "PipelineStrategy",
    "TensorParallel1DStrategy",
    "TensorParallel2DStrategy",
    "TensorParallel2p5DStrategy",
    "TensorParallel3DStrategy",
    "Topology",
    "ZeroStrategy",
    "__version__",
]
