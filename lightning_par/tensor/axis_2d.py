"""The 2D tensor axis (SUMMA) as a component of the composed strategy, with the interface of the 1D one
(``tensor/axis.py``): the module cut by the automatic 2D plan (``tensor/plan_2d.py``) over a q x q grid of the
innermost ranks, its gradients' parts of the global norm, its checkpoint boxes, and the module made whole again.

Every gradient is final when autograd ends: SUMMA's reduces give each rank its weight blocks, and the vectors a
column shares are summed over it inside backward (``copy_to_group``), so the hooks after backward have nothing to
do here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional, Union

import torch
import torch.distributed as dist
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_par.comm.buckets import broadcast_module
from lightning_par.comm.grad_norm import NormPart
from lightning_par.comm.cube import Grid3D
from lightning_par.comm.summa import Grid2D
from lightning_par.tensor.auto_plan import auto_plan
from lightning_par.tensor.axis import Groups, materialize_whole, share_rng_state
from lightning_par.tensor.grid_cut import grid_cut
from lightning_par.tensor.plan_2d import applied_plan_2d, misfit_widths, parallelize_2d, unparallelize_2d
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
        if who == "tp2.5d" and depth == 1:
            raise ValueError("tp2.5d stacks depth >= 2 grids; depth=1 is one grid: use tp2d, or give depth=2 or more.")
        self.depth = depth
        self.mode = "2.5d" if depth > 1 else "2d"
        self.param_init_fn = param_init_fn
        self.who, self.owner = who, owner
        self.sharded_here = False
        self.failed = False
        self._tensor_group: Optional[dist.ProcessGroup] = None

    def default_size(self, module: Optional[nn.Module], ranks: int) -> int:
        """The largest d * q^2 dividing ``ranks`` whose q divides every head count and width the plan cuts (d
        itself when ``ranks`` has no room for more, so that the topology's error names what would fit)."""
        existing = applied_plan_2d(module) if module is not None else None
        if existing is not None:
            return existing.grid.ranks
        fits = _fitting(module, self.cube)
        return max([self._tensor_size(q) for q in divisors(ranks) if ranks % self._tensor_size(q) == 0 and fits(q)]
                   or [self.depth])

    cube = False  # the 3D axis below: a q x q x q cube

    def _tensor_size(self, q: int) -> int:
        return self.depth * q * q

    def shard(self, module: nn.Module, group_of: Callable[[str], dist.ProcessGroup], size: int,
              device: torch.device) -> None:
        self._tensor_group = group_of("tensor")
        grid = self._grid(group_of)
        existing = applied_plan_2d(module)
        if existing is not None:
            if type(existing.grid) is not type(grid) or (existing.grid.q, existing.grid.d) != (grid.q, grid.d):
                raise ValueError(f"This module was cut for the {existing.grid.label}; build a new module to train it "
                                 f"on the {grid.label}.")
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

    def _grid(self, group_of: Callable[[str], dist.ProcessGroup]) -> Union[Grid2D, Grid3D]:
        if self.depth > 1:
            return Grid2D(row_group=group_of("tensor_col"), col_group=group_of("tensor_row"),
                          depth_group=group_of("tensor_depth"), layer_group=group_of("tensor_layer"),
                          stack_group=group_of("tensor_stack"))
        return Grid2D(row_group=group_of("tensor_col"), col_group=group_of("tensor_row"))

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
        """A parameter cut over the whole grid is summed over the tensor group and ``others``; a vector shared by the
        ranks with one coordinate on an axis, over that axis's group (each of its blocks once) and ``others``;
        anything else over ``others``. Every rank returns the same parts, in the grid's axis order."""
        applied = applied_plan_2d(module)
        cuts = {id(p): grid_cut(p) for p, _ in grads}
        parts = [NormPart([g for p, g in grads if cuts[id(p)] is None], others, counted)]
        if applied is None:
            return parts
        grid = applied.grid
        # One layer's q x q ranks hold each piece once (2.5D's other layers hold the same pieces).
        layer = grid.layer_group if grid.d > 1 else self._tensor_group
        parts.append(NormPart([g for p, g in grads if cuts[id(p)] is not None and cuts[id(p)].spread == "grid"],
                              (layer, *others), counted))
        for axis in grid.axes:
            shared = [g for p, g in grads if (cut := cuts[id(p)]) is not None and cut.spread == "shared"
                      and cut.shared_axis == axis]
            parts.append(NormPart(shared, (grid.group(axis), *others), counted))
        return parts

    # ----- checkpoints and teardown -------------------------------------------------------------------------------

    @staticmethod
    def placement(module: nn.Module) -> Optional[Placement]:
        applied = applied_plan_2d(module)
        if applied is None:
            return None
        grid = applied.grid
        return lambda p: (cut.boxes(grid), 0) if (cut := grid_cut(p)) is not None else None

    def unshard(self, module: Optional[nn.Module], optimizers: list[torch.optim.Optimizer]) -> None:
        if module is None or not self.sharded_here or applied_plan_2d(module) is None:
            return
        if self.failed:
            rank_zero_warn(f"{self.who}: training failed; the module is left cut (its parameters hold this rank's "
                           "2D pieces).")
        else:
            unparallelize_2d(module, optimizers)
        self.sharded_here = False


def _fitting(module: Optional[nn.Module], cube: bool) -> Callable[[int], bool]:
    """Whether the automatic plan can cut ``module`` with grid side q (its head counts and its widths), as a function
    of q; the plan is found once."""
    if module is None:
        return lambda q: True
    automatic = auto_plan(module)
    divisor = automatic.divisor()
    return lambda q: q == 1 or ((divisor == 0 or divisor % q == 0) and not misfit_widths(module, automatic, q, cube))


def _rebind(module: nn.Module, old: Grid2D, new: Grid2D) -> None:
    """Point every 2D layer at the groups of a new mesh (a second ``fit`` on another Trainer)."""
    for m in module.modules():
        if getattr(m, "grid", None) is old:
            m.grid = new


class TensorAxis3D(TensorAxis2D):
    """Cuts a module over a q x q x q cube of the innermost ranks by the same automatic plan, with the cube's layers
    (``tensor/layers_3d.py``); everything after the cut is the 2D axis's (its gradients are final after autograd,
    its pieces carry a ``GridCut``)."""

    def __init__(self, *, param_init_fn: Optional[Callable[[nn.Module], None]], who: str, owner: str) -> None:
        super().__init__(param_init_fn=param_init_fn, who=who, owner=owner)
        self.mode = "3d"

    cube = True  # default_size: the largest q^3 whose q divides every head count, and q, q^2 or q^3 every width

    def _tensor_size(self, q: int) -> int:
        return q ** 3

    def _grid(self, group_of: Callable[[str], dist.ProcessGroup]) -> Grid3D:
        return Grid3D(x_group=group_of("tensor_x"), y_group=group_of("tensor_y"), z_group=group_of("tensor_z"),
                      xy_group=group_of("tensor_xy"), xz_group=group_of("tensor_xz"))
