"""Kernel-level timing of the decode linear (M = 1..8) on Qwen2.5 layer shapes, to pick tile sizes.

For each shape and row count: cuBLAS bf16 (x @ W.T), the previous version-3 kernel, the version-4
default (`decode_config`) and a sweep of version-4 tiles. Times are medians of CUDA-graph replays
(`do_bench_cudagraph`); GB/s counts the packed weight + scale bytes (bf16: 2 bytes a weight).
Usage: python benchmarks/bench_kernels_gpu.py [--quick] [--model qwen2.5-7b]
"""
import argparse
import json
import os

import torch
import triton.testing

from qerl.bench import CONFIGS
from qerl.kernels.fused_linear import decode_config, fused_linear
from qerl.quant import nvfp4_quantize

V3 = {1: dict(BLOCK_M=1, BLOCK_N=8, BLOCK_K=512, USE_DOT=False, num_warps=4),
      8: dict(BLOCK_M=8, BLOCK_N=16, BLOCK_K=128, USE_DOT=False, num_warps=4)}


def sweep(m: int, quick: bool):
    if quick:
        return []
    out = []
    bns = (16, 32, 64) if m <= 2 else (8, 16, 32)
    for bn in bns:
        for bkw in (16, 32, 64):
            for nw in ((4, 8) if bn * bkw >= 2048 else (4,)):
                out.append(dict(WORDS=True, BLOCK_N=bn, BKW=bkw, XPERM=False, USE_ASM=True, num_warps=nw,
                                num_stages=1))
    base = decode_config(m, 4096, 4096)
    out += [dict(base, XPERM=True), dict(base, USE_ASM=False), dict(base, num_stages=2), dict(base, num_stages=3)]
    return out


def time_it(fn):
    return triton.testing.do_bench_cudagraph(fn, rep=30, return_mode="median")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default="qwen2.5-7b")
    ap.add_argument("--rows", default="1,2,4,8")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.manual_seed(0)
    c = CONFIGS[a.model]
    h, i = c["hidden_size"], c["intermediate_size"]
    kvd = c["num_kv_heads"] * h // c["num_heads"]
    shapes = {"qkv": (h + 2 * kvd, h, False), "o": (h, h, False), "gate|up": (2 * i, h, True), "down": (h, i, False)}
    results = []
    for name, (n, k, glu) in shapes.items():
        w = torch.randn(n, k, device="cuda") * 0.02
        d = nvfp4_quantize(w)
        wb = w.bfloat16()
        del w
        gs = d["weight_global_scale"].reshape(1).repeat(2 if glu else 1)
        nbytes = d["weight_packed"].numel() + d["weight_scale"].numel()
        for m in map(int, a.rows.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            nout = n // 2 if glu else n
            y = torch.empty(m, nout, device="cuda", dtype=torch.bfloat16)

            def run(cfg):
                return lambda: fused_linear(x, "nvfp4", d["weight_packed"], d["weight_scale"], gs, glu=glu, out=y,
                                            config=cfg)

            t_bf = time_it(lambda: x @ wb.T)
            row = dict(shape=name, n=n, k=k, m=m, cublas_bf16_us=t_bf * 1e3,
                       cublas_bf16_GBs=wb.numel() * 2 / t_bf / 1e6)
            if m in V3:
                t3 = time_it(run(V3[m]))
                row.update(v3_us=t3 * 1e3, v3_GBs=nbytes / t3 / 1e6)
            dflt = decode_config(m, nout, k)
            t4 = time_it(run(None))
            row.update(v4_us=t4 * 1e3, v4_GBs=nbytes / t4 / 1e6, v4_cfg=dflt)
            best = (t4, dict(dflt, auto=True))
            for cfg in sweep(m, a.quick):
                full = dict(cfg)
                if "SPLIT" not in full:
                    full["SPLIT"] = _split(m, nout, k, full["BLOCK_N"], full["BKW"])
                for sp in sorted({full["SPLIT"], 1}):
                    try:
                        t = time_it(run(dict(full, SPLIT=sp)))
                    except Exception as e:  # a tile that does not compile or fit
                        print("skip", full, sp, type(e).__name__, str(e)[:120], flush=True)
                        continue
                    if t < best[0]:
                        best = (t, dict(full, SPLIT=sp))
            row.update(best_us=best[0] * 1e3, best_GBs=nbytes / best[0] / 1e6, best_cfg=best[1])
            results.append(row)
            print(f"{name:8s} M={m} N={n:6d} K={k:6d} | cuBLAS bf16 {t_bf * 1e3:6.1f} us {row['cublas_bf16_GBs']:5.0f} GB/s"
                  + (f" | v3 {row['v3_us']:6.1f} us {row['v3_GBs']:5.0f}" if "v3_us" in row else "")
                  + f" | v4 {t4 * 1e3:6.1f} us {row['v4_GBs']:5.0f} GB/s | best {best[0] * 1e3:6.1f} us "
                  f"{row['best_GBs']:5.0f} GB/s {best[1]}", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)


def _split(m, n, k, bn, bkw):
    from qerl.kernels import fused_linear as fl

    tiles, kw, split = -(-n // bn), k // 8, 1
    while tiles * split * 2 <= fl.TARGET_PROGRAMS and kw // (split * 2) >= 4 * bkw:
        split *= 2
    return split


if __name__ == "__main__":
    main()
