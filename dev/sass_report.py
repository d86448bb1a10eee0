"""Offline look at the compiled decode kernels: no GPU needed, only `pip install triton`.

Compiles `qerl.kernels.fused_linear._decode_kernel` for sm_90 (Hopper) with the engine's
default tiles (or the ones given) on Qwen2.5 layer shapes, then reports what ptxas and the
disassembler say: registers per thread, spill bytes, whether wgmma is serialized, shared
memory, and the main loop's instruction count and mix, also per weight
(loop instructions x threads / weights per step). Cheap evidence between GPU sessions:
it shows register spills, shared-memory round trips and barriers that timings alone hide.
It is not a timing: compare candidates here, measure them on the GPU.

Usage: python benchmarks/sass_decode.py [--model qwen2.5-7b] [--rows 1,8,64] [--shapes "gate|up,down"]
       [--config '{"BLOCK_N": 64, "BKW": 8, "num_warps": 8, "SHRINK": true, "PDL": true}'] [--mma] [--wgmma]
(--mma: version 7, `qerl.kernels.nvfp4_mma`, at 1..32 rows; --wgmma: version 8, `qerl.kernels.nvfp4_wgmma`,
at 9..128 rows; their loops are counted per weight the same way)
"""

import argparse
import collections
import json
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from qerl.kernels import fused_linear as fl
from qerl.kernels import nvfp4_mma, nvfp4_wgmma
from qerl.kernels._triton import disassemble, main_loop
from qerl.modeling import ModelArgs

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_decode(m: int, n: int, k: int, cfg: dict, glu: bool = False, lora: int = 16):
    """Compile the decode kernel as `fused_linear` would launch it (bf16 activations, NVFP4, LoRA rank 16)."""
    fn = fl._decode_kernel
    kw = k // 8
    split, kps, const = fl._decode_tiling("nvfp4", m, k, cfg, w_bf16=True)
    options = dict(
        num_warps=const.pop("num_warps"), num_stages=const.pop("num_stages"), launch_pdl=bool(cfg.get("PDL", False))
    )
    const.update(
        HAS_BIAS=False,
        LORA_R=lora if split == 1 else 0,
        LORA_RP=16,
        NSEG=1,
        HS_P=16 if split == 1 else 1,
        GLU=glu,
        PDL=bool(cfg.get("PDL", False)),
        SHRINK_R=48 if cfg.get("SHRINK") and split > 1 else 0,
        SHRINK_BK=fl.shrink_block_k(const["BLOCK_M"]),
    )
    ptrs = dict(
        x_ptr="*bf16",
        w_ptr="*i32",
        s_ptr="*u8",
        gs_ptr="*fp32",
        bias_ptr="*u8",
        h_ptr="*fp32",
        lb_ptr="*fp32",
        y_ptr="*bf16" if split == 1 else "*fp32",
        ws_ptr="*fp32",
        a_ptr="*fp32",
    )
    ints = dict(
        M=m,
        N=n,
        KW=kw,
        k_per_split=kps,
        n1=n if glu else 1 << 30,
        n2=1 << 30,
        n_hsplit=14,
        lora_scale=1.0,
        stride_xm=k,
        stride_ww=kw,
        stride_sn=k // 16,
        stride_hs=m * 16,
        stride_hm=16,
        stride_lbn=16,
        stride_ym=n * (2 if glu else 1),
        stride_wss=m * n * 2,
        stride_ar=k,
    )
    sig, attrs, constexprs = {}, {}, {}
    for i, a in enumerate(fn.arg_names):  # the launcher's specialization: 16-aligned pointers and ints, ints == 1
        if a in const:
            sig[a], constexprs[a] = "constexpr", const[a]
        elif a in ptrs:
            sig[a], attrs[(i,)] = ptrs[a], [["tt.divisibility", 16]]
        elif isinstance(ints[a], float):
            sig[a] = "fp32"
        elif ints[a] == 1:
            sig[a], constexprs[a] = "constexpr", 1
        else:
            sig[a] = "i32"
            if ints[a] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", 90, 32), options=options)


def loop_mix(sass: str):
    """(instruction count, opcode histogram) of the main loop (`qerl.kernels._triton.main_loop`)."""
    ops = [re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in main_loop(sass)]
    return len(ops), collections.Counter(ops)


def inspect(m: int, n: int, k: int, cfg: dict, glu: bool = False) -> dict:
    if cfg.get("WGMMA"):
        ck = nvfp4_wgmma.compile_sm90(m, cfg)
    else:
        ck = nvfp4_mma.compile_sm90(m, cfg) if cfg.get("MMA") else compile_decode(m, n, k, cfg, glu)
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
    ap.add_argument("--mma", action="store_true", help="version 7 (Gluon, register-fed MMA) for the rows it takes")
    ap.add_argument("--wgmma", action="store_true", help="version 8 (Gluon, warpgroup MMA) for the rows it takes")
    a = ap.parse_args()
    shapes = ModelArgs.from_name(a.model).fused_linear_shapes()
    for name in a.shapes.split(","):
        n_rows, k, glu = shapes[name]
        n = n_rows // 2 if glu else n_rows  # output rows, as fused_linear counts them
        for m in map(int, a.rows.split(",")):
            cfg = fl.pick_config(m, n, k, "nvfp4", mma=a.mma, wgmma=a.wgmma)
            cfg.update(json.loads(a.config) if a.config else {})
            r = inspect(m, n, k, cfg, glu)
            ver = "v8" if cfg.get("WGMMA") else "v7" if cfg.get("MMA") else ("v5" if cfg.get("TC") else "v6")
            print(
                f"{name:8s} M={m:<3d} {ver} BN{cfg['BLOCK_N']} BKW{cfg['BKW']} "
                f"w{cfg.get('num_warps', 4)} st{cfg.get('num_stages', 1)} split{cfg.get('SPLIT', 1)}: "
                f"{r['regs']} regs, {r['spill_bytes']} B spilled, wgmma serialized {r['wgmma_serialized']}, "
                f"smem {r['smem']} B, loop {r['loop_instrs']} instrs = {r['instrs_per_weight']} per weight "
                f"{r['loop_mix']}",
                flush=True,
            )


if __name__ == "__main__":
    main()
