"""What a checkpoint costs while training: time and extra GPU memory of one `trainer.save_checkpoint` during fit,
and its size on disk, per strategy (issue 13's one checkpoint path against the gathering paths it replaced).

    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=$PWD
    torchrun --nproc_per_node 4 benchmarks/checkpoint_speed.py --model 1.3b --variants zero3,tp1d,pipeline_2stages \\
        --dir /tmp/ckpt_speed

Each variant trains `--warmup` + `--steps` steps of `multi_gpu.py throughput`'s model (bf16-mixed, AdamW), then
saves once at the end of the last step, between barriers. Printed per variant (rank 0): the save's wall time, the
largest rise of any rank's GPU memory above what it held before the save, the host memory high-water mark's rise
(VmHWM; 0 when the save stayed under an earlier peak), and the bytes written. Run it from two checkouts
(``PYTHONPATH`` of each) to compare code versions on one machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import multi_gpu  # noqa: E402
import lightning.pytorch as pl  # noqa: E402


def _host_peak_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class SaveOnce(pl.Callback):
    """At the end of the last training step: one timed save."""

    def __init__(self, path: Path, last_step: int) -> None:
        self.path, self.last_step = path, last_step
        self.result: dict = {}

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step != self.last_step:
            return
        device = trainer.strategy.root_device
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(device)
        trainer.strategy.barrier()
        before, host_before = torch.cuda.memory_allocated(device) if cuda else 0, _host_peak_bytes()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        trainer.save_checkpoint(self.path)
        if cuda:
            torch.cuda.synchronize(device)
        trainer.strategy.barrier()
        seconds = time.perf_counter() - t0
        gpu_rise = torch.cuda.max_memory_allocated(device) - before if cuda else 0
        rise = torch.tensor([gpu_rise, _host_peak_bytes() - host_before], dtype=torch.float64, device=device)
        dist.all_reduce(rise, op=dist.ReduceOp.MAX)
        self.result = {"seconds": seconds, "gpu_rise_gib": rise[0].item() / 2**30,
                       "host_rise_gib": rise[1].item() / 2**30}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    multi_gpu.add_throughput_args(p)
    p.add_argument("--dir", required=True, help="where the checkpoints go (removed after each variant)")
    args = p.parse_args()
    multi_gpu.apply_model_preset(args)
    args.sync_check = False
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    device = multi_gpu.local_device(args.accelerator)
    for name in [v for v in args.variants.split(",") if v]:
        path = Path(args.dir) / f"{name}.ckpt"
        saver = SaveOnce(path, args.warmup + args.steps)
        try:
            multi_gpu.run_variant(args, name, world, device, extra_callbacks=[saver])
            r = saver.result
            size = _size(path) if rank == 0 else 0
            if rank == 0:
                form = "dir" if path.is_dir() else "file"
                print(f"  {name:<22} save {r['seconds']:6.2f} s  GPU +{r['gpu_rise_gib']:5.2f} GiB  host peak "
                      f"+{r['host_rise_gib']:5.2f} GiB  {size / 2**30:6.2f} GiB on disk ({form})", flush=True)
        except Exception as e:  # noqa: BLE001 - the next variant runs
            if rank == 0:
                print(f"  {name:<22} error {type(e).__name__}: {str(e)[:300]}", flush=True)
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    multi_gpu.exit_now(0)


if __name__ == "__main__":
    main()
