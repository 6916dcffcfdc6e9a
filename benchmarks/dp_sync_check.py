"""GPU check, ``python benchmarks/dp_sync_check.py``: no host sync in backward, GradientBucketer.finish() or the step.

One-process NCCL group, GradientBucketer built directly, small model on cuda, bf16 autocast; after warm-up, 5 steps
under set_sync_debug_mode("error"): prints "dp sync check: OK" or the stack of the synchronising call. Then counts
the syncs of the unused-parameter path under "warn" (1 read-back per step expected, grad None kept). Needs only
torch: buckets.py is loaded by path, without importing lightning_par (and so Lightning)."""

import importlib.util, socket, sys, traceback, warnings  # noqa: E401
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

_BUCKETS = Path(__file__).resolve().parents[1] / "lightning_par" / "comm" / "buckets.py"
_spec = importlib.util.spec_from_file_location("buckets", _BUCKETS)
buckets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(buckets)


class Net(nn.Module):
    def __init__(self, d: int = 1024, layers: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
                                    for _ in range(layers))
        self.spare = nn.Linear(d, d)  # skipped when use_spare=False: the unused-parameter path
        self.head = nn.Linear(d, 512)

    def forward(self, x, use_spare: bool):
        for block in self.blocks:
            x = x + block(x)
        return self.head(self.spare(x) if use_spare else x)


def step(net, opt, bucketer, x, use_spare: bool = True) -> None:
    opt.zero_grad(set_to_none=True)  # Lightning's default: the hooks copy fresh gradients into the buckets
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = net(x, use_spare).float().pow(2).mean()
    loss.backward()
    bucketer.finish()
    opt.step()


def main() -> int:
    torch.cuda.set_device(0)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("nccl", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")
    net = Net().cuda()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    bucketer = buckets.GradientBucketer(net.named_parameters(), dist.group.WORLD, bucket_bytes=4 * 2**20)
    x = torch.randn(8, 256, 1024, device="cuda")
    for use_spare in (True, False, True, True):  # warm-up: communicator, allocator, optimizer state
        step(net, opt, bucketer, x, use_spare)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        [step(net, opt, bucketer, x) for _ in range(5)]
        ok = True
    except RuntimeError:
        ok = False
        traceback.print_exc()
    torch.cuda.set_sync_debug_mode("default")
    print(f"dp sync check: OK ({len(bucketer.buckets)} buckets, 5 steps)" if ok else
          "dp sync check: FAILED (a host synchronisation on the common path, stack above)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        [step(net, opt, bucketer, x, use_spare=False) for _ in range(3)]
        torch.cuda.set_sync_debug_mode("default")
    syncs, none_kept = sum("synchroniz" in str(w.message) for w in caught), net.spare.weight.grad is None
    print(f"unused-parameter path: {syncs} synchronisations in 3 steps (expected 3), spare grad None: {none_kept}")
    dist.destroy_process_group()
    return 0 if ok and syncs == 3 and none_kept else 1  # syncs: the flag read-back in finish(), once per step


if __name__ == "__main__":
    sys.exit(main())
