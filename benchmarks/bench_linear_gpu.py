"""Every linear kernel on a model's decode shapes, side by side: which is fastest at each row count, and how far
each is from the memory bound.

Per fused layer (q|k|v, o, gate|up, down) and row count: the product alone (no bias or LoRA; NVFP4 weights, bf16
x), medians of CUDA-graph replays, for each kernel `qerl.kernels.choice.LinearKernel` names that can take the rows
(default tile), plus cuBLAS on a bf16 copy of the weight. `*` marks `choose_linear_kernel`'s pick. `wgmma` is
timed on natural x (one reordering gather first) and on x already in plane order (the decode step's case).
Byte model: a decode product must read the packed weight and its scales once (0.5625 bytes a weight; bf16: 2);
GB/s = those bytes / time, beside the device-to-device copy bandwidth measured in the same run (read + write).
Usage: python benchmarks/bench_linear_gpu.py [--model qwen2.5-7b] [--rows 1,8,16,64,128] [--out FILE.json]
"""

import argparse

import torch

from qerl.bench import copy_bandwidth, graph_time_us, random_nvfp4_layers, write_rows
from qerl.kernels.choice import TC_MAX_ROWS, LinearKernel, choose_linear_kernel
from qerl.kernels.common import to_planes
from qerl.kernels.fused_linear import fused_linear
from qerl.kernels.nvfp4_mma_sync import MMA_MAX_M
from qerl.kernels.nvfp4_wgmma import WG_MAX_M

MAX_ROWS = {
    LinearKernel.MMA_SYNC: MMA_MAX_M,
    LinearKernel.WGMMA: WG_MAX_M,
    LinearKernel.GEMV: 8,
    LinearKernel.TC: TC_MAX_ROWS,
    LinearKernel.CUBLAS: 1 << 30,
}


def planes_txt(row: dict) -> str:
    return f"  wgmma(x in planes) {row['wgmma_planes_us']:.1f}" if "wgmma_planes_us" in row else ""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-7b")
    ap.add_argument("--rows", default="1,8,16,64,128")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}; copy {bw / 1e9:.0f} GB/s (read + write); {a.model}", flush=True)
    rows = []
    for layer in random_nvfp4_layers(a.model):
        q = layer.q
        for m in map(int, a.rows.split(",")):
            x = torch.randn(m, layer.k, device="cuda", dtype=torch.bfloat16)
            out = torch.empty(m, layer.n, device="cuda", dtype=torch.bfloat16)
            pick = choose_linear_kernel(m, "nvfp4", layer.k, x.device, x.dtype)
            row = dict(layer=layer.name, m=m, n=layer.n, k=layer.k, pick=pick.value)
            for kern in LinearKernel:
                if m > MAX_ROWS[kern]:
                    continue

                def run(kern=kern):
                    fused_linear(x, "nvfp4", q["weight_packed"], q["weight_scale"], layer.gs[:1], out=out, kernel=kern)

                try:
                    row[f"{kern.value}_us"] = graph_time_us(run)
                except Exception as e:  # a kernel that cannot run here (e.g. wgmma off Hopper): say so, go on
                    row[f"{kern.value}_us"] = float("nan")
                    print(f"  {kern.value}: {type(e).__name__}: {str(e).splitlines()[0]}", flush=True)
            if f"{LinearKernel.WGMMA.value}_us" in row:  # x in plane order, as the decode step's producers write it
                xp = to_planes(x)

                def planes(xp=xp):
                    fused_linear(
                        xp,
                        "nvfp4",
                        q["weight_packed"],
                        q["weight_scale"],
                        layer.gs[:1],
                        out=out,
                        kernel=LinearKernel.WGMMA,
                        x_planes=True,
                    )

                row["wgmma_planes_us"] = graph_time_us(planes)
            row["cublas_bf16_us"] = graph_time_us(lambda: torch.mm(x, layer.wb.t(), out=out))
            us = row[f"{pick.value}_us"]
            row["pick_GBs"] = layer.nbytes / us / 1e3
            row["pick_pct_copy"] = 100 * layer.nbytes / us / 1e3 / (bw / 1e9)
            rows.append(row)
            times = "  ".join(
                f"{k.value}{'*' if k is pick else ''} {row[f'{k.value}_us']:.1f}"
                for k in LinearKernel
                if f"{k.value}_us" in row
            )
            print(
                f"{layer.name:8s} M={m:<4d} us: {times}{planes_txt(row)}  cublas-bf16 {row['cublas_bf16_us']:.1f} | pick "
                f"{row['pick_GBs']:.0f} GB/s = {row['pick_pct_copy']:.0f}% of copy",
                flush=True,
            )
    write_rows(a.out, rows, copy_Bps=bw)


if __name__ == "__main__":
    main()
