"""Developer tooling for the GPU kernels, outside the runtime package: compile a kernel for sm_90 (Hopper) without
a GPU (only `pip install triton`), specialized as its launcher specializes it, and read its machine code with the
CUDA binary tools Triton ships (nvdisasm, cuobjdump). Used by the offline tests (tests/test_nvfp4_*.py) and by
benchmarks/sass_decode.py: registers, spills, shared memory and the main loop's instructions, cheap evidence
between GPU sessions that timings alone hide.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from qerl.kernels import fp4_decode, nvfp4_mma_sync, nvfp4_wgmma

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _cubin_tool(compiled, tool: str, *args: str) -> str:
    """Run one of the CUDA binary tools Triton ships (nvdisasm, cuobjdump) on a compiled kernel's cubin."""
    exe = os.path.join(BIN, tool)
    with tempfile.TemporaryDirectory() as d:
        cubin = os.path.join(d, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        return subprocess.run([exe, *args, cubin], capture_output=True, text=True, check=True).stdout


def disassemble(compiled) -> str:
    """The SASS of a compiled kernel (`triton.compile` output), by the nvdisasm Triton ships: no GPU needed."""
    return _cubin_tool(compiled, "nvdisasm", "-c")


def registers(compiled) -> int:
    """Registers a thread of a compiled kernel uses (cuobjdump's resource usage): no GPU needed."""
    return int(re.search(r"REG:(\d+)", _cubin_tool(compiled, "cuobjdump", "-res-usage")).group(1))


def main_loop(sass: str) -> list[str]:
    """The instructions of the longest loop in `disassemble`'s output: from a label to a conditional backward
    branch to it (an unconditional one is out-of-line code, e.g. an mbarrier wait's retry, jumping back in)."""
    labels, instrs, pending = {}, [], []
    for line in sass.splitlines():
        lab = re.match(r"^\.(L_x_\d+):", line)
        if lab:
            pending.append(lab.group(1))
            continue
        ins = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*)", line)
        if ins:
            addr = int(ins.group(1), 16)
            labels.update({p: addr for p in pending})
            pending = []
            instrs.append((addr, ins.group(2)))
    best: list[str] = []
    for addr, text in instrs:
        br = re.search(r"^@!?P\d\s+BRA\s+`\(\.(L_x_\d+)\)", text)
        if br and labels.get(br.group(1), 1 << 62) <= addr:
            loop = [t for a, t in instrs if labels[br.group(1)] <= a <= addr]
            if len(loop) > len(best):
                best = loop
    return best


def compile_partials_kernel(fn, const: dict, num_warps: int):
    """`triton.compile` of a Gluon partials kernel (`nvfp4_mma_sync._mma_kernel`, `nvfp4_wgmma._wg_kernel`: same arguments)
    for sm_90, specialized as the launcher is (16-byte aligned pointers, strides and word counts)."""
    from triton.experimental.gluon._runtime import GluonASTSource

    types = dict(x_ptr="*bf16", w_ptr="*i32", s_ptr="*u8", gs_ptr="*fp32", ws_ptr="*fp32", a_ptr="*fp32", h_ptr="*fp32")
    if "XS_L" in const:  # nvfp4_wgmma's TMA descriptor of x: [BM, 64] boxes in the plane's shared layout
        types["x_desc"] = f"tensordesc<bf16[{const['BM']}, 64],{const['XS_L']!r}>"
    aligned = ("KW", "k_per_split", "stride_xm", "stride_ww", "stride_sn", "stride_wss")
    sig = {a: "constexpr" if a in const else types.get(a, "i32") for a in fn.arg_names}
    attrs = {
        (i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if sig[a].startswith("*") or a in aligned
    }
    return triton.compile(
        GluonASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps)
    )


def compile_mma_sync(m: int, cfg: dict, shrink: bool = True):
    """`nvfp4_mma_sync._mma_kernel` for m rows and an `mma_config` tile, compiled for sm_90 offline."""
    const = nvfp4_mma_sync.mma_constexprs(m, cfg, shrink)
    return compile_partials_kernel(nvfp4_mma_sync._mma_kernel, const, cfg["num_warps"])


def compile_wgmma(m: int, cfg: dict, shrink: bool = True):
    """`nvfp4_wgmma._wg_kernel` for m rows and a `wgmma_config` tile, compiled for sm_90a offline."""
    const = nvfp4_wgmma.wgmma_constexprs(m, cfg, shrink)
    return compile_partials_kernel(nvfp4_wgmma._wg_kernel, const, cfg["num_warps"])


def compile_decode(m: int, n: int, k: int, cfg: dict, glu: bool = False, lora: int = 16):
    """`fp4_decode._decode_kernel` compiled for sm_90 offline as `fp4_decode_linear` would launch it (bf16 activations, NVFP4, LoRA rank 16)."""
    fn = fp4_decode._decode_kernel
    kw = k // 8
    split, kps, const = fp4_decode.decode_tiling("nvfp4", m, k, cfg, w_bf16=True)
    options = dict(num_warps=const.pop("num_warps"), num_stages=const.pop("num_stages"))
    const.update(
        HAS_BIAS=False,
        LORA_R=lora if split == 1 else 0,
        LORA_RP=16,
        NSEG=1,
        HS_P=16 if split == 1 else 1,
        GLU=glu,
        SHRINK_R=48 if cfg.get("SHRINK") and split > 1 else 0,
        SHRINK_BK=fp4_decode.shrink_block_k(const["BLOCK_M"]),
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
