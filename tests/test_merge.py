"""merge_lora: the merged model equals base + adapter, and fused groups share one NVFP4 scale."""

import torch
from conftest import make_tiny_checkpoint, qerl_logits, rel_err

from qerl.loading import load_model
from qerl.lora import lora_parameters, merge_lora


def test_merge_keeps_logits_and_shares_fused_global_scales(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "qwen2", "qwen2", seed=4, std=0.05)
    model, _ = load_model(path, quant="nvfp4", lora_rank=4, device="cpu")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    ids = torch.randint(3, 90, (2, 9), generator=g)
    live = qerl_logits(model, ids)
    merge_lora(model, quant="bf16")
    assert not lora_parameters(model)
    assert rel_err(qerl_logits(model, ids), live) < 0.02  # bf16 rounding of W + BA only (measured 1.2%)
    model, _ = load_model(path, quant="nvfp4", lora_rank=4, device="cpu")
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    merge_lora(model)  # back to NVFP4
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        gs = {float(x.weight_global_scale) for x in (a.q_proj, a.k_proj, a.v_proj)}
        assert len(gs) == 1
        assert float(m.gate_proj.weight_global_scale) == float(m.up_proj.weight_global_scale)
