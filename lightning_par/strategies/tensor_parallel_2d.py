"""2D (SUMMA / Optimus), 2.5D (Tesseract) and 3D tensor parallelism on top of data parallelism: the grid tensor
axes (``tensor/axis_2d.py``) and the data axis, as presets of the composed strategy (``hybrid`` with
``tensor_mode="2d"``, ``"2.5d"`` or ``"3d"``, no pipeline, no ZeRO)."""

from __future__ import annotations

from datetime import timedelta
from typing import Callable, Optional

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout

from lightning_par.comm.data_axis import DataAxis
from lightning_par.strategies.base import StartMethod
from lightning_par.strategies.composed import ComposedStrategy, argument
from lightning_par.tensor.axis_2d import TensorAxis2D, TensorAxis3D
from lightning_par.tensor.plan_2d import Applied2D, applied_plan_2d


def _applied(strategy: ComposedStrategy) -> Optional[Applied2D]:
    return applied_plan_2d(strategy.lightning_module) if strategy.lightning_module is not None else None


_applied_plan = property(_applied, doc="What the plan did to the module (after ``setup``): the grid or cube, and each "
                                       "module's layer.")


class TensorParallel2DStrategy(ComposedStrategy):
    """2D tensor parallelism (``strategy="tp2d"``): a tensor group of q x q ranks holds 1/q^2 of every weight matrix
    and of every activation between layers (samples split over the grid's rows, the hidden dim over its columns);
    the remaining ``world / tensor_size`` ranks are data parallel (``dp``'s buckets).

    The LightningModule is cut in place when ``fit`` starts by the automatic plan of ``tp1d`` read in 2D (attention
    and MLP linears, the token embedding and the output layer, every norm and position embedding on the hidden
    stream; see ``docs/tp2d.md``), which is logged. Its code does not change; the global batch must divide by q.

    Args:
        tensor_size: ranks per tensor group, q x q. Default: the largest square dividing the world size whose q
            divides every head count and width the plan splits.
        param_init_fn: initialises a module built on the meta device, as for ``tp1d``.
        weights_only: how a checkpoint is opened when ``fit`` resumes from it, as for ``hybrid``.
        bucket_size_mb, process_group_backend, timeout, start_method: as for ``dp``.

    Precision: ``32-true``, ``bf16-mixed``, ``bf16-true`` (``16-mixed``'s loss scaler would decide per rank).

    After ``fit`` the module is whole again on every rank (original classes, names and shapes), with the
    optimizers' state gathered, as under ``tp1d``.
    """

    def __init__(
        self,
        tensor_size: Optional[int] = None,
        param_init_fn: Optional[Callable[[torch.nn.Module], None]] = None,
        bucket_size_mb: float = 25.0,
        weights_only: Optional[bool] = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
        start_method: StartMethod = "popen",
    ) -> None:
        tensor = TensorAxis2D(param_init_fn=param_init_fn, who="tp2d", owner=type(self).__name__)
        super().__init__(data=DataAxis(bucket_size_mb), tensor=tensor, tensor_size=tensor_size,
                         weights_only=weights_only, process_group_backend=process_group_backend, timeout=timeout,
                         start_method=start_method)

    param_init_fn = argument("tensor_axis", "param_init_fn")
    bucket_size_mb = argument("data_axis", "bucket_size_mb")

    applied_plan = _applied_plan


class TensorParallel2p5DStrategy(ComposedStrategy):
    """2.5D tensor parallelism (Tesseract, ``strategy="tp2.5d"``): ``depth`` stacked q x q grids. Each layer of the
    stack holds every weight block as ``tp2d`` does (1/q^2 of each weight per rank) and works on 1/depth of the
    samples, so each rank holds 1/(depth q^2) of every activation; the weights' gradients are summed over the
    depth. The remaining ``world / tensor_size`` ranks are data parallel.

    Args:
        tensor_size: ranks per tensor group, depth x q x q. Default: the largest such size dividing the world size
            whose q divides every head count and width the plan splits.
        depth: grids in the stack (default 2); the global batch must divide by depth x q.
        param_init_fn, weights_only, bucket_size_mb, process_group_backend, timeout, start_method: as for ``tp2d``.

    See ``docs/tp2.5d.md`` for the layout and costs.
    """

    def __init__(
        self,
        tensor_size: Optional[int] = None,
        depth: int = 2,
        param_init_fn: Optional[Callable[[torch.nn.Module], None]] = None,
        bucket_size_mb: float = 25.0,
        weights_only: Optional[bool] = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
        start_method: StartMethod = "popen",
    ) -> None:
        tensor = TensorAxis2D(param_init_fn=param_init_fn, who="tp2.5d", owner=type(self).__name__, depth=depth)
        super().__init__(data=DataAxis(bucket_size_mb), tensor=tensor, tensor_size=tensor_size,
                         weights_only=weights_only, process_group_backend=process_group_backend, timeout=timeout,
                         start_method=start_method)

    depth = argument("tensor_axis", "depth")
    param_init_fn = argument("tensor_axis", "param_init_fn")
    bucket_size_mb = argument("data_axis", "bucket_size_mb")

    applied_plan = _applied_plan


class TensorParallel3DStrategy(ComposedStrategy):
    """3D tensor parallelism (``strategy="tp3d"``): a tensor group of q x q x q ranks holds 1/q^3 of every weight
    matrix and of every activation between layers (the samples cut in q^2 blocks, the hidden dim in q; see
    ``docs/tp3d.md``); the products are all-gathers and reduce-scatters across the cube's three axes. The remaining
    ``world / tensor_size`` ranks are data parallel.

    The module is cut in place when ``fit`` starts by the automatic plan ``tp2d`` uses, with the cube's layers; the
    global batch must divide by q^2, linear input widths by q^2 and position embeddings' widths by q^3.

    Args:
        tensor_size: ranks per tensor group, q x q x q. Default: the largest cube dividing the world size whose q
            divides every head count and width the plan splits.
        param_init_fn, weights_only, bucket_size_mb, process_group_backend, timeout, start_method: as for ``tp2d``.
    """

    def __init__(
        self,
        tensor_size: Optional[int] = None,
        param_init_fn: Optional[Callable[[torch.nn.Module], None]] = None,
        bucket_size_mb: float = 25.0,
        weights_only: Optional[bool] = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
        start_method: StartMethod = "popen",
    ) -> None:
        tensor = TensorAxis3D(param_init_fn=param_init_fn, who="tp3d", owner=type(self).__name__)
        super().__init__(data=DataAxis(bucket_size_mb), tensor=tensor, tensor_size=tensor_size,
                         weights_only=weights_only, process_group_backend=process_group_backend, timeout=timeout,
                         start_method=start_method)

    param_init_fn = argument("tensor_axis", "param_init_fn")
    bucket_size_mb = argument("data_axis", "bucket_size_mb")

    applied_plan = _applied_plan
