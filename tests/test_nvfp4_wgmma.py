"""Version 8 of the NVFP4 decode linear (warpgroup MMA, weights decoded into registers, x in shared memory)
against the plain-PyTorch reference."""
import pytest
import torch

from conftest import check_fused_nvfp4, rel_err as rel
from qerl.kernels import nvfp4_wgmma
from qerl.kernels._triton import disassemble, main_loop, registers
from qerl.quant import nvfp4_dequantize, nvfp4_quantize

gluon = pytest.mark.skipif(not nvfp4_wgmma.HAS_GLUON, reason="needs Triton with Gluon")
hopper = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9),
                            reason="needs a Hopper (sm_90) GPU")


@gluon
@pytest.mark.parametrize("m,nw,xbuf", [(16, 8, 1), (33, 4, 2), (64, 8, 1), (64, 4, 2)])
def test_compiles_for_hopper(m, nw, xbuf):
    """Offline (no GPU): every conversion to the A operand is asserted trivial at compile time; the loop
    issues warpgroup MMAs, reads nothing back from shared memory itself (x is the MMA's operand there, the
    weights stay in registers), and nothing spills; x's staging buffers are xbuf x 4 planes of [BM, 64] bf16;
    two barriers a step (x written; x read, or the other buffer's stores ordered)."""
    ck = nvfp4_wgmma.compile_sm90(m, dict(num_warps=nw, XBUF=xbuf), shrink=True)
    bm = max(16, 1 << (m - 1).bit_length())
    assert ck.metadata.shared == xbuf * 4 * bm * 64 * 2
    sass = disassemble(ck)
    loop = "\n".join(main_loop(sass))
    assert loop.count("HGMMA") == 16  # 4 planes x 4 steps of k16
    assert loop.count("BAR.SYNC") == 2
    assert "LDS" not in loop and "STL" not in sass
    assert registers(ck) <= 168


def test_config_follows_the_measured_tiles():
    """The H200 sweep's tiles for Qwen2.5-7B (4 warps, about 528 programs; 264 for q|k|v, o and down at 64
    rows); 32 words a step; K split until about that many programs, each split at least two steps."""
    gu, qkv = nvfp4_wgmma.wgmma_config(64, 18944, 3584), nvfp4_wgmma.wgmma_config(64, 4608, 3584)
    assert gu["WGMMA"] and gu["BKW"] == 32 and gu["num_warps"] == 4 and gu["BLOCK_N"] == 64
    assert gu["SPLIT"] == 2 and qkv["SPLIT"] == 4  # 296 tiles x 2 = 592; 72 tiles x 4 = 288
    assert nvfp4_wgmma.wgmma_config(16, 3584, 3584)["SPLIT"] == 7  # 56 tiles: 7 splits of 2 steps (the cap)
    assert nvfp4_wgmma.wgmma_config(64, 3584, 18944)["SPLIT"] == 5  # down: 56 tiles x 5 = 280


@hopper
@gluon
@pytest.mark.gpu
@pytest.mark.parametrize("nw,split,xbuf", [(4, 1, 1), (8, 3, 1), (4, 5, 1), (4, 1, 2), (8, 3, 2)])
@pytest.mark.parametrize("k", [768, 1280])
def test_matches_reference(nw, split, xbuf, k):
    """q|k|v segments with bias and LoRA (from h or from the kernel's shrink programs) and gate|up with SiLU
    for 9..64 rows (x's rows padded to 16, 32, 64), more splits than steps, one or two x buffers, poisoned
    outputs."""
    cfg = dict(WORDS=True, MMA=True, WGMMA=True, BLOCK_N=16 * nw, BKW=32, SPLIT=split, num_warps=nw, XBUF=xbuf)
    check_fused_nvfp4(cfg, k, (9, 16, 17, 31, 32, 33, 50, 64))


@hopper
@gluon
@pytest.mark.gpu
def test_picked_by_default_and_off_switch():
    """fused_linear picks version 8 for 9..64 bf16 rows on Hopper, not with wgmma=False; both agree with
    the reference."""
    from qerl.kernels.fused_linear import fused_linear, pick_config

    assert pick_config(16, 4608, 3584, "nvfp4", mma=True, wgmma=True)["WGMMA"]
    assert not pick_config(8, 4608, 3584, "nvfp4", mma=True, wgmma=True).get("WGMMA")
    assert not pick_config(16, 4608, 3584, "nvfp4", mma=True, wgmma=False).get("WGMMA")
    d = nvfp4_quantize(torch.randn(300, 1024, device="cuda"))
    ref_w = nvfp4_dequantize(d, torch.float32)
    for m in (12, 64):
        x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
        args = (x, "nvfp4", d["weight_packed"], d["weight_scale"], d["weight_global_scale"])
        ref = x.float() @ ref_w.T
        for y in (fused_linear(*args), fused_linear(*args, wgmma=False)):
            assert rel(y, ref) < 1e-2
