"""QuantLinear: frozen quantized base + live LoRA, and its memory-saving autograd function."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qerl.quant import QuantLinear, get_format

FORMATS = ["nvfp4", "mxfp4", "nf4", "bf16"]


def _layer(fmt: str, bias: bool = True, seed: int = 0, n: int = 48, k: int = 128) -> tuple[QuantLinear, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    b = torch.randn(n, generator=g) if bias else None
    return QuantLinear.from_weight(w, fmt, bias=b), w


def _x(k: int = 128, seed: int = 1) -> torch.Tensor:
    return torch.randn(3, 5, k, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fmt", FORMATS)
def test_base_forward_is_dequantized_matmul_plus_bias(fmt):
    layer, w = _layer(fmt)
    x = _x()
    f = get_format(fmt)
    deq = f.dequantize(f.quantize(w), torch.float32)
    expected = F.linear(x, deq, layer.bias)
    assert torch.equal(layer(x), expected)
    # buffers only: the packed weight is not a parameter and no full-precision copy is kept
    assert [n for n, _ in layer.named_parameters()] == ["bias"]
    names = {n for n, _ in layer.named_buffers()}
    assert names == (
        {"weight"}
        if fmt == "bf16"
        else {"weight_packed", "weight_scale"} | ({"weight_global_scale"} if fmt == "nvfp4" else set())
    )


@pytest.mark.parametrize("fmt", FORMATS)
def test_lora_with_zero_b_is_exactly_the_base(fmt):
    layer, _ = _layer(fmt)
    x = _x()
    base = layer(x)
    layer.add_lora(rank=8, alpha=16)
    assert layer.lora_A.abs().sum() > 0 and torch.equal(layer.lora_B, torch.zeros(48, 8))
    assert torch.equal(layer(x), base)


def test_lora_forward_formula():
    layer, _ = _layer("nvfp4")
    x = _x()
    base = layer(x)
    layer.add_lora(rank=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(48, 4, generator=torch.Generator().manual_seed(2)))
    expected = base + 2.0 * (x @ layer.lora_A.T @ layer.lora_B.T)  # alpha / r = 2
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_delta(), 2.0 * layer.lora_B @ layer.lora_A)
    assert (layer(x) - base).abs().max() > 0.1
    layer.lora_enabled = False
    assert torch.equal(layer(x), base)


def test_lora_init_matches_peft_kaiming_uniform():
    # PEFT: kaiming_uniform_(a=sqrt(5)) -> U(-1/sqrt(K), 1/sqrt(K)) for A of shape [r, K]
    layer, _ = _layer("nvfp4", k=1024)
    torch.manual_seed(0)
    layer.add_lora(rank=16)
    bound = 1 / 1024**0.5
    a = layer.lora_A
    assert a.abs().max() <= bound and a.abs().max() > 0.95 * bound
    assert abs(a.std().item() - bound / 3**0.5) < 0.05 * bound
    assert layer.lora_scaling == 1.0  # alpha defaults to r
    with pytest.raises(ValueError, match="rank"):
        layer.add_lora(0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_gradients_reach_only_lora(fmt):
    layer, _ = _layer(fmt)
    layer.add_lora(rank=4, alpha=4)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.bias.requires_grad_(False)
    x = _x().requires_grad_(True)
    layer(x).square().sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_A.grad.abs().sum() > 0
    assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0
    assert layer.bias.grad is None
    trainable = [n for n, p in layer.named_parameters() if p.requires_grad]
    assert trainable == ["lora_A", "lora_B"]
    for name, buf in layer.named_buffers():
        assert not buf.requires_grad and buf.grad is None, name


@pytest.mark.parametrize("fmt", ["nvfp4", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_input_gradient_equals_plain_linear(fmt, dtype):
    layer, _ = _layer(fmt, bias=False)
    x = _x().to(dtype)
    deq = layer.dequantized(dtype)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    g = torch.randn(3, 5, 48, generator=torch.Generator().manual_seed(3)).to(dtype)
    y1 = layer(x1)
    y2 = F.linear(x2, deq)
    assert torch.equal(y1, y2)
    y1.backward(g)
    y2.backward(g)
    assert x1.grad.dtype == dtype
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=0)


def test_autograd_function_saves_no_activation():
    """The frozen base keeps nothing alive for backward: the dense weight is re-dequantized there.

    A plain F.linear with a frozen weight saves that dense weight (not x, whose gradient needs only W).
    """
    layer, _ = _layer("nvfp4", bias=False)
    x = _x().requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert saved == []
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.linear(x, layer.dequantized(torch.float32))
    assert saved == [(128, 48)]  # the hook does see what a plain linear saves: W^T
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_dequant_cache_is_opt_in_and_invalidated():
    layer, w = _layer("nvfp4", bias=False)
    a = layer.dequantized(torch.float32)
    assert layer._cache is None and layer.dequantized(torch.float32) is not a
    layer.cache_dequantized = True
    c = layer.dequantized(torch.float32)
    assert layer.dequantized(torch.float32) is c
    layer.set_weight(w * 2)  # new weights must drop the cached copy
    torch.testing.assert_close(layer.dequantized(torch.float32), 2 * a)


def test_set_weight_checks_shape():
    layer, _ = _layer("nvfp4")
    with pytest.raises(ValueError, match="weight shape"):
        layer.set_weight(torch.zeros(48, 64))


def test_folded_lora_is_inference_only():
    layer, _ = _layer("nvfp4")
    layer.add_lora(rank=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = _x()
    with torch.no_grad():
        unfolded = layer(x)
    layer.fold_lora(torch.float32)
    with torch.no_grad():
        folded = layer(x)
    torch.testing.assert_close(folded, unfolded, rtol=1e-5, atol=1e-5)  # one GEMM on W + (a/r) B A
    assert not torch.equal(folded, unfolded)  # it really took the folded path
    y = layer(x)  # autograd on: the folded weight is ignored, gradients reach LoRA as always
    assert torch.equal(y.detach(), unfolded)
    y.sum().backward()
    assert layer.lora_B.grad is not None
    layer.lora_enabled = False  # a disabled adapter folds to the base alone
    layer.fold_lora(torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.dequantized(torch.float32), layer.bias))
    layer.unfold_lora()
    assert layer._folded is None


def test_lora_in_the_output_dtype_matches_the_fp32_adapter_path():
    """lora_compute_dtype = the activation dtype (the GPU trainer's setting: one addmm, scaling folded
    into B) gives the reference's output and gradients (fp32 here, so to rounding)."""
    g = torch.Generator().manual_seed(3)
    m = QuantLinear.from_weight(torch.randn(48, 64, generator=g) * 0.1, "nvfp4", bias=torch.randn(48, generator=g))
    m.add_lora(4, alpha=8)
    with torch.no_grad():
        m.lora_B.normal_(0, 0.1, generator=g)
    x = torch.randn(2, 5, 64, generator=g, requires_grad=True)
    w = torch.randn(2, 5, 48, generator=g)
    outs = []
    for cdt in (None, torch.float32):
        m.lora_compute_dtype = cdt
        m.zero_grad()
        y = m(x)
        (gx,) = torch.autograd.grad((y * w).sum(), x, retain_graph=True)
        (y * w).sum().backward()
        outs.append((y.detach(), gx, m.lora_A.grad.clone(), m.lora_B.grad.clone()))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
