"""Lightning strategies, one class per method family, all on the base strategy."""

from lightning_par.strategies.base import LightningParStrategy
from lightning_par.strategies.data_parallel import DataParallelStrategy
from lightning_par.strategies.pipeline import PipelineStrategy
from lightning_par.strategies.tensor_parallel import TensorParallel1DStrategy
from lightning_par.strategies.zero import ZeroStrategy

STRATEGIES = (DataParallelStrategy, ZeroStrategy, TensorParallel1DStrategy, PipelineStrategy)


def register_all() -> None:
    """Register every public name with Lightning's registry; safe to call again (names are overridden)."""
    from lightning.pytorch.strategies import StrategyRegistry

    for strategy in STRATEGIES:
        strategy.register_strategies(StrategyRegistry)


__all__ = ["DataParallelStrategy", "LightningParStrategy", "PipelineStrategy", "STRATEGIES", "TensorParallel1DStrategy",
           "ZeroStrategy", "register_all"]
