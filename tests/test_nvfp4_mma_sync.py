"""`nvfp4_mma_sync` (NVFP4 decode linear on register-fed tensor cores, Gluon) against the plain-PyTorch reference."""

import pytest
import torch
from conftest import check_fused_nvfp4, check_fused_options

from qerl.kernels import nvfp4_mma_sync
from qerl.kernels.choice import LinearKernel, choose_linear_kernel
from qerl.kernels.common import HAS_GLUON, PAIR_ASM
from qerl.quant import nvfp4_dequantize

gluon = pytest.mark.skipif(not HAS_GLUON, reason="needs Triton with Gluon")
hopper = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)),
    reason="needs a Hopper (sm_90+) GPU",
)


def _run_ptx(asm: str, args: dict[str, int]) -> dict[str, int]:
    """Execute the decode asm's instructions (prmt, shl, shr, and, or, mul.lo.u32, mul.rn.bf16x2) on 32-bit integers."""
    import re

    regs = dict(args)
    val = lambda a: int(a, 16) if a.startswith("0x") else regs[a]  # noqa: E731

    def bf16(bits):
        return torch.tensor([bits - (1 << 16) * (bits >> 15)], dtype=torch.int16).view(torch.bfloat16).float().item()

    def to_bits(v):
        return int(torch.tensor([v], dtype=torch.float64).to(torch.bfloat16).view(torch.int16).item()) & 0xFFFF

    for ins in re.findall(r"([a-z.0-9]+) ([^;{}]+);", asm):
        op, ops = ins[0], [o.strip() for o in ins[1].split(",")]
        if op == ".reg":
            continue
        d, a = ops[0], val(ops[1])
        if op == "prmt.b32":
            src = val(ops[1]) | (val(ops[2]) << 32)
            sel = val(ops[3])
            r = 0
            for i in range(4):
                n = (sel >> (4 * i)) & 0xF
                assert n < 8  # no sign-replicate mode
                r |= ((src >> (8 * n)) & 0xFF) << (8 * i)
        elif op == "shl.b32":
            r = (a << int(ops[2])) & 0xFFFFFFFF
        elif op == "shr.b32":
            r = a >> int(ops[2])
        elif op == "mul.lo.u32":
            r = (a * val(ops[2])) & 0xFFFFFFFF
        elif op == "and.b32":
            r = a & val(ops[2])
        elif op == "or.b32":
            r = a | val(ops[2])
        elif op == "mul.rn.bf16x2":
            b = val(ops[2])
            r = to_bits(bf16(a & 0xFFFF) * bf16(b & 0xFFFF)) | to_bits(bf16(a >> 16) * bf16(b >> 16)) << 16
        else:
            raise AssertionError(f"unexpected instruction {op}")
        regs[d] = r
    return regs


def _bf16_value(bits: int) -> float:
    return torch.tensor([bits - (1 << 16) * (bits >> 15)], dtype=torch.int16).view(torch.bfloat16).float().item()


def test_in_word_decode_asm_matches_reference_on_cpu():
    """The decode's PTX (`PAIR_ASM`, run by a small interpreter, no GPU): for random words and E4M3 block scales
    (normal, subnormal, zero), output j holds nibble j of the word in its low half and nibble j + 4 in its high
    half, each exactly E2M1(code) * scale * 2**-16 (the reference dequantization before the global scale)."""
    g = torch.Generator().manual_seed(1)
    words = torch.randint(0, 2**32, (64,), generator=g, dtype=torch.int64).tolist() + [
        0x88888888,
        0x77777777,
        0xF7F7F7F7,
        0x12345678,
    ]
    scales = torch.cat([torch.randint(1, 0x7F, (60,), generator=g), torch.tensor([1, 7, 0x7E, 0, 0x08, 0x40, 3, 0x77])])
    for w, sbyte in zip(words, scales.tolist()):
        packed = torch.tensor([[(w >> (8 * j)) & 0xFF for j in range(4)] * 2], dtype=torch.uint8)  # a 16-value block
        scale = torch.tensor([[sbyte]], dtype=torch.uint8).view(torch.float8_e4m3fn)
        ref = nvfp4_dequantize(
            dict(weight_packed=packed, weight_scale=scale, weight_global_scale=torch.ones(1)), torch.float32
        )[0]
        s2 = int(torch.tensor([scale.float().item() * 2.0**110]).to(torch.bfloat16).view(torch.int16).item()) & 0xFFFF
        out = _run_ptx(PAIR_ASM, {"$4": w, "$5": w, "$6": s2 | s2 << 16, "$7": s2 | s2 << 16})
        for j in range(4):
            for half in (0, 1):
                got = _bf16_value((out[f"${j}"] >> (16 * half)) & 0xFFFF)
                assert got == ref[j + 4 * half].item() * 2.0**-16, (hex(w), j, half, sbyte)


