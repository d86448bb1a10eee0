"""One launch of a decode kernel, for Nsight Compute (stall reasons, occupancy, memory throughput).

Cases (Qwen2.5-7B gate|up, random NVFP4 weights): `v7` (version 7, the engine's tile), `ldg`
(probe_stream_gpu's best read-only kernel over the same words).
Usage: ncu --clock-control none -k regex:'_mma_kernel|_ldg' --launch-skip 2 --launch-count 1 \\
           --section SpeedOfLight --section Occupancy --section WarpStateStats \\
           python benchmarks/ncu_mma_gpu.py --case v7 --rows 8
"""

import argparse

import torch

from qerl.bench import random_nvfp4_layers
from qerl.kernels.fused_linear import fused_linear
from qerl.kernels.nvfp4_mma import mma_config


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default="v7", choices=["v7", "ldg"])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--shape", default="gate|up")
    a = ap.parse_args()
    torch.manual_seed(0)
    layer = next(random_nvfp4_layers("qwen2.5-7b", a.shape))
    nout = layer.n // 2 if layer.glu else layer.n
    x = torch.randn(a.rows, layer.k, device="cuda", dtype=torch.bfloat16)
    w = layer.q["weight_packed"]
    if a.case == "ldg":
        import triton
        from probe_stream_gpu import _ldg

        w32 = w.view(torch.int32)
        n, kw = w32.shape
        out = torch.empty(1 << 16, dtype=torch.int32, device="cuda")
        grid = (triton.cdiv(n, 32), 2)  # the probe's best gate|up tile: 2368 programs of 4 warps, 2 steps of loads

        def run():
            return _ldg[grid](w32, out, n, kw, 256, BN=32, BKW=32, U=2, num_warps=4)
    else:
        cfg = mma_config(a.rows, nout, layer.k)
        print(cfg)

        def run():
            return fused_linear(
                x,
                "nvfp4",
                w,
                layer.q["weight_scale"],
                layer.gs,
                glu=layer.glu,
                config=cfg,
            )

    for _ in range(4):
        run()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
