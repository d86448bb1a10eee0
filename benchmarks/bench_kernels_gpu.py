"""Kernel-level timing of the NVFP4 decode linear on Qwen2.5 layer shapes, M = 1..64 rows, to pick tiles.

Per shape and row count, side by side (medians of CUDA-graph replays, `do_bench_cudagraph`):
cuBLAS bf16 (x @ W.T), dequantize-one-layer + cuBLAS (the engine's path above 64 rows), version 6
(CUDA cores, <= 8 rows, `gemv_config`, with --v6-sweep a sweep of its tiles), version 5 (tensor cores,
`tc_config`) and a sweep of version-5 tiles. GB/s counts the packed weight + scale bytes (bf16: 2 bytes a weight).
Usage: python benchmarks/bench_kernels_gpu.py [--quick] [--model qwen2.5-7b] [--rows 1,8,64] [--sweep-rows 8]
       [--v6-sweep] [--shapes "gate|up,down"]
"""

import argparse
import json

import torch

from qerl.bench import graph_time_us, random_nvfp4_layers
from qerl.kernels.dequant import dequantize
from qerl.kernels.fused_linear import GEMV_MAX_M, fused_linear, gemv_config, tc_config


def _splits(base: int, k: int, bkw: int) -> list[int]:
    """The default split and 2x, 4x it, as long as each split keeps two steps of K."""
    return sorted({sp for sp in (base, 2 * base, 4 * base) if sp <= 16 and (k // 8) // sp >= 2 * bkw} or {1})


# (BLOCK_N, BKW, num_warps): from wide 4-8 warp tiles to small 1-2 warp programs (many per SM, more loads in flight)
TC_TILES = [
    (16, 8, 1),
    (16, 16, 1),
    (16, 16, 2),
    (32, 8, 2),
    (32, 16, 2),
    (32, 16, 4),
    (64, 8, 4),
    (64, 16, 4),
    (128, 8, 8),
]


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


V6_TILES = [(16, 32, 1), (32, 32, 2), (32, 32, 4), (64, 16, 4), (64, 32, 4), (128, 32, 4), (128, 32, 8)]
V6_TILES_MANY_ROWS = [(16, 32, 1), (32, 32, 4), (64, 32, 4), (128, 32, 8)]


def v6_sweep(m: int, n: int, k: int):
    """Version 6 (CUDA cores, 16-byte weight loads): tiles at their default split and 2x, 4x it."""
    out = []
    for bn, bkw, nw in V6_TILES if m == 1 else V6_TILES_MANY_ROWS:
        base = gemv_config(m, n, k, block_n=bn, bkw=bkw, num_warps=nw)
        out += [dict(base, SPLIT=sp) for sp in _splits(base["SPLIT"], k, bkw)]
    return out


def agrees(run, y, cfg, ref_cfg) -> bool:
    """The winning tile computes what the default tile computes (same inputs; fp32 summation order aside)."""
    run(ref_cfg)()
    y0 = y.float().clone()
    run(cfg)()
    return bool(((y.float() - y0).norm() / y0.norm()) < 1e-2)


def time_it(fn):  # ms
    return graph_time_us(fn) / 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default="qwen2.5-7b")
    ap.add_argument("--rows", default="1,2,4,8,16,32,64")
    ap.add_argument("--sweep-rows", default="1,8,64")
    ap.add_argument("--v6-sweep", action="store_true")
    ap.add_argument("--shapes", default="qkv,o,gate|up,down")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.manual_seed(0)
    results = []
    for layer in random_nvfp4_layers(a.model, a.shapes):
        name, n, k, glu, d, wb, gs, nbytes = (
            layer.name,
            layer.n,
            layer.k,
            layer.glu,
            layer.q,
            layer.wb,
            layer.gs,
            layer.nbytes,
        )
        buf = torch.empty(n, k, device="cuda", dtype=torch.bfloat16)
        for m in map(int, a.rows.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            nout = n // 2 if glu else n
            y = torch.empty(m, nout, device="cuda", dtype=torch.bfloat16)
            yfull = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)

            def run(cfg):
                return lambda: fused_linear(
                    x, "nvfp4", d["weight_packed"], d["weight_scale"], gs, glu=glu, out=y, config=cfg
                )

            def deq_mm():
                dequantize("nvfp4", d["weight_packed"], d["weight_scale"], gs[:1], torch.bfloat16, out=buf)
                torch.mm(x, buf.t(), out=yfull)

            ref = x.float() @ wb.float().T
            t_bf = time_it(lambda: x @ wb.T)
            row = dict(shape=name, n=n, k=k, m=m, cublas_bf16_us=t_bf * 1e3, deq_cublas_us=time_it(deq_mm) * 1e3)
            if m <= GEMV_MAX_M:
                g6 = gemv_config(m, nout, k)
                run(g6)()
                if not glu:  # against the bf16 weights it was quantized from
                    row["v6_rel_err"] = float((y.float() - ref).norm() / ref.norm())
                row["v6_us"] = time_it(run(g6)) * 1e3
                b6 = (row["v6_us"], g6)
                for cfg in v6_sweep(m, nout, k) if a.v6_sweep else []:
                    try:
                        t = time_it(run(cfg)) * 1e3
                    except Exception as e:  # a tile that does not compile or fit
                        print("skip", cfg, type(e).__name__, str(e)[:100], flush=True)
                        continue
                    if t < b6[0]:
                        b6 = (t, cfg)
                if a.v6_sweep:  # the best tile again with the next step's words loaded one step ahead
                    t = time_it(run(dict(b6[1], PREFETCH=True))) * 1e3
                    row["v6_best_prefetch_us"] = t
                    if t < b6[0]:
                        b6 = (t, dict(b6[1], PREFETCH=True))
                row.update(
                    v6_best_us=b6[0],
                    v6_best_cfg=b6[1],
                    v6_best_GBs=nbytes / b6[0] / 1e3,
                    v6_best_agrees=agrees(run, y, b6[1], g6),
                )
                print(
                    f"{name:8s} M={m} v6 default {row['v6_us']:.1f} us (err {row.get('v6_rel_err', float('nan')):.1e}) "
                    f"| v6 best {b6[0]:.1f} us {row['v6_best_GBs']:.0f} GB/s "
                    f"{b6[1]} (agrees: {row['v6_best_agrees']})",
                    flush=True,
                )
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
            row.update(
                best_us=best[0] * 1e3,
                best_cfg=best[1],
                best_GBs=nbytes / best[0] / 1e6,
                best_agrees=agrees(run, y, best[1], dflt),
            )
            results.append(row)
            print(
                f"{name:8s} M={m:<3d} N={n:6d} K={k:6d} | cuBLAS bf16 {t_bf * 1e3:6.1f} us | deq+cuBLAS "
                f"{row['deq_cublas_us']:6.1f} | v6 {row.get('v6_us', float('nan')):6.1f} | v5 {t5 * 1e3:6.1f} "
                f"(err {row.get('v5_rel_err', float('nan')):.1e}) | best v5 {best[0] * 1e3:6.1f} us "
                f"{row['best_GBs']:5.0f} GB/s {best[1]} (agrees: {row['best_agrees']})",
                flush=True,
            )
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
