"""Lightning strategies, one class per method family, all on the base strategy."""

from lightning_par.strategies.base import LightningParStrategy
from lightning_par.strategies.data_parallel import DataParallelStrategy

STRATEGIES = (DataParallelStrategy,)


def register_all() -> None:
    """Register every public name with Lightning's registry; safe to call again (names are overridden)."""
    from lightning.pytorch.strategies import StrategyRegistry

    for strategy in STRATEGIES:
        strategy.register_strategies(StrategyRegistry)


__all__ = ["DataParallelStrategy", "LightningParStrategy", "STRATEGIES", "register_all"]
