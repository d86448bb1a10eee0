"""GPU kernels against the plain-PyTorch references (fresh random data, poisoned outputs)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import qkv_lora

from qerl.modeling import KNOWN_MODELS, ModelArgs
from qerl.quant import QuantLinear, mxfp4_dequantize, mxfp4_quantize, nvfp4_dequantize, nvfp4_quantize

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
QUANT = {"nvfp4": (nvfp4_quantize, nvfp4_dequantize), "mxfp4": (mxfp4_quantize, mxfp4_dequantize)}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_triton_backend_on_cpu_raises_clear_error():
    from qerl.kernels import KernelUnavailable

    m = QuantLinear.from_weight(torch.randn(32, 64), "nvfp4")
    m.backend = "triton"
    with pytest.raises(KernelUnavailable):
        m(torch.randn(2, 64))


def _quantized(fmt, n, k, dev="cuda"):
    w = torch.randn(n, k, device=dev)
    if fmt == "bf16":
        return {"weight": w.bfloat16()}, w.bfloat16().float()
    q, dq = QUANT[fmt]
    d = q(w)
    return d, dq(d, torch.float32)


def _linear(fmt, d, x, out):
    from qerl.kernels.fused_linear import fused_linear

    return fused_linear(
        x, fmt, d.get("weight_packed", d.get("weight")), d.get("weight_scale"), d.get("weight_global_scale"), out=out
    )


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4", "bf16"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 3, 8, 13, 40, 64])
def test_fused_linear_odd_shapes(fmt, dtype, m):
    k = {"nvfp4": 208, "mxfp4": 224, "bf16": 200}[fmt]
    d, w = _quantized(fmt, 37, k)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    out = torch.full((m, 37), float("nan"), device="cuda", dtype=dtype)
    y = _linear(fmt, d, x, out)
    ref = x.float() @ w.to(dtype).float().T
    assert not y.isnan().any()
    assert rel(y, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("model", sorted(KNOWN_MODELS))
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_real_layer_shapes(model, fmt):
    """Every Linear shape of Qwen2.5-7B/14B/32B, decode (M=1, 8, 64) and dequantize+cuBLAS (M=200)."""
    from qerl.kernels import mxfp4_matmul, nvfp4_matmul  # noqa: F401  (register the ops)
    from qerl.kernels.dequant import dequantize

    c = ModelArgs.from_name(model)
    h, i, kvd = c.hidden_size, c.intermediate_size, c.num_kv_heads * c.head_dim
    for n, k in {(h, h), (kvd, h), (i, h), (h, i)}:
        d, w = _quantized(fmt, n, k)
        deq = torch.full((n, k), float("nan"), device="cuda", dtype=torch.bfloat16)
        dequantize(fmt, d["weight_packed"], d["weight_scale"], d.get("weight_global_scale"), torch.bfloat16, out=deq)
        assert torch.equal(deq, w.bfloat16()), (n, k)  # bit-exact
        wb = w.bfloat16().float()
        for m in (1, 8, 64):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
            y = _linear(fmt, d, x, out)
            assert rel(y, x.float() @ wb.T) < 1e-2, (n, k, m)
        op = torch.ops.qerl.nvfp4_matmul if fmt == "nvfp4" else torch.ops.qerl.mxfp4_matmul
        x = torch.randn(200, k, device="cuda", dtype=torch.bfloat16)
        args = (d["weight_packed"], d["weight_scale"]) + ((d["weight_global_scale"],) if fmt == "nvfp4" else ())
        assert rel(op(x, *args), x.float() @ wb.T) < 1e-2


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4", "bf16"])
@pytest.mark.parametrize("m", [1, 5, 70])
def test_quantlinear_forward_backward(fmt, m):
    """QuantLinear(backend='triton') = the reference module, forward and grad wrt x (LoRA live)."""
    from qerl.kernels import nvfp4_matmul  # noqa: F401  (registers the ops)

    k = 96 if fmt != "mxfp4" else 128
    ref = QuantLinear.from_weight(torch.randn(52, k, device="cuda"), fmt, bias=torch.randn(52, device="cuda"))
    ref.add_lora(8)
    ref.lora_B.data.normal_()
    fast = copy.deepcopy(ref)
    fast.backend = "triton"
    x = torch.randn(2, m, k, device="cuda", dtype=torch.float32, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y_ref, y = ref(x), fast(x2)
    assert rel(y, y_ref) < 1e-5
    g = torch.randn_like(y)
    y_ref.backward(g)
    y.backward(g)
    assert rel(x2.grad, x.grad) < 1e-5
    assert rel(fast.lora_B.grad, ref.lora_B.grad) < 1e-5


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 4, 24])
def test_fused_epilogues(dtype, m):
    """q|k|v segments (own global scales, bias, LoRA) and gate|up with SiLU, vs module composition."""
    from qerl.kernels.fused_linear import fused_linear
    from qerl.kernels.lora_shrink import lora_shrink

    k, r, sizes = 160, 16, (64, 16, 16)
    ws = [torch.randn(n, k, device="cuda") * s for n, s in zip(sizes, (1.0, 3.0, 0.5))]
    ds = [nvfp4_quantize(w) for w in ws]
    deq = torch.cat([nvfp4_dequantize(d, dtype).float() for d in ds])
    packed = torch.cat([d["weight_packed"] for d in ds])
    scale = torch.cat([d["weight_scale"] for d in ds])
    gs = torch.cat([d["weight_global_scale"] for d in ds])
    bias = torch.randn(sum(sizes), device="cuda", dtype=dtype)
    a, b = torch.randn(3 * r, k, device="cuda"), torch.randn(sum(sizes), r, device="cuda")
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    h = lora_shrink(x, a, out=torch.full((math.ceil(k / 64), m, 3 * r), float("nan"), device="cuda"), chunk=64)
    out = torch.full((m, sum(sizes)), float("nan"), device="cuda", dtype=dtype)
    y = fused_linear(x, "nvfp4", packed, scale, gs, bias, h, b, r, 0.5, (64, 80), out=out)
    lora = qkv_lora(x, a, b, r, sizes)
    ref = x.float() @ deq.T + bias.float() + 0.5 * lora
    assert rel(y, ref) < (1e-5 if dtype == torch.float32 else 1e-2)
    # gate | up
    wg = nvfp4_quantize(torch.randn(2 * 48, k, device="cuda"))
    deq = nvfp4_dequantize(wg, dtype).float()
    out = torch.full((m, 48), float("nan"), device="cuda", dtype=dtype)
    y = fused_linear(
        x, "nvfp4", wg["weight_packed"], wg["weight_scale"], wg["weight_global_scale"].repeat(2), glu=True, out=out
    )
    ref = F.silu(x.float() @ deq[:48].T) * (x.float() @ deq[48:].T)
    assert rel(y, ref) < (1e-5 if dtype == torch.float32 else 2e-2)


DECODE_CFGS = [  # the tiles gemv_config / tc_config pick and others (plain-Triton decode, one-warp programs)
    # gemv: CUDA cores with 16-byte weight loads, up to 8 rows
    (dict(BLOCK_N=64, BKW=32, SPLIT=1), (1, 2, 3, 8)),
    (dict(BLOCK_N=16, BKW=16, SPLIT=3, num_warps=1), (1, 2, 5)),
    (dict(BLOCK_N=32, BKW=8, SPLIT=2), (1, 4, 7)),
    (dict(BLOCK_N=32, BKW=16, SPLIT=2, PREFETCH=True), (1, 2, 6)),
    (dict(BLOCK_N=16, BKW=32, SPLIT=4, num_warps=1, PREFETCH=True), (1, 3, 4)),
    # tc: tensor cores (swap AB), up to 64 rows
    (dict(TC=True, BLOCK_N=64, BKW=16, SPLIT=1, num_stages=2), (1, 2, 8, 17, 64)),
    (dict(TC=True, BLOCK_N=32, BKW=16, SPLIT=3, num_stages=3), (3, 8, 33)),
    (dict(TC=True, BLOCK_N=128, BKW=8, SPLIT=2, num_warps=8), (1, 16, 40)),
    (dict(TC=True, BLOCK_N=64, BKW=16, SPLIT=2), (2, 16)),
    (dict(TC=True, BLOCK_N=64, BKW=8, SPLIT=4, num_stages=3), (3, 8, 64)),
    (dict(TC=True, BLOCK_N=16, BKW=8, SPLIT=4, num_warps=1, num_stages=3), (3, 8, 20)),
]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("ci", range(len(DECODE_CFGS)), ids=[f"c{i:02d}" for i in range(len(DECODE_CFGS))])
def test_decode_kernel_configs(fmt, dtype, ci):
    """`fp4_decode` (gemv and tc tiles: int32 words, split-K + epilogue launch) for every tile variant, M = 1..64, uneven K,
    q|k|v segments with bias and LoRA, and gate|up with SiLU."""
    from qerl.kernels.fused_linear import fused_linear
    from qerl.kernels.lora_shrink import lora_shrink

    q, dq = QUANT[fmt]
    cfg, rows = DECODE_CFGS[ci]
    k, r, sizes = 1088, 16, (96, 24, 24)
    ds = [q(torch.randn(n, k, device="cuda") * s) for n, s in zip(sizes, (1.0, 3.0, 0.5))]
    deq = torch.cat([dq(d, torch.float32) for d in ds])
    packed = torch.cat([d["weight_packed"] for d in ds])
    scale = torch.cat([d["weight_scale"] for d in ds])
    gs = torch.cat([d["weight_global_scale"] for d in ds]) if fmt == "nvfp4" else None
    bias = torch.randn(sum(sizes), device="cuda", dtype=dtype)
    a, b = torch.randn(3 * r, k, device="cuda") * 0.1, torch.randn(sum(sizes), r, device="cuda")
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for m in rows:
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        h = lora_shrink(x, a)
        out = torch.full((m, sum(sizes)), float("nan"), device="cuda", dtype=dtype)
        y = fused_linear(x, fmt, packed, scale, gs, bias, h, b, r, 0.5, (96, 120), out=out, config=cfg)
        lora = qkv_lora(x, a, b, r, sizes)
        ref = x.float() @ deq.T + bias.float() + 0.5 * lora
        assert not y.isnan().any()
        assert rel(y, ref) < tol, (m, rel(y, ref))
        # A instead of h: the split-K decode programs compute the LoRA shrink themselves (one launch fewer)
        out.fill_(float("nan"))
        hbuf = torch.full((32 * m * 3 * r,), float("nan"), device="cuda")
        y = fused_linear(
            x, fmt, packed, scale, gs, bias, None, b, r, 0.5, (96, 120), out=out, config=cfg, lora_A=a, h_out=hbuf
        )
        assert not y.isnan().any()
        assert rel(y, ref) < tol, (m, rel(y, ref))
        out = torch.full((m, 48), float("nan"), device="cuda", dtype=dtype)
        y = fused_linear(
            x, fmt, packed[:96], scale[:96], gs[:1].repeat(2) if gs is not None else None, glu=True, out=out, config=cfg
        )
        w = deq[:96]
        ref = F.silu(x.float() @ w[:48].T) * (x.float() @ w[48:].T)
        assert not y.isnan().any()
        assert rel(y, ref) < (tol if dtype == torch.float32 else 2e-2), (m, rel(y, ref))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 8, 40])
def test_linear_epilogue_on_cublas_product(dtype, m):
    """cuBLAS product + the epilogue kernel (bias, q|k|v LoRA, gate|up) = module composition; also with the dot
    in fp32 at 16 rows a program, and with FMAs instead."""
    from qerl.kernels.linear_epilogue import linear_epilogue
    from qerl.kernels.lora_shrink import lora_shrink

    k, r, sizes = 160, 16, (64, 16, 16)
    w = torch.randn(sum(sizes), k, device="cuda", dtype=dtype)
    bias = torch.randn(sum(sizes), device="cuda", dtype=dtype)
    a, b = torch.randn(3 * r, k, device="cuda"), torch.randn(sum(sizes), r, device="cuda")
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    h = lora_shrink(x, a)
    out = torch.full((m, sum(sizes)), float("nan"), device="cuda", dtype=dtype)
    y = linear_epilogue(x @ w.T, bias, h, b, r, 0.5, (64, 80), out=out)
    lora = qkv_lora(x, a, b, r, sizes)
    ref = x.float() @ w.float().T + bias.float() + 0.5 * lora
    assert rel(y, ref) < (1e-5 if dtype == torch.float32 else 1e-2)
    for opts in (dict(block_m=16, lora_prec="ieee"), dict(lora_dot=False)):  # the dot's precision and form
        z = linear_epilogue(x @ w.T, bias, h, b, r, 0.5, (64, 80), out=torch.full_like(out, float("nan")), **opts)
        assert rel(z, ref) < (1e-5 if dtype == torch.float32 else 1e-2)
    out = torch.full((m, 48), float("nan"), device="cuda", dtype=dtype)
    y = linear_epilogue(x @ w[:96].T, glu=True, out=out)
    ref = F.silu(x.float() @ w[:48].float().T) * (x.float() @ w[48:96].float().T)
    assert rel(y, ref) < (1e-5 if dtype == torch.float32 else 2e-2)


_INTERPRETED_ATTENTION = """
import torch
import torch.nn.functional as F
from qerl.kernels.decode_attention import decode_attention
torch.manual_seed(0)
b, hq, hkv, d, s = 5, 8, 2, 32, 120
q, kc, vc = torch.randn(b, hq, d), torch.randn(6, hkv, s, d), torch.randn(6, hkv, s, d)
mask = (torch.rand(6, s) > 0.2).to(torch.int8)
mask[:, 99] = 1
nk = torch.tensor([100], dtype=torch.int32)
src, plen = torch.tensor([0, 0, 2, 2, 2, 5], dtype=torch.int32), torch.tensor([40], dtype=torch.int32)
for shared in (False, True):
    rows = torch.arange(b)[:, None].expand(b, s)
    if shared:
        rows = torch.where(torch.arange(s) < 40, src[:b, None].long(), rows)
    kg, vg = (c[rows, :, torch.arange(s)].transpose(1, 2)[:, :, :100] for c in (kc, vc))
    ref = F.scaled_dot_product_attention(
        q[:, :, None], kg, vg, attn_mask=mask[:b, None, None, :100].bool(), enable_gqa=True
    ).reshape(b, -1)
    extra = dict(prefix_rows=src, prefix_len=plen) if shared else {}
    for ns, bk in ((1, 32), (3, 32), (4, 64)):
        out = decode_attention(q, kc, vc, mask, nk, ns, block_keys=bk, **extra)
        assert (out - ref).abs().max() < 1e-5, (shared, ns, bk, (out - ref).abs().max())
