"""`nvfp4_wgmma` (NVFP4 decode linear on warpgroup MMA, weights decoded into registers, x in shared memory by
TMA, in plane order) against the plain-PyTorch reference; the plane order and its producers."""

import re

import pytest
import torch
from conftest import check_fused_nvfp4, check_fused_options

from qerl.kernels import choice, nvfp4_wgmma
from qerl.kernels.choice import LinearKernel, choose_linear_kernel
from qerl.kernels.common import HAS_GLUON, natural_col, plane_col, to_planes

gluon = pytest.mark.skipif(not HAS_GLUON, reason="needs Triton with Gluon")
hopper = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9), reason="needs a Hopper (sm_90) GPU"
)


@gluon
@pytest.mark.parametrize("m,nw", [(16, 8), (33, 4), (64, 8), (64, 4), (128, 8), (128, 4)])
def test_compiles_for_hopper(m, nw):
    """Offline (no GPU): every conversion to the A operand is asserted trivial at compile time; the loop
    issues warpgroup MMAs and TMA copies of x (no x through registers: no shared-memory stores or loads of its
    own), at most 6 barriers a step (x read before TMA refills it, and those Gluon puts around the one-thread TMA
    issues), and nothing spills; shared memory is the NS steps
    of 4 planes of [BM, 64] bf16 and the mbarriers. (The loop is looked at without the LoRA shrink programs:
    from 64 rows a thread's shrink step is the longer loop.)"""
    from dev.sass import compile_wgmma, disassemble, main_loop, registers

    bm = max(16, 1 << (m - 1).bit_length())
    for ns, pf in ((1, m <= 64), (2, False)):
        cfg = dict(num_warps=nw, NS=ns, PF=pf)
        ck = compile_wgmma(m, cfg, shrink=True)
        assert ns * 4 * bm * 64 * 2 <= ck.metadata.shared <= ns * 4 * bm * 64 * 2 + 64
        assert "STL" not in disassemble(ck)
        loop = main_loop(disassemble(compile_wgmma(m, cfg, shrink=False)))
        ops = [re.sub(r"^@!?U?P\w+\s+", "", i).split()[0] for i in loop]  # predicates dropped
        assert sum(op.startswith("HGMMA") for op in ops) == 16  # 4 planes x 4 steps of k16
        assert sum(op.startswith("UTMALDG") for op in ops) >= 1
        assert sum(op.startswith("BAR.SYNC") for op in ops) <= 6  # x read; Gluon's around the one-thread TMA issues
        assert not any(op.startswith(("STS", "LDS")) for op in ops)
        assert registers(ck) <= (168 if m <= 64 else (232 if nw == 8 else 255)), registers(ck)


def test_plane_order():
    """(CPU) `plane_col` / `natural_col` invert each other within 256-column blocks, and `to_planes` is the
    kernel's operand order: columns 8 w + j + 4 h of a block go to plane j at k = h + 2 w2 + 4 w3 + 8 w0 + 16 w1
    + 32 w4 (the reshape below spells that order out)."""
    c = torch.arange(1024)
    assert torch.equal(natural_col(plane_col(c)), c) and torch.equal(plane_col(natural_col(c)), c)
    assert sorted(plane_col(c).tolist()) == c.tolist()
    assert (
        plane_col(0) == 0 and plane_col(1) == 64 and plane_col(4) == 1 and plane_col(8) == 8 and plane_col(256) == 256
    )
    x = torch.randn(3, 512)
    t = x.reshape(3, 2, 2, 2, 2, 2, 2, 2, 2, 2)  # (m, block, w4, w3, w2, w1, w0, h, j1, j0)
    assert torch.equal(to_planes(x), t.permute(0, 1, 8, 9, 2, 5, 6, 3, 4, 7).reshape(3, 512))
    y = torch.empty_like(x)
    y[:, plane_col(torch.arange(512))] = x  # what a producer writing plane order does
    assert torch.equal(y, to_planes(x))


