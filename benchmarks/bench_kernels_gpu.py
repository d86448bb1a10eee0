"""Kernel-level timing of the NVFP4 decode linear on Qwen2.5 layer shapes, M = 1..64 rows, to pick tiles.

Per shape and row count, side by side (medians of CUDA-graph replays, `do_bench_cudagraph`):
cuBLAS bf16 (x @ W.T), dequantize-one-layer + cuBLAS (the old path above 4 rows), version 4
(CUDA cores, <= 8 rows, `decode_config`), version 5 (tensor cores, `tc_config`) and a sweep of
version-5 tiles. GB/s counts the packed weight + scale bytes (bf16: 2 bytes a weight).
Usage: python benchmarks/bench_kernels_gpu.py [--quick] [--model qwen2.5-7b] [--rows 1,8,64] [--sweep-rows 8]
       [--v4-sweep] [--shapes "gate|up,down"]
"""
import argparse
import itertools
import json

import torch
import triton.testing

from qerl.bench import fused_layer_shapes
from qerl.kernels.dequant import dequantize
from qerl.kernels.fused_linear import decode_config, fused_linear, tc_config
from qerl.quant import nvfp4_quantize


def _splits(base: int, k: int, bkw: int) -> list[int]:
    """The default split and 2x, 4x it, as long as each split keeps two steps of K."""
    return sorted({sp for sp in (base, 2 * base, 4 * base) if sp <= 16 and (k // 8) // sp >= 2 * bkw} or {1})


# (BLOCK_N, BKW, num_warps): from wide 4-8 warp tiles to small 1-2 warp programs (many per SM, more loads in flight)
TC_TILES = [(16, 8, 1), (16, 16, 1), (16, 16, 2), (32, 8, 2), (32, 16, 2), (32, 16, 4), (64, 8, 4), (64, 16, 4),
            (128, 8, 8)]
V4_TILES = [(4, 64, 1), (4, 128, 1), (8, 32, 1), (8, 64, 2), (16, 16, 2), (16, 16, 4), (16, 32, 4), (32, 16, 4),
            (64, 32, 4)]


def tc_sweep(m: int, n: int, k: int, quick: bool):
    """Version 5 tiles, each at its default split and 2x, 4x it; 3 stages or 1 (no wgmma serialization);
    up to 16 rows also with the weights as the B operand of mma.sync (SWAP_AB=False)."""
    if quick:
        return []
    out = []
    for bn, bkw, nw in TC_TILES:
        for st, swap in ((3, True), (1, True)) + (((3, False), (1, False)) if m <= 16 else ()):
            base = tc_config(m, n, k, block_n=bn, bkw=bkw, num_warps=nw, num_stages=st)
            out += [dict(base, SPLIT=sp, SWAP_AB=swap) for sp in _splits(base["SPLIT"], k, bkw)]
    return out


def v4_sweep(m: int, n: int, k: int):
    """Version 4 at few rows: tiles around decode_config, down to one-warp programs."""
    base = decode_config(m, n, k)
    out = []
    for bn, bkw, nw in V4_TILES:
        for sp in _splits(base["SPLIT"], k, bkw):
            out.append(dict(base, BLOCK_N=bn, BKW=bkw, num_warps=nw, SPLIT=sp))
    return out


def agrees(run, y, cfg, ref_cfg) -> bool:
    """The winning tile computes what the default tile computes (same inputs; fp32 summation order aside)."""
    run(ref_cfg)()
    y0 = y.float().clone()
    run(cfg)()
    return bool(((y.float() - y0).norm() / y0.norm()) < 1e-2)


def time_it(fn):
    return triton.testing.do_bench_cudagraph(fn, rep=30, return_mode="median")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default="qwen2.5-7b")
    ap.add_argument("--rows", default="1,2,4,8,16,32,64")
    ap.add_argument("--sweep-rows", default="1,8,64")
    ap.add_argument("--v4-sweep", action="store_true")
    ap.add_argument("--shapes", default="qkv,o,gate|up,down")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.manual_seed(0)
    shapes = fused_layer_shapes(a.model)
    results = []
    for name, (n, k, glu) in shapes.items():
        if name not in a.shapes.split(","):
            continue
        w = torch.randn(n, k, device="cuda") * 0.02
        d = nvfp4_quantize(w)
        wb = w.bfloat16()
        del w
        gs = d["weight_global_scale"].reshape(1).repeat(2 if glu else 1)
        nbytes = d["weight_packed"].numel() + d["weight_scale"].numel()
        buf = torch.empty(n, k, device="cuda", dtype=torch.bfloat16)
        for m in map(int, a.rows.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            nout = n // 2 if glu else n
            y = torch.empty(m, nout, device="cuda", dtype=torch.bfloat16)
            yfull = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)

            def run(cfg):
                return lambda: fused_linear(x, "nvfp4", d["weight_packed"], d["weight_scale"], gs, glu=glu, out=y,
                                            config=cfg)

            def deq_mm():
                dequantize("nvfp4", d["weight_packed"], d["weight_scale"], gs[:1], torch.bfloat16, out=buf)
                torch.mm(x, buf.t(), out=yfull)

            ref = x.float() @ wb.float().T
            t_bf = time_it(lambda: x @ wb.T)
            row = dict(shape=name, n=n, k=k, m=m, cublas_bf16_us=t_bf * 1e3, deq_cublas_us=time_it(deq_mm) * 1e3)
            if m <= 8:
                row["v4_us"] = time_it(run(decode_config(m, nout, k))) * 1e3
            if m <= 2 and a.v4_sweep:
                b4 = (row["v4_us"], decode_config(m, nout, k))
                for cfg in v4_sweep(m, nout, k):
                    try:
                        t = time_it(run(cfg)) * 1e3
                    except Exception as e:  # a tile that does not compile or fit
                        print("skip", cfg, type(e).__name__, str(e)[:100], flush=True)
                        continue
                    if t < b4[0]:
                        b4 = (t, cfg)
                row["v4_best_agrees"] = agrees(run, y, b4[1], decode_config(m, nout, k))
                row.update(v4_best_us=b4[0], v4_best_cfg=b4[1])
                print(f"{name:8s} M={m} v4 default {row['v4_us']:.1f} us, best {b4[0]:.1f} us {b4[1]} "
                      f"(agrees: {row['v4_best_agrees']})", flush=True)
            dflt = tc_config(m, nout, k)
            run(dflt)()
            if not glu:  # the TC kernel's product against the bf16 weights it was quantized from
                row["v5_rel_err"] = float((y.float() - ref).norm() / ref.norm())
            t5 = time_it(run(dflt))
            row.update(v5_us=t5 * 1e3, v5_cfg=dflt)
            best = (t5, dflt)
            for cfg in tc_sweep(m, nout, k, a.quick or str(m) not in a.sweep_rows.split(",")):
                try:
                    t = time_it(run(cfg))
                except Exception as e:  # a tile that does not compile or fit
                    print("skip", cfg, type(e).__name__, str(e)[:100], flush=True)
                    continue
                if t < best[0]:
                    best = (t, cfg)
            row.update(best_us=best[0] * 1e3, best_cfg=best[1], best_GBs=nbytes / best[0] / 1e6,
                       best_agrees=agrees(run, y, best[1], dflt))
            results.append(row)
            print(f"{name:8s} M={m:<3d} N={n:6d} K={k:6d} | cuBLAS bf16 {t_bf * 1e3:6.1f} us | deq+cuBLAS "
                  f"{row['deq_cublas_us']:6.1f} | v4 {row.get('v4_us', float('nan')):6.1f} | v5 {t5 * 1e3:6.1f} "
                  f"(err {row.get('v5_rel_err', float('nan')):.1e}) | best v5 {best[0] * 1e3:6.1f} us "
                  f"{row['best_GBs']:5.0f} GB/s {best[1]} (agrees: {row['best_agrees']})", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
