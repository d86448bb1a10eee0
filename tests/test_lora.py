"""LoRA adapters: PEFT's on-disk format, loaded by PEFT itself onto the HF bf16 base."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from conftest import VOCAB, hf_model, make_tiny_checkpoint, qerl_logits, rel_err

from qerl.errors import QerlError
from qerl.loading import load_model, resolvable_base
from qerl.lora import adapter_disabled, load_adapter, lora_parameters, merge_lora, save_adapter
from qerl.modeling import causal_mask, positions_from_mask

RANK, ALPHA = 4, 12  # alpha != r so that a wrong scaling (alpha / r = 3) shows


def _ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(11))


def _randomize_lora(model, seed: int = 0, std: float = 0.1):
    """B = 0 after init (a no-op adapter): give A and B random values so the adapter does something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(std * torch.randn(p.shape, generator=g))


def _peft_logits(path, adapter_dir, ids):
    from peft import PeftModel

    peft = PeftModel.from_pretrained(hf_model(path), str(adapter_dir)).eval()
    with torch.no_grad():
        return peft(input_ids=ids).logits.float(), peft


@pytest.fixture(scope="module")
def adapter(tiny_dirs, tmp_path_factory):
    """A random rank-4 adapter trained 'on' the qwen2 NVFP4 model, saved in PEFT format."""
    model, _ = load_model(str(tiny_dirs["qwen2"]), quant="nvfp4", lora_rank=RANK, lora_alpha=ALPHA)
    _randomize_lora(model)
    out = tmp_path_factory.mktemp("adapter")
    save_adapter(model, out)
    return model, out