def test_config_follows_the_measured_tiles():
    """The sweeps' tiles for Qwen2.5-7B (gate|up: 4 warps, about 1056 programs up to 32 rows, 264 at 64 and 128;
    q|k|v and o: 4 warps, 264; down: 8 warps up to 32 rows, 4 at 64 (264 programs) and 128 (528)); 32 words a
    step; K split until about that many programs, each split at least two steps; the words a step ahead (PF)
    for gate|up at 64 rows and everything up to 32, never at 128."""
    gu, qkv = nvfp4_wgmma.wgmma_config(64, 18944, 3584), nvfp4_wgmma.wgmma_config(64, 4608, 3584)
    assert gu["WGMMA"] and gu["BKW"] == 32 and gu["num_warps"] == 4 and gu["BLOCK_N"] == 64
    assert gu["SPLIT"] == 1 and qkv["SPLIT"] == 4  # 296 tiles x 1 = 296; 72 tiles x 4 = 288
    assert nvfp4_wgmma.wgmma_config(16, 3584, 3584)["SPLIT"] == 5  # 56 tiles x 5 = 280
    assert nvfp4_wgmma.wgmma_config(16, 18944, 3584)["SPLIT"] == 4  # 296 tiles x 4 = 1184
    assert nvfp4_wgmma.wgmma_config(32, 3584, 18944)["num_warps"] == 8
    assert nvfp4_wgmma.wgmma_config(64, 3584, 18944)["SPLIT"] == 5  # down: 56 tiles x 5 = 280
    assert nvfp4_wgmma.wgmma_config(128, 3584, 18944)["SPLIT"] == 9  # down: 56 tiles x 9 = 504
    assert {
        nvfp4_wgmma.wgmma_config(128, n, k)["num_warps"] for n, k in ((4608, 3584), (18944, 3584), (3584, 18944))
    } == {4}
    assert gu["NS"] == 1 and gu["PF"] and not qkv["PF"] and not nvfp4_wgmma.wgmma_config(64, 3584, 18944)["PF"]
    assert nvfp4_wgmma.wgmma_config(16, 4608, 3584)["PF"]
    assert not any(nvfp4_wgmma.wgmma_config(128, n, k)["PF"] for n, k in ((4608, 3584), (18944, 3584), (3584, 18944)))


@hopper
@gluon
@pytest.mark.gpu
@pytest.mark.parametrize("nw,split,ns,pf", [(4, 1, 1, True), (8, 3, 2, False), (4, 5, 1, False), (8, 1, 2, True)])
@pytest.mark.parametrize("k", [768, 1280])
def test_matches_reference(nw, split, ns, pf, k):
    """q|k|v segments with bias and LoRA (from h or from the kernel's shrink programs, which read x in plane
    order) and gate|up with SiLU for 9..128 rows (x's rows padded to 16, 32, 64, 128; past 64 with 4 and 8
    warps), more splits than steps, x one or two steps ahead, words loaded ahead or not, poisoned outputs."""
    cfg = dict(MMA=True, WGMMA=True, BLOCK_N=16 * nw, BKW=32, SPLIT=split, num_warps=nw, NS=ns, PF=pf)
    check_fused_nvfp4(cfg, k, (9, 16, 17, 31, 32, 33, 50, 64) + ((100, 128) if nw == 8 or split == 5 else ()))


@hopper
@gluon
@pytest.mark.gpu
def test_chosen_by_default_and_agrees_with_tc_and_cublas():
    """On Hopper, bf16 rows 9..128 of an NVFP4 weight go to `wgmma`; `tc` (to 64 rows) and cuBLAS agree."""
    dev, bf = torch.device("cuda"), torch.bfloat16
    assert choose_linear_kernel(16, "nvfp4", 3584, dev, bf) is LinearKernel.WGMMA
    assert choose_linear_kernel(128, "nvfp4", 3584, dev, bf) is LinearKernel.WGMMA
    assert choose_linear_kernel(129, "nvfp4", 3584, dev, bf) is LinearKernel.CUBLAS
    check_fused_options((12, 64), [dict(), dict(kernel=LinearKernel.TC), dict(kernel=LinearKernel.CUBLAS)])


_INTERPRETED_PRODUCERS = """
import torch
from qerl.kernels.common import to_planes
from qerl.kernels.linear_epilogue import linear_epilogue
from qerl.kernels.rmsnorm import add_rmsnorm

torch.manual_seed(0)
x, w = torch.randn(3, 768), torch.rand(768) + 0.5
assert torch.equal(add_rmsnorm(x.clone(), w, 1e-6, planes=True), to_planes(add_rmsnorm(x.clone(), w, 1e-6)))
p = torch.randn(2, 5, 1024)
assert torch.equal(linear_epilogue(p, glu=True, planes=True), to_planes(linear_epilogue(p, glu=True)))
p, b, h = torch.randn(2, 5, 512), torch.randn(512, 4), torch.randn(1, 5, 4)
y = linear_epilogue(p, lora_h=h, lora_B=b, lora_rank=4)
assert torch.equal(linear_epilogue(p, lora_h=h, lora_B=b, lora_rank=4, planes=True), to_planes(y))
print("ok")
"""


