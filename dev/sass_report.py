"""Offline look at the compiled decode kernels: no GPU needed, only `pip install triton`.

Compiles the kernel `qerl.kernels.choice.choose_linear_kernel` picks for each row count on an H100/H200 (or the
one named) for sm_90, with its default tile (or the one given), on a model's layer shapes, then reports what
ptxas and the disassembler say: registers per thread, spill bytes, whether wgmma is serialized, shared memory,
and the main loop's instruction count and mix, also per weight (loop instructions x threads / weights per
step). It is not a timing: compare candidates here, measure them on the GPU.

Usage: python -m dev.sass_report [--model qwen2.5-7b] [--rows 1,8,64] [--shapes "gate|up,down"]
       [--kernel mma_sync|wgmma|gemv|tc] [--config '{"BLOCK_N": 64, "BKW": 8, "num_warps": 8, "SHRINK": true}']
"""

import argparse
import collections
import json
import os
import re
import subprocess
import tempfile

from dev.sass import BIN, compile_decode, compile_mma_sync, compile_wgmma, disassemble, main_loop
from qerl.kernels import fp4_decode, nvfp4_mma_sync, nvfp4_wgmma
from qerl.kernels.choice import LinearKernel, kernel_for_rows
from qerl.modeling import ModelArgs

CONFIGS = {
    LinearKernel.MMA_SYNC: nvfp4_mma_sync.mma_config,
    LinearKernel.WGMMA: nvfp4_wgmma.wgmma_config,
    LinearKernel.GEMV: fp4_decode.gemv_config,
    LinearKernel.TC: fp4_decode.tc_config,
}


def hopper_choice(m: int) -> LinearKernel:
    """What `choose_linear_kernel` picks for m rows of bf16 x and an NVFP4 weight (K % 256 == 0) on an H100/H200."""
    return kernel_for_rows(m, fp4=True, mma_sync=True, wgmma=True)


def loop_mix(sass: str):
    """(instruction count, opcode histogram) of the main loop (`dev.sass.main_loop`)."""
    ops = [re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in main_loop(sass)]
    return len(ops), collections.Counter(ops)


def inspect(kernel: LinearKernel, m: int, n: int, k: int, cfg: dict, glu: bool = False) -> dict:
    if kernel is LinearKernel.WGMMA:
        ck = compile_wgmma(m, cfg)
    elif kernel is LinearKernel.MMA_SYNC:
        ck = compile_mma_sync(m, cfg)
    else:
        ck = compile_decode(m, n, k, cfg, glu)
    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "k.ptx")
        with open(ptx, "w") as f:
            f.write(ck.asm["ptx"])
        info = subprocess.run(
            [os.path.join(BIN, "ptxas"), "-arch=sm_90a", "-v", ptx, "-o", os.path.join(d, "x.cubin")],
            capture_output=True,
            text=True,
        ).stderr
    n_loop, hist = loop_mix(disassemble(ck))
    threads = 32 * cfg.get("num_warps", 4)
    return dict(
        regs=int(re.search(r"Used (\d+) registers", info).group(1)),
        spill_bytes=int(re.search(r"(\d+) bytes spill stores", info).group(1)),
        wgmma_serialized="C7513" in info,
        smem=ck.metadata.shared,
        loop_instrs=n_loop,
        instrs_per_weight=round(n_loop * threads / (cfg["BLOCK_N"] * cfg["BKW"] * 8), 2),
        loop_mix=dict(hist.most_common(10)),
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-7b")
    ap.add_argument("--rows", default="1,8,64")
    ap.add_argument("--shapes", default="qkv,o,gate|up,down")
    ap.add_argument("--config", default=None, help="JSON tile overrides for every row count")
    ap.add_argument("--kernel", default=None, help="mma_sync, wgmma, gemv or tc (default: the H100/H200 choice)")
    a = ap.parse_args()
    shapes = ModelArgs.from_name(a.model).fused_linear_shapes()
    for name in a.shapes.split(","):
        n_rows, k, glu = shapes[name]
        n = n_rows // 2 if glu else n_rows  # output rows, as fused_linear counts them
        for m in map(int, a.rows.split(",")):
            kernel = LinearKernel(a.kernel) if a.kernel else hopper_choice(m)
            if kernel is LinearKernel.CUBLAS:
                print(f"{name:8s} M={m:<3d} cublas: no qerl kernel")
                continue
            cfg = CONFIGS[kernel](m, n, k)
            cfg.update(json.loads(a.config) if a.config else {})
            r = inspect(kernel, m, n, k, cfg, glu)
            print(
                f"{name:8s} M={m:<3d} {kernel.value} BN{cfg['BLOCK_N']} BKW{cfg['BKW']} "
                f"w{cfg.get('num_warps', 4)} st{cfg.get('num_stages', 1)} split{cfg.get('SPLIT', 1)}: "
                f"{r['regs']} regs, {r['spill_bytes']} B spilled, wgmma serialized {r['wgmma_serialized']}, "
                f"smem {r['smem']} B, loop {r['loop_instrs']} instrs = {r['instrs_per_weight']} per weight "
                f"{r['loop_mix']}",
                flush=True,
            )


if __name__ == "__main__":
    main()