def test_saved_files_follow_peft(adapter):
    from safetensors.torch import load_file

    model, out = adapter
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert (cfg["r"], cfg["lora_alpha"]) == (RANK, ALPHA)
    assert sorted(cfg["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    state = load_file(str(out / "adapter_model.safetensors"))
    assert len(state) == 2 * 7 * 2  # A and B, 7 Linears, 2 layers
    a = state["base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight"]
    b = state["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"]
    assert a.shape == (RANK, 64) and b.shape == (32, RANK)  # k_proj: 2 kv heads x 16 = 32 outputs
    assert torch.equal(a, model.model.layers[1].self_attn.k_proj.lora_A.detach())
    assert json.loads((out / "qerl_adapter.json").read_text())["weight_format"] == "nvfp4"


def test_peft_loads_adapter_and_logits_match(adapter, tiny_dirs):
    model, out = adapter
    ids = _ids()
    peft_logits, peft = _peft_logits(tiny_dirs["qwen2"], out, ids)
    # PEFT took every tensor: its k_proj of layer 1 holds our A and B
    k = peft.base_model.model.model.layers[1].self_attn.k_proj
    assert torch.equal(k.lora_A["default"].weight, model.model.layers[1].self_attn.k_proj.lora_A.detach())
    assert torch.equal(k.lora_B["default"].weight, model.model.layers[1].self_attn.k_proj.lora_B.detach())
    assert k.scaling["default"] == ALPHA / RANK

    # 1. exact semantics: the same adapter on qerl's bf16 model equals bf16 base + adapter via PEFT
    bf16, _ = load_model(str(tiny_dirs["qwen2"]), quant="bf16", lora_rank=0)
    assert len(load_adapter(bf16, out)) == 14
    torch.testing.assert_close(qerl_logits(bf16, ids), peft_logits, rtol=1e-5, atol=1e-5)

    # 2. the NVFP4 model + adapter is within the quantization error of the bf16 base + adapter
    with adapter_disabled(bf16):
        base = qerl_logits(bf16, ids)
    quant_err = rel_err(qerl_logits(model, ids), peft_logits)
    adapter_effect = rel_err(base, peft_logits)
    # measured: quantization error 0.156, adapter effect 1.15 (random A, B ~ N(0, 0.1^2), scaling 3)
    assert quant_err < 0.25, quant_err
    assert adapter_effect > 0.5 and adapter_effect > 3 * quant_err, (adapter_effect, quant_err)


def test_adapter_disabled_is_the_base_and_load_round_trips(adapter, tiny_dirs):
    model, out = adapter
    ids = _ids()
    plain, _ = load_model(str(tiny_dirs["qwen2"]), quant="nvfp4", lora_rank=0)
    with adapter_disabled(model):
        assert torch.equal(qerl_logits(model, ids), qerl_logits(plain, ids))
    assert not torch.equal(qerl_logits(model, ids), qerl_logits(plain, ids))  # re-enabled on exit
    # load into a fresh quantized model (no LoRA yet): identical logits, bit for bit
    load_adapter(plain, out)
    assert torch.equal(qerl_logits(plain, ids), qerl_logits(model, ids))
    assert plain.lora_config == {"r": RANK, "lora_alpha": ALPHA, "lora_dropout": 0.0}


def test_gradients_reach_only_lora_in_the_model(tiny_dirs):
    model, _ = load_model(str(tiny_dirs["qwen3"]), quant="nvfp4", lora_rank=RANK)
    _randomize_lora(model, seed=1)
    model.train()

    ids = _ids()
    attn = torch.ones_like(ids)
    loss = model.logits(model(ids, positions_from_mask(attn), causal_mask(attn))).logsumexp(-1).mean()
    loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trainable == with_grad
    assert len(trainable) == 2 * 7 * 2 and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in trainable)


def test_merge_lora_keeps_the_function(adapter, tiny_dirs):
    _, out = adapter
    ids = _ids()
    bf16, _ = load_model(str(tiny_dirs["qwen2"]), quant="bf16", lora_rank=0)
    load_adapter(bf16, out)
    before = qerl_logits(bf16, ids)
    merge_lora(bf16)
    assert lora_parameters(bf16) == []
    # the merged weight is rounded to bf16 once: measured 0.0035 relative
    assert rel_err(qerl_logits(bf16, ids), before) < 0.01


def test_load_adapter_errors(adapter, tiny_dirs, tmp_path):
    _, out = adapter
    with pytest.raises(QerlError, match="not a PEFT adapter directory"):
        load_adapter(load_model(str(tiny_dirs["qwen2"]), quant="nvfp4", lora_rank=0)[0], tmp_path)
    # a model with one layer: the adapter's layer-1 keys match nothing
    one = make_tiny_checkpoint(tmp_path / "one", "qwen2", std=0.05, num_hidden_layers=1)
    with pytest.raises(QerlError, match="matches no quantized Linear"):
        load_adapter(load_model(str(one), quant="nvfp4", lora_rank=0)[0], out)
    wide = make_tiny_checkpoint(tmp_path / "wide", "qwen2", std=0.05, intermediate_size=192)
    with pytest.raises(QerlError, match="shape"):
        load_adapter(load_model(str(wide), quant="nvfp4", lora_rank=0)[0], out)
    # damaged files: one line naming the file
    model = load_model(str(tiny_dirs["qwen2"]), quant="nvfp4", lora_rank=0)[0]
    for damage, file, message in [
        (
            lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x10" * 200),
            "adapter_model.safetensors",
            "cannot be read",
        ),
        (
            lambda d: (d / "adapter_config.json").write_text('{"lora_alpha": 8}'),
            "adapter_config.json",
            "no LoRA rank 'r'",
        ),
        (lambda d: (d / "adapter_config.json").write_text("{r: 4"), "adapter_config.json", "not a LoRA adapter config"),
    ]:
        bad = tmp_path / f"bad-{file}-{message[:6]}"
        shutil.copytree(out, bad)
        damage(bad)
        with pytest.raises(QerlError, match=re.escape(f"{bad / file}: ") + ".*" + re.escape(message)):
            load_adapter(model, bad)


def test_auto_peft_loads_the_saved_adapter_offline_from_its_recorded_base(tiny_dirs, tmp_path, monkeypatch):
    """`base_model_name_or_path` resolves: a base given by a relative path is recorded as its absolute path,
    so `AutoPeftModelForCausalLM.from_pretrained(adapter)` alone finds it, offline, from another directory."""
    import huggingface_hub.constants
    from peft import AutoPeftModelForCausalLM

    src = tiny_dirs["qwen2"]
    monkeypatch.chdir(src.parent)
    model, _ = load_model(src.name, quant="nvfp4", lora_rank=RANK, lora_alpha=ALPHA)
    _randomize_lora(model, seed=2)
    out = tmp_path / "adapter"
    save_adapter(model, out)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(src.resolve())

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    peft = AutoPeftModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = _ids()
    with torch.no_grad():
        got = peft(input_ids=ids).logits.float()
    bf16, _ = load_model(str(src), quant="bf16", lora_rank=0)
    load_adapter(bf16, out)
    torch.testing.assert_close(qerl_logits(bf16, ids), got, rtol=1e-5, atol=1e-5)


def test_the_embedded_default_is_recorded_by_its_hub_id():
    for name in ("smollm2-135m-instruct", "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"):
        assert resolvable_base(name) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolvable_base("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"