def test_producers_write_plane_order_interpreted():
    """(CPU, Triton's interpreter) RMSNorm and the linear epilogue (gate|up with SiLU; LoRA) asked for plane order
    write exactly `to_planes` of what they write otherwise: the in-register reordering (`common.planes_tile`) on
    random data without a GPU (the attention merge's plane order: the GPU test below)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", _INTERPRETED_PRODUCERS], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


@hopper
@gluon
@pytest.mark.gpu
def test_plane_order_in_and_out_of_the_decode_step_kernels():
    """x given in plane order (as the decode step's producers write it) gives the same y as natural x, for the
    product and the fused LoRA shrink; y written in plane order (for the next wgmma) is y's `to_planes`, from
    the wgmma, cuBLAS and tc epilogues; RMSNorm and the attention merge write plane order exactly."""
    from qerl.kernels.decode_attention import decode_attention
    from qerl.kernels.fused_linear import fused_linear
    from qerl.kernels.rmsnorm import add_rmsnorm
    from qerl.quant import nvfp4_quantize

    torch.manual_seed(0)
    n, k, r = 1024, 768, 8
    d = nvfp4_quantize(torch.randn(n, k, device="cuda"))
    wq = (d["weight_packed"], d["weight_scale"], d["weight_global_scale"])
    a, b = torch.randn(r, k, device="cuda") * 0.1, torch.randn(n, r, device="cuda")
    for m in (9, 64, 100):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        lora = dict(lora_B=b, lora_rank=r, lora_scale=0.5, lora_A=a, h_out=torch.empty(16 * m * r, device="cuda"))
        ref = fused_linear(x, "nvfp4", *wq, **lora)
        got = fused_linear(to_planes(x), "nvfp4", *wq, **lora, kernel=W, x_planes=True)
        assert torch.equal(got, ref), m
        for kernel in (W, C, T) if m <= 64 else (W, C):
            y = fused_linear(x, "nvfp4", *wq, **lora, kernel=kernel)
            assert torch.equal(fused_linear(x, "nvfp4", *wq, **lora, kernel=kernel, out_planes=True), to_planes(y))
        with pytest.raises(ValueError):
            fused_linear(x, "nvfp4", *wq, kernel=C, x_planes=True)
        resid, delta = torch.randn(m, k, device="cuda", dtype=torch.bfloat16), torch.randn_like(x)
        w = torch.rand(k, device="cuda") + 0.5
        y = add_rmsnorm(resid.clone(), w, 1e-6, delta=delta)
        assert torch.equal(add_rmsnorm(resid.clone(), w, 1e-6, delta=delta, planes=True), to_planes(y))
    q = torch.randn(12, 8, 128, device="cuda", dtype=torch.bfloat16)
    kc, vc = (torch.randn(12, 2, 64, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mask, nk = torch.ones(12, 64, device="cuda", dtype=torch.int32), torch.tensor([50], device="cuda")
    att = decode_attention(q, kc, vc, mask, nk, 2)
    assert torch.equal(decode_attention(q, kc, vc, mask, nk, 2, planes=True), to_planes(att))


M, W, G, T, C = (LinearKernel.MMA_SYNC, LinearKernel.WGMMA, LinearKernel.GEMV, LinearKernel.TC, LinearKernel.CUBLAS)


@pytest.mark.parametrize(
    "sm,dtype,fmt,k,decode,expect",
    [
        (90, torch.bfloat16, "nvfp4", 3584, True, {1: M, 8: M, 9: W, 64: W, 128: W, 129: C}),
        (90, torch.bfloat16, "nvfp4", 3584, False, {1: M, 8: M, 9: C, 64: C}),  # prefill / training forwards
        (90, torch.bfloat16, "nvfp4", 704, True, {1: G, 4: G, 5: T, 64: T, 65: C}),  # K % 256 != 0
        (90, torch.bfloat16, "mxfp4", 3584, True, {1: G, 5: T, 64: T, 100: C}),
        (90, torch.float32, "nvfp4", 3584, True, {1: G, 5: T, 100: C}),
        (100, torch.bfloat16, "nvfp4", 3584, True, {1: M, 32: M, 33: T, 64: T, 65: C}),  # mma.sync, no wgmma
        (80, torch.bfloat16, "nvfp4", 3584, True, {1: G, 5: T, 65: C}),
        (90, torch.bfloat16, "bf16", 3584, True, {1: C, 64: C}),
    ],
)
def test_kernel_choice_by_rows(monkeypatch, sm, dtype, fmt, k, decode, expect):
    """(CPU) `choose_linear_kernel` for each row count on a modelled GPU of compute capability sm."""
    monkeypatch.setattr(
        choice, "mma_supported", lambda d, t, f, kk: sm >= 90 and t == torch.bfloat16 and f == "nvfp4" and kk % 256 == 0
    )
    monkeypatch.setattr(
        choice,
        "wgmma_supported",
        lambda d, t, f, kk: sm == 90 and t == torch.bfloat16 and f == "nvfp4" and kk % 256 == 0,
    )
    got = {m: choose_linear_kernel(m, fmt, k, torch.device("cpu"), dtype, decode=decode) for m in expect}
    assert got == expect
    narrowed = choose_linear_kernel(8, fmt, k, torch.device("cpu"), dtype, allow={G, T, C})
    assert narrowed in (T, C)
