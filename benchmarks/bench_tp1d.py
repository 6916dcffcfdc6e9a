"""Tokens/s of the GPT under `tp1d` at world size 1 against a plain PyTorch loop, in one process on one device.

    python benchmarks/bench_tp1d.py                         # ~1.3B GPT on one GPU: plain, tp1d, tp1d_sp, dp
    python benchmarks/bench_tp1d.py --device cpu --layers 2 --width 64 --heads 2 --vocab 128 --seq 64 --batch 4 \
        --steps 5 --warmup 1 --repeats 1                   # smoke test

The same harness as bench_dp.py (same model, data, optimizer, timing window; see its docstring). Variants:

- ``tp1d``: ``TensorParallel1DStrategy()`` with the automatic plan. At world size 1 the tensor size is 1, but the
  plan is applied all the same: every attention and MLP Linear becomes a column- or row-parallel layer, the
  embedding and output layer vocabulary-parallel; their collectives are no-ops at group size 1. What is measured is
  the cost of the layers themselves, against the unmodified model in the plain loop.
- ``tp1d_sp``: the same with ``sequence_parallel=True`` (at tensor size 1 it adds nothing: no hooks are installed).
- ``dp``: for reference, Lightning's loop with no sharding at all.

Target (issue 5): ``tp1d`` within 3% of the plain loop's step time on the 1.3B GPT.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_dp  # noqa: E402  (the shared harness; it also puts the repository on sys.path)

from lightning_par import TensorParallel1DStrategy  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    return bench_dp.main(
        argv,
        benchmark="bench_tp1d",
        description=__doc__,
        default_strategies="tp1d,tp1d_sp,dp",
        factories={"tp1d_sp": lambda: TensorParallel1DStrategy(sequence_parallel=True)},
    )


if __name__ == "__main__":
    main()
