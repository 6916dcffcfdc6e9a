"""Checks on one GPU that DeferredWeightGrads.accumulate (the matmul that accumulates into an fp32 .grad) equals
the unfused sum: bf16 factors into fp32 (new and existing .grad), fp32 factors. Prints one line per case."""

import torch

from lightning_par.tensor.deferred_grads import DeferredWeightGrads

torch.manual_seed(0)
for dtype in (torch.bfloat16, torch.float32):
    a, b = torch.randn(512, 1024, device="cuda", dtype=dtype), torch.randn(1024, 256, device="cuda", dtype=dtype)
    p = torch.nn.Parameter(torch.randn(512, 256, device="cuda"))
    DeferredWeightGrads.accumulate(p, a, b)  # .grad None: a new fp32 tensor
    first = (a.float() @ b.float())
    DeferredWeightGrads.accumulate(p, a, b)  # .grad fp32: accumulated in the matmul
    gap = ((p.grad - 2 * first).abs().max() / first.abs().max()).item()
    print(f"fused accumulate {dtype}: grad {p.grad.dtype}, relative gap to fp32 reference {gap:.2e}",
          "PASS" if gap < (1e-2 if dtype == torch.bfloat16 else 1e-5) else "FAIL")
