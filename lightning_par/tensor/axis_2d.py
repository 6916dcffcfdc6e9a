"""The 2D tensor axis (SUMMA) as a component of the composed strategy, with the interface of the 1D one
(``tensor/axis.py``): the module cut by the automatic 2D plan (``tensor/plan_2d.py``) over a q x q grid of the
innermost ranks, its gradients' parts of the global norm, its checkpoint boxes, and the module made whole again.

Every gradient is final when autograd ends: SUMMA's reduces give each rank its weight blocks, and the vectors a
column shares are summed over it inside backward (``copy_to_group``), so the hooks after backward have nothing to
do here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.distributed as dist
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_par.comm.buckets import broadcast_module
from lightning_par.comm.grad_norm import NormPart
from lightning_par.comm.summa import Grid2D
from lightning_par.tensor.auto_plan import auto_plan
from lightning_par.tensor.axis import Groups, materialize_whole, share_rng_state
from lightning_par.tensor.layers_2d import cut_2d
from lightning_par.tensor.plan_2d import applied_plan_2d, parallelize_2d, unparallelize_2d
from lightning_par.tensor.styles import divisors
from lightning_par.zero.pieces import Placement

if TYPE_CHECKING:
    from lightning_par.zero.engine import ZeroEngine


class TensorAxis2D:
    """Cuts a module over a q x q grid by the automatic 2D plan; with ``depth`` d > 1, over d stacked grids (2.5D,
    Tesseract: every layer holds the weights, each works on 1/d of the samples). ``who`` / ``owner`` name the
    strategy in messages; ``param_init_fn`` initialises a meta-built module (as for ``tp1d``)."""

    def __init__(self, *, param_init_fn: Optional[Callable[[nn.Module], None]], who: str, owner: str,
                 depth: int = 1) -> None:
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
            raise ValueError(f"depth must be a positive integer; got {depth!r}.")
        self.depth = depth
        self.mode = "2.5d" if depth > 1 else "2d"
        self.param_init_fn = param_init_fn
        self.who, self.owner = who, owner
        self.sharded_here = False
        self.failed = False
        self._tensor_group: Optional[dist.ProcessGroup] = None

    def default_size(self, module: Optional[nn.Module], ranks: int) -> int:
        """The largest d * q^2 dividing ``ranks`` whose q divides every head count and width the plan splits (d
        itself when ``ranks`` has no room for more, so that the topology's error names what would fit)."""
        existing = applied_plan_2d(module) if module is not None else None
        if existing is not None:
            return existing.grid.d * existing.grid.q ** 2
        divisor = auto_plan(module).divisor() if module is not None else 0
        d = self.depth
        return max([d * q * q for q in divisors(ranks) if ranks % (d * q * q) == 0
                    and (divisor == 0 or divisor % q == 0)] or [d])

    def shard(self, module: nn.Module, group_of: Callable[[str], dist.ProcessGroup], size: int,
              device: torch.device) -> None:
        self._tensor_group = group_of("tensor")
        if self.depth > 1:
            grid = Grid2D(row_group=group_of("tensor_col"), col_group=group_of("tensor_row"),
                          depth_group=group_of("tensor_depth"), layer_group=group_of("tensor_layer"),
                          stack_group=group_of("tensor_stack"))
        else:
            grid = Grid2D(row_group=group_of("tensor_col"), col_group=group_of("tensor_row"))
        existing = applied_plan_2d(module)
        if existing is not None:
            if existing.grid.q != grid.q:
                raise ValueError(f"This module was cut for a {existing.grid.q} x {existing.grid.q} grid; build a new "
                                 f"module to train it on {grid.q} x {grid.q}.")
            _rebind(module, existing.grid, grid)
            existing.grid = grid
        else:
            materialize_whole(module, device, self.param_init_fn, self.who, self.owner)
            broadcast_module(module, self._tensor_group)  # every rank of the grid cuts the same whole weights
            parallelize_2d(module, grid)
            self.sharded_here = True
            self.failed = False
            rank_zero_info(applied_plan_2d(module).describe())
        share_rng_state(self._tensor_group, device)

    # ----- gradients: final after autograd (see the module docstring) ----------------------------------------------

    @staticmethod
    def keep_replicated_of(module: nn.Module) -> None:
        pass

    @staticmethod
    def before_backward(module: nn.Module) -> None:
        pass

    @staticmethod
    def finish_weight_grads(module: nn.Module) -> None:
        pass

    @staticmethod
    def sum_replicated_grads(module: nn.Module) -> None:
        pass

    @staticmethod
    def zero_replicated(module: nn.Module, engine: "ZeroEngine", device: torch.device) -> None:
        pass

    @staticmethod
    def clear(module: nn.Module) -> None:
        pass

    def norm_parts(self, module: nn.Module, grads: list[tuple[nn.Parameter, torch.Tensor]], others: Groups = (),
                   counted: bool = True) -> list[NormPart]:
        """A parameter cut over the whole grid is summed over the tensor group and ``others``; a vector a column
        shares, over the row (each column's block once) and ``others``; anything else over ``others``."""
        applied = applied_plan_2d(module)
        spread = {id(p): (cut.spread if (cut := cut_2d(p)) is not None else None) for p, _ in grads}
        row = (applied.grid.row_group,) if applied is not None else ()
        # One layer's q x q ranks hold each piece once (2.5D's other layers hold the same pieces).
        layer = applied.grid.layer_group if applied is not None and applied.grid.d > 1 else self._tensor_group
        return [NormPart([g for p, g in grads if spread[id(p)] == "grid"], (layer, *others), counted),
                NormPart([g for p, g in grads if spread[id(p)] == "row"], (*row, *others), counted),
                NormPart([g for p, g in grads if spread[id(p)] is None], others, counted)]

    # ----- checkpoints and teardown -------------------------------------------------------------------------------

    @staticmethod
    def placement(module: nn.Module) -> Optional[Placement]:
        applied = applied_plan_2d(module)
        if applied is None:
            return None
        grid = applied.grid
        return lambda p: (cut.boxes(grid), 0) if (cut := cut_2d(p)) is not None else None

    def unshard(self, module: Optional[nn.Module], optimizers: list[torch.optim.Optimizer]) -> None:
        if module is None or not self.sharded_here or applied_plan_2d(module) is None:
            return
        if self.failed:
            rank_zero_warn(f"{self.who}: training failed; the module is left cut (its parameters hold this rank's "
                           "2D pieces).")
        else:
            unparallelize_2d(module, optimizers)
        self.sharded_here = False


def _rebind(module: nn.Module, old: Grid2D, new: Grid2D) -> None:
    """Point every 2D layer at the groups of a new mesh (a second ``fit`` on another Trainer)."""
    for m in module.modules():
        if getattr(m, "grid", None) is old:
            m.grid = new
