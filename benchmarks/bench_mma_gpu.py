"""Kernel-level timing of versions 7 (register-fed tensor cores, `qerl.kernels.nvfp4_mma`) and 8 (warpgroup
MMA, `qerl.kernels.nvfp4_wgmma`, from 9 rows: its default tile and warps x programs) against version 5
(tensor cores through shared memory) and cuBLAS on the bf16 weights, Qwen2.5 layer shapes, 1..64 rows.

Per shape and row count: medians of CUDA-graph replays (`do_bench_cudagraph`) of the whole `fused_linear`
call (decode kernel + epilogue launch), the engine's default choice (`default`: version 6 below 5 rows,
version 7 from 5), the default tile of each version and a sweep of version-7 tiles
(warps, 16-row tiles a warp, words a step, splits). GB/s counts the packed weight + scale bytes.
Usage: python benchmarks/bench_mma_gpu.py [--model qwen2.5-7b] [--rows 8,16,32] [--shapes "gate|up,down"]
       [--no-sweep] [--v8-only] [--maxnreg 128] [--out results.json]
"""

import argparse
import json

import torch

from qerl.bench import graph_time_us, random_nvfp4_layers
from qerl.kernels.fused_linear import TC_MAX_M, fused_linear, tc_config
from qerl.kernels.nvfp4_mma import MMA_MAX_M, mma_config
from qerl.kernels.nvfp4_wgmma import WG_MIN_M, wgmma_config

TILES = [(4, 1, 32), (1, 1, 32), (2, 1, 32), (1, 2, 32), (2, 2, 32), (4, 2, 32), (4, 1, 64), (1, 1, 64)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-7b")
    ap.add_argument("--rows", default="8,16,32")
    ap.add_argument("--shapes", default="qkv,o,gate|up,down")
    ap.add_argument("--maxnreg", default="", help="comma-separated register caps to time the default tile with")
    ap.add_argument("--no-sweep", dest="sweep", action="store_false", help="time the default tiles only")
    ap.add_argument("--v8-only", action="store_true", help="version 8 (wgmma, 9..128 rows) and its tile sweep only")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    a.maxnreg = [int(r) for r in a.maxnreg.split(",") if r]
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
        nout = n // 2 if glu else n
        for m in map(int, a.rows.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            y = torch.empty(m, nout, device="cuda", dtype=torch.bfloat16)

            def run(cfg):
                return lambda: fused_linear(
                    x, "nvfp4", d["weight_packed"], d["weight_scale"], gs, glu=glu, out=y, config=cfg
                )

            row = dict(
                shape=name,
                n=n,
                k=k,
                m=m,
                cublas_bf16_us=graph_time_us(lambda: x @ wb.T),
                v5_us=graph_time_us(run(tc_config(m, nout, k))) if m <= TC_MAX_M else float("nan"),
                default_us=graph_time_us(run(None)),
            )
            if m >= WG_MIN_M:  # version 8: its default tile and a sweep of warps x programs
                v8 = {
                    (nw, p): graph_time_us(run(wgmma_config(m, nout, k, num_warps=nw, programs=p)))
                    for nw in (4, 8)
                    for p in ((264, 528, 1056) if a.sweep else (None,))
                }
                row["v8_us"] = graph_time_us(run(wgmma_config(m, nout, k)))
                (nw, p), t = min(v8.items(), key=lambda kv: kv[1])
                row.update(v8_best_us=t, v8_best_tile=[nw, p], v8_sweep={f"{w}x{q}": v for (w, q), v in v8.items()})
                print(
                    f"{name:8s} M={m:<3d} cuBLAS bf16 {row['cublas_bf16_us']:7.1f} us | default {row['default_us']:7.1f} us"
                    f" | v5 {row['v5_us']:7.1f} us | v8 {row['v8_us']:7.1f} us {nbytes / row['v8_us'] / 1e3:5.0f} GB/s"
                    f" | v8 best {t:7.1f} us (warps {nw}, programs {p})",
                    flush=True,
                )
            if a.v8_only or m > MMA_MAX_M:
                results.append(row)
                continue
            d7 = mma_config(m, nout, k)
            run(d7)()
            y_default = y.float().clone()
            row["v7_us"] = graph_time_us(run(d7))
            for regs in a.maxnreg:  # the default tile with registers capped (more warps resident, maybe spills)
                row[f"v7_maxnreg{regs}_us"] = graph_time_us(run(dict(d7, MAXNREG=regs)))
                print(
                    f"{name:8s} M={m:<3d} v7 {row['v7_us']:7.1f} us, maxnreg {regs}: "
                    f"{row[f'v7_maxnreg{regs}_us']:7.1f} us",
                    flush=True,
                )
            best = (row["v7_us"], d7)
            for nw, r, bkw in TILES if a.sweep else []:
                if m > 16 and r > 1:  # x spills at 32 rows
                    continue
                base = mma_config(m, nout, k, num_warps=nw, rows_per_warp=r, bkw=bkw)
                for split in sorted({base["SPLIT"], max(1, base["SPLIT"] // 2), 2 * base["SPLIT"]}):
                    cfg = dict(base, SPLIT=split)
                    if (k // 8) // bkw < split or k % (8 * bkw):
                        continue
                    try:
                        t = graph_time_us(run(cfg))
                    except Exception as e:  # a tile that does not compile or fit
                        print("skip", cfg, type(e).__name__, str(e)[:120], flush=True)
                        continue
                    if t < best[0]:
                        best = (t, cfg)
            run(best[1])()
            agrees = bool(((y.float() - y_default).norm() / y_default.norm()) < 1e-2)
            row.update(
                v7_best_us=best[0],
                v7_best_cfg=best[1],
                v7_best_agrees=agrees,
                v5_GBs=nbytes / row["v5_us"] / 1e3,
                v7_GBs=nbytes / row["v7_us"] / 1e3,
                v7_best_GBs=nbytes / best[0] / 1e3,
            )
            results.append(row)
            print(
                f"{name:8s} M={m:<3d} cuBLAS bf16 {row['cublas_bf16_us']:7.1f} us | default {row['default_us']:7.1f} us | v5 {row['v5_us']:7.1f} us "
                f"{row['v5_GBs']:5.0f} GB/s | v7 {row['v7_us']:7.1f} us {row['v7_GBs']:5.0f} GB/s | v7 best "
                f"{best[0]:7.1f} us {row['v7_best_GBs']:5.0f} GB/s {best[1]} (agrees: {agrees})",
                flush=True,
            )
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), rows=results), f, indent=1)


if __name__ == "__main__":
    main()