@gluon
@pytest.mark.parametrize("m,nw,r", [(8, 4, 1), (16, 1, 2), (32, 2, 1)])
def test_compiles_for_hopper_without_shared_memory(m, nw, r):
    """Offline (no GPU): every conversion to an MMA operand layout is asserted trivial at compile time, and
    the compiled kernel uses no shared memory and spills nothing."""
    cfg = dict(num_warps=nw, RPW=r, BKW=32)
    from dev.sass import compile_mma_sync, disassemble

    ck = compile_mma_sync(m, cfg, shrink=m == 8)  # 8 rows: with the LoRA shrink's extra programs
    assert ck.metadata.shared == 0
    assert "local_alloc" not in ck.asm["ttgir"] and "mma.sync" in ck.asm["ptx"]
    sass = disassemble(ck)  # spills show up as local-memory stores in the machine code
    assert "HMMA" in sass and "STL" not in sass and "STS" not in sass


@gluon
def test_decode_loop_length():
    """Offline (no GPU), 8 rows, 4 warps x 2 row tiles: the main loop (sm_90 machine code) stays at the in-word
    decode's 759 instructions (2.96 a weight; 855 with the word-pair decode it replaced), 16-byte loads of the
    words (8 a step) and no more than 143 registers: a regression here costs every decode step."""
    from dev.sass import compile_mma_sync, disassemble, main_loop, registers

    ck = compile_mma_sync(8, dict(num_warps=4, RPW=2, BKW=32), shrink=False)
    loop = main_loop(disassemble(ck))
    assert len(loop) <= 770, len(loop)
    assert sum("LDG.E.128" in i for i in loop) >= 8 and registers(ck) <= 143


def test_config_follows_the_measured_tiles():
    """The H200 sweeps' best tiles for Qwen2.5-7B; splits keep two steps of K each."""
    qkv, o = nvfp4_mma_sync.mma_config(8, 4608, 3584), nvfp4_mma_sync.mma_config(8, 3584, 3584)
    assert (o["num_warps"], o["BLOCK_N"], o["SPLIT"]) == (4, 128, 7)  # 14 steps: 7 splits of 2 (the sweep: 14)
    assert qkv["MMA"] and qkv["BLOCK_N"] == 128 and qkv["SPLIT"] == 7
    assert nvfp4_mma_sync.mma_config(8, 18944, 3584)["SPLIT"] == 4  # gate|up: 148 tiles of 128 rows, 4 splits
    assert nvfp4_mma_sync.mma_config(16, 18944, 3584)["SPLIT"] == 4
    gu1 = nvfp4_mma_sync.mma_config(1, 18944, 3584)
    assert (gu1["BLOCK_N"], gu1["SPLIT"]) == (64, 4)
    down = nvfp4_mma_sync.mma_config(8, 3584, 18944)
    assert (down["num_warps"], down["BLOCK_N"], down["SPLIT"]) == (4, 64, 8)
    assert nvfp4_mma_sync.mma_config(1, 3584, 18944)["BLOCK_N"] == 32
    assert nvfp4_mma_sync.mma_config(32, 3584, 18944)["BLOCK_N"] == 32  # one tile a warp above 16 rows (registers)
    assert nvfp4_mma_sync.mma_config(8, 64, 512)["SPLIT"] == 1  # 2 steps of 32 words: no room to split


@hopper
@gluon
@pytest.mark.gpu
@pytest.mark.parametrize(
    "tile", [(4, 1, 1), (1, 1, 3), (1, 2, 2), (2, 2, 5), (2, 1, 3), (4, 2, 2)], ids=lambda t: "w{}-r{}-s{}".format(*t)
)
@pytest.mark.parametrize("k", [768, 1280])
def test_matches_reference(tile, k):
    """q|k|v segments (own global scales, bias, LoRA from h or from A) and gate|up with SiLU, M = 1..32,
    N not a multiple of the tile, more splits than steps (empty splits write zeros), poisoned outputs."""
    nw, r_, split = tile
    cfg = dict(MMA=True, BLOCK_N=16 * nw * r_, BKW=32, RPW=r_, SPLIT=split, num_warps=nw)
    check_fused_nvfp4(cfg, k, (1, 3, 5, 8, 13, 16, 17, 32))


@hopper
@gluon
@pytest.mark.gpu
def test_chosen_by_default_and_agrees_with_the_portable_kernels():
    """On Hopper, bf16 rows 1..8 of an NVFP4 weight go to `mma_sync` (the choice), 9+ to `wgmma`; the portable
    kernels give the same results on the same rows."""
    dev, bf = torch.device("cuda"), torch.bfloat16
    assert choose_linear_kernel(1, "nvfp4", 3584, dev, bf) is LinearKernel.MMA_SYNC
    assert choose_linear_kernel(8, "nvfp4", 3584, dev, bf) is LinearKernel.MMA_SYNC
    assert choose_linear_kernel(9, "nvfp4", 3584, dev, bf) is LinearKernel.WGMMA
    check_fused_options((1, 8), [dict(), dict(kernel=LinearKernel.GEMV), dict(kernel=LinearKernel.TC)])
