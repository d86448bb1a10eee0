"""`nvfp4_wgmma` (NVFP4 decode linear on warpgroup MMA, weights decoded into registers, x in shared memory)
against the plain-PyTorch reference."""

import pytest
import torch
from conftest import check_fused_nvfp4, check_fused_options

from qerl.kernels import choice, nvfp4_wgmma
from qerl.kernels.choice import LinearKernel, choose_linear_kernel
from qerl.kernels.common import HAS_GLUON

gluon = pytest.mark.skipif(not HAS_GLUON, reason="needs Triton with Gluon")
hopper = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9), reason="needs a Hopper (sm_90) GPU"
)


@gluon
@pytest.mark.parametrize("m,nw", [(16, 8), (33, 4), (64, 8), (64, 4), (128, 8), (128, 4)])
def test_compiles_for_hopper(m, nw):
    """Offline (no GPU): every conversion to the A operand is asserted trivial at compile time; the loop
    issues warpgroup MMAs, reads nothing back from shared memory itself (x is the MMA's operand there, the
    weights stay in registers), and nothing spills; x's staging buffer is 4 planes of [BM, 64] bf16, written
    by one store: two barriers a step (x written; x read). (The loop is looked at without the LoRA shrink
    programs: at 128 rows a thread's shrink step is the longer loop.)"""
    from dev.sass import compile_wgmma, disassemble, main_loop, registers

    ck = compile_wgmma(m, dict(num_warps=nw), shrink=True)
    bm = max(16, 1 << (m - 1).bit_length())
    assert ck.metadata.shared == 4 * bm * 64 * 2
    assert "STL" not in disassemble(ck)
    sass = disassemble(compile_wgmma(m, dict(num_warps=nw), shrink=False))
    loop = "\n".join(main_loop(sass))
    assert loop.count("HGMMA") == 16  # 4 planes x 4 steps of k16
    assert loop.count("BAR.SYNC") == 2
    assert "LDS" not in loop and "STL" not in sass
    assert registers(ck) <= (168 if m <= 64 else (232 if nw == 8 else 255))
    assert any(i.split()[0].startswith("STS") for i in main_loop(sass))


def test_config_follows_the_measured_tiles():
    """The H200 sweep's tiles for Qwen2.5-7B (gate|up: 4 warps, about 1056 programs up to 32 rows, 528 at 64;
    q|k|v and o: 4 warps, 264; down: 8 warps up to 32 rows, 4 at 64, 264, 528 at 128; 4 warps for every shape at
    128 rows); 32 words a step; K split until about that many programs, each split at least two steps."""
    gu, qkv = nvfp4_wgmma.wgmma_config(64, 18944, 3584), nvfp4_wgmma.wgmma_config(64, 4608, 3584)
    assert gu["WGMMA"] and gu["BKW"] == 32 and gu["num_warps"] == 4 and gu["BLOCK_N"] == 64
    assert gu["SPLIT"] == 2 and qkv["SPLIT"] == 4  # 296 tiles x 2 = 592; 72 tiles x 4 = 288
    assert nvfp4_wgmma.wgmma_config(16, 3584, 3584)["SPLIT"] == 5  # 56 tiles x 5 = 280
    assert nvfp4_wgmma.wgmma_config(16, 18944, 3584)["SPLIT"] == 4  # 296 tiles x 4 = 1184
    assert nvfp4_wgmma.wgmma_config(32, 3584, 18944)["num_warps"] == 8
    assert nvfp4_wgmma.wgmma_config(64, 3584, 18944)["SPLIT"] == 5  # down: 56 tiles x 5 = 280
    assert nvfp4_wgmma.wgmma_config(128, 3584, 18944)["SPLIT"] == 9  # down: 56 tiles x 9 = 504
    assert {
        nvfp4_wgmma.wgmma_config(128, n, k)["num_warps"] for n, k in ((4608, 3584), (18944, 3584), (3584, 18944))
    } == {4}


@hopper
@gluon
@pytest.mark.gpu
@pytest.mark.parametrize("nw,split", [(4, 1), (8, 3), (4, 5), (8, 1)])
@pytest.mark.parametrize("k", [768, 1280])
def test_matches_reference(nw, split, k):
    """q|k|v segments with bias and LoRA (from h or from the kernel's shrink programs) and gate|up with SiLU
    for 9..128 rows (x's rows padded to 16, 32, 64, 128; past 64 with 4 and 8 warps), more splits than steps,
    poisoned outputs."""
    cfg = dict(MMA=True, WGMMA=True, BLOCK_N=16 * nw, BKW=32, SPLIT=split, num_warps=nw)
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
