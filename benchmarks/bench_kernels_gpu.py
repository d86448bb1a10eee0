"""Kernel-level timing of the fused decode linear on Qwen2.5 layer shapes (H100), to pick tile sizes.

Prints achieved GB/s (weight bytes + scales per call / median time of a CUDA-graph replay).
Usage: python benchmarks/bench_kernels_gpu.py [--quick]
"""
import sys

import torch
import triton.testing

from qerl.kernels.fused_linear import fused_linear, pick_config
from qerl.quant import nvfp4_quantize


def main(quick: bool):
    torch.manual_seed(0)
    h, i = 3584, 18944
    shapes = {"qkv": (4608, h), "o": (h, h), "gate|up": (2 * i, h), "down": (h, i)}
    cfgs = [dict(BLOCK_M=1, BLOCK_N=bn, BLOCK_K=bk, USE_DOT=False, num_warps=w)
            for bn in (8, 16, 32) for bk in (128, 256, 512) for w in (4, 8)]
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, device="cuda") * 0.02
        d = nvfp4_quantize(w)
        wb = w.bfloat16()
        del w
        nbytes = d["weight_packed"].numel() + d["weight_scale"].numel()
        for m in (1, 8, 64):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            best = []
            trial = [pick_config(m, n, k, "nvfp4")]
            if not quick and m == 1:
                trial += cfgs
            if not quick and m == 8:
                trial += [dict(BLOCK_M=8, BLOCK_N=bn, BLOCK_K=bk, USE_DOT=False, num_warps=w)
                          for bn in (4, 8, 16) for bk in (64, 128, 256) for w in (4, 8)]
            if not quick and m == 64:
                trial += [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, USE_DOT=True, num_warps=wp)
                          for bm in (64,) for bn in (16, 32, 64) for bk in (64, 128, 256) for wp in (4, 8)]
            for cfg in trial:
                try:
                    t = triton.testing.do_bench_cudagraph(lambda: fused_linear(x, "nvfp4", d["weight_packed"], d["weight_scale"],
                                                                                d["weight_global_scale"], config=cfg), rep=20)
                except Exception as e:  # a config that does not compile or fit
                    continue
                best.append((t, cfg))
            best.sort(key=lambda z: z[0])
            t_def = triton.testing.do_bench_cudagraph(lambda: fused_linear(x, "nvfp4", d["weight_packed"], d["weight_scale"],
                                                                            d["weight_global_scale"]), rep=20)
            t_bf = triton.testing.do_bench_cudagraph(lambda: x @ wb.T, rep=20)
            print(f"{name:8s} N={n:6d} K={k:6d} M={m:3d}: default {t_def * 1e3:7.1f} us {nbytes / t_def / 1e6:6.0f} GB/s | "
                  f"best {best[0][0] * 1e3:7.1f} us {nbytes / best[0][0] / 1e6:6.0f} GB/s {best[0][1]} | "
                  f"cuBLAS bf16 {t_bf * 1e3:7.1f} us {wb.numel() * 2 / t_bf / 1e6:6.0f} GB/s", flush=True)


if __name__ == "__main__":
    main("--quick" in sys.argv)
