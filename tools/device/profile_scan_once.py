"""One forward and one backward of our CUDA selective scan, for `ncu` (no timing here).

    ncu --clock-control none -k regex:scan_ python3 tools/device/profile_scan_once.py 8 1536 2048 16 [--no-grad]
"""
import sys

import torch

from mamba_ssm.ops.selective_scan_cuda import selective_scan_cuda

args = [a for a in sys.argv[1:] if a != "--no-grad"]
no_grad = "--no-grad" in sys.argv  # the forward alone, as inference runs it (no checkpoints, no saved y)
b, d, L, n = (int(x) for x in args[:4]) if len(args) >= 4 else (8, 1536, 2048, 16)
g = torch.Generator(device="cuda").manual_seed(0)
bf = torch.bfloat16


def rn(*s):
    return torch.randn(*s, device="cuda", generator=g).to(bf).requires_grad_(True)


u, z, delta = rn(b, d, L), rn(b, d, L), rn(b, d, L)
B, C = rn(b, n, L), rn(b, n, L)
A = (-torch.arange(1, n + 1, device="cuda", dtype=torch.float32).repeat(d, 1)).requires_grad_(True)
D = torch.ones(d, device="cuda", requires_grad=True)
bias = torch.full((d,), -3.0, device="cuda", requires_grad=True)
if no_grad:
    with torch.no_grad():
        out = selective_scan_cuda(u, delta, A, B, C, D, z, bias, True, False)
else:
    out = selective_scan_cuda(u, delta, A, B, C, D, z, bias, True, False)
    out.backward(torch.randn_like(out))
torch.cuda.synchronize()
print("profiled once:", tuple(out.shape))