print("ok")
"""


def test_partials_workspace_takes_the_callers_buffer():
    """A caller's own split-K buffer (what graph-captured decode steps pass) is used as given, never replaced;
    too small a buffer is an error, not a silent reallocation (the shared buffer grows; a caller's must not)."""
    from qerl.kernels.common import partials_workspace

    own = torch.randn(100)
    assert partials_workspace(60, torch.device("cpu"), own).data_ptr() == own.data_ptr()
    with pytest.raises(ValueError, match="needs 101"):
        partials_workspace(101, torch.device("cpu"), own)
    with pytest.raises(ValueError, match="fp32"):
        partials_workspace(10, torch.device("cpu"), own.double())
    shared = partials_workspace(60, torch.device("cpu"))
    assert shared.numel() == 60 and shared.data_ptr() != own.data_ptr()


def test_shared_scratch_keeps_what_a_capture_took(monkeypatch):
    """The shared scratch grows by replacement; an outgrown buffer is freed unless a CUDA graph capture took
    it (then kept: the graph still uses its address). The capture is simulated (the rule is host-side)."""
    from qerl.kernels import common

    monkeypatch.setattr(common, "_SHARED", {})
    monkeypatch.setattr(common, "_IN_GRAPHS", set())
    monkeypatch.setattr(common, "_RETIRED", [])
    cpu = torch.device("cpu")
    a = common.shared_scratch("t", 1 << 20, torch.float32, cpu)
    assert common.shared_scratch("t", 100, torch.float32, cpu).data_ptr() == a.data_ptr()  # fits: the same
    b = common.shared_scratch("t", 1 << 21, torch.float32, cpu)  # outgrown, never captured: dropped
    assert b.data_ptr() != a.data_ptr() and not common._RETIRED
    monkeypatch.setattr(common, "_capturing", lambda: True)
    assert common.shared_scratch("t", 10, torch.float32, cpu).data_ptr() == b.data_ptr()
    monkeypatch.setattr(common, "_capturing", lambda: False)
    c = common.shared_scratch("t", 1 << 22, torch.float32, cpu)  # outgrown after a capture took it: kept
    assert [t.data_ptr() for t in common._RETIRED] == [b.data_ptr()] and c.data_ptr() != b.data_ptr()
    d = common.shared_scratch("t", 1 << 23, torch.float32, cpu)  # c was never captured: not kept
    assert len(common._RETIRED) == 1 and d.numel() == 1 << 23


def test_decode_attention_interpreted():
    """(CPU, Triton's interpreter, fp32) the split-KV decode attention against softmax attention with GQA and a
    key mask, for several splits and key blocks; with prefix rows, each row's first 40 keys come from its
    group's row (rows 1 and 3, 4 from rows 0 and 2) and the rest from its own, as the reference gathers them."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", _INTERPRETED_ATTENTION], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_norm_rope_attention(dtype):
    from qerl.kernels.decode_attention import decode_attention
    from qerl.kernels.rmsnorm import add_rmsnorm
    from qerl.kernels.rope_cache import rope_cache
    from qerl.modeling import RMSNorm, apply_rope

    tol = 1e-5 if dtype == torch.float32 else 1e-2
    x, dlt = torch.randn(5, 3584, device="cuda", dtype=dtype), torch.randn(5, 3584, device="cuda", dtype=dtype)
    norm = RMSNorm(3584, 1e-6).cuda()
    norm.weight.data.normal_(1.0, 0.1)
    ref = norm(x + dlt)
    x2 = x.clone()
    y = add_rmsnorm(x2, norm.weight, 1e-6, delta=dlt, out=torch.full_like(x, float("nan")))
    assert torch.equal(x2, x + dlt) and rel(y, ref) < tol

    b, hq, hkv, d, s = 3, 28, 4, 128, 300
    qkv = torch.randn(b, (hq + 2 * hkv) * d, device="cuda", dtype=dtype)
    pos = torch.tensor([7, 100, 250], device="cuda")
    slot = torch.tensor([260], device="cuda", dtype=torch.int32)
    inv = 1.0 / (1e6 ** (torch.arange(0, d, 2, device="cuda").float() / d))
    kc = torch.randn(4, hkv, s, d, device="cuda", dtype=dtype)
    vc = torch.randn(4, hkv, s, d, device="cuda", dtype=dtype)
    q = rope_cache(
        qkv, pos, slot, inv, kc, vc, hq, hkv, d, q_out=torch.full((b, hq, d), float("nan"), device="cuda", dtype=dtype)
    )
    f = pos.float()[:, None] * inv
    emb = torch.cat([f, f], -1)[:, None]
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    assert rel(q, apply_rope(qkv[:, : hq * d].view(b, hq, d), cos, sin)) < tol
    assert rel(kc[:b, :, 260], apply_rope(qkv[:, hq * d : (hq + hkv) * d].view(b, hkv, d), cos, sin)) < tol
    assert torch.equal(vc[:b, :, 260], qkv[:, (hq + hkv) * d :].view(b, hkv, d))

    mask = torch.rand(4, s, device="cuda") > 0.3
    mask[:, 260] = True
    nk = torch.tensor([261], device="cuda", dtype=torch.int32)
    ref = F.scaled_dot_product_attention(
        q[:, :, None].float(),
        kc[:b, :, :261].float(),
        vc[:b, :, :261].float(),
        attn_mask=mask[:b, None, None, :261],
        enable_gqa=True,
    ).reshape(b, -1)
    for ns in (1, 5, 16):
        out = torch.full((b, hq * d), float("nan"), device="cuda", dtype=dtype)
        o = decode_attention(q, kc, vc, mask, nk, ns, out=out)
        assert rel(o, ref) < tol, ns
    # a shared prompt: rows 1 and 2 read their first 100 keys from row 3 (and 0 from itself), the rest from their
    # own rows; the reference gathers those keys into each row first
    src, plen = torch.tensor([0, 3, 3, 3], device="cuda", dtype=torch.int32), torch.tensor([100], device="cuda")
    rows = torch.where(torch.arange(s, device="cuda") < 100, src[:b, None], torch.arange(b, device="cuda")[:, None])
    kg, vg = (c[rows, :, torch.arange(s, device="cuda")].transpose(1, 2) for c in (kc, vc))  # [b, hkv, s, d]
    ref = F.scaled_dot_product_attention(
        q[:, :, None].float(),
        kg[:, :, :261].float(),
        vg[:, :, :261].float(),
        attn_mask=mask[:b, None, None, :261],
        enable_gqa=True,
    ).reshape(b, -1)
    assert rel(ref, decode_attention(q, kc, vc, mask, nk, 5).float()) > 0.05  # the prompt keys matter
    for ns in (1, 5):
        for bk, nw in ((32, 4), (64, 8)):
            out = torch.full((b, hq * d), float("nan"), device="cuda", dtype=dtype)
            o = decode_attention(
                q, kc, vc, mask, nk, ns, out=out, prefix_rows=src, prefix_len=plen.int(), block_keys=bk, num_warps=nw
            )
            assert rel(o, ref) < tol, (ns, bk)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 2, 8, 40])
def test_lora_epilogue_many_splits(dtype, m):
    """A real down_proj K (Qwen2.5-32B, 27648): the shrink writes 27 split-K partials, which the epilogue
    loads as one [32, M, R] tile; CUDA-core (M <= 2) and tensor-core (M >= 3) kernels, default tiles."""
    from qerl.kernels.fused_linear import fused_linear
    from qerl.kernels.lora_shrink import lora_shrink

    k, n, r = 27648, 96, 16
    d = nvfp4_quantize(torch.randn(n, k, device="cuda"))
    deq = nvfp4_dequantize(d, torch.float32)
    a, b = torch.randn(r, k, device="cuda") * 0.05, torch.randn(n, r, device="cuda")
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    h = lora_shrink(x, a)
    assert h.shape[0] == 27
    assert rel(h.sum(0), x.float() @ a.T) < 1e-5
    out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
    y = fused_linear(
        x, "nvfp4", d["weight_packed"], d["weight_scale"], d["weight_global_scale"], None, h, b, r, 0.5, out=out
    )
    ref = x.float() @ deq.T + 0.5 * (x.float() @ a.T) @ b.T
    assert not y.isnan().any()
    assert rel(y, ref) < (1e-5 if dtype == torch.float32 else 1e-2)
