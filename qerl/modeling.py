"""The decoder-only transformer qerl runs: Llama, Qwen2/Qwen2.5, Qwen3 and Mistral families.

qerl owns this code (instead of patching `transformers`) so that the rollout engine,
the trainer and AQN share ONE module tree and one copy of the weights, and so the
decode step can use a preallocated KV cache indexed by position (gpt-fast style).
Module and parameter names mirror Hugging Face's (`model.layers.N.self_attn.q_proj`),
so checkpoints load by name and PEFT adapters keep their keys. The numerics follow
HF: RMSNorm in fp32, rotary tables in fp32 cast to the activation dtype.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .packing import Packed, packed_attention

SUPPORTED_TYPES = ("llama", "qwen2", "qwen3", "mistral")
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Projections that read the same input: quantized on load as one group (one shared NVFP4 global scale, as
# vLLM fuses them) and run by the decode engine as one launch each.
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))
_LINEAR_PARENT = dict.fromkeys(("q_proj", "k_proj", "v_proj", "o_proj"), "self_attn") | dict.fromkeys(
    ("gate_proj", "up_proj", "down_proj"), "mlp"
)


def linear_path(layer: int, name: str) -> str:
    """The module path of projection `name` of decoder layer `layer` (HF names: model.layers.3.mlp.up_proj)."""
    return f"model.layers.{layer}.{_LINEAR_PARENT[name]}.{name}"


# Published shapes of the models the planner and the random-weight benchmarks know by name (docs/formats.md,
# section 5), with the hub id each name stands for.
KNOWN_MODELS = {
    "qwen2.5-7b": dict(
        hub="Qwen/Qwen2.5-7B-Instruct",
        hidden_size=3584,
        intermediate_size=18944,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
    ),
    "qwen2.5-14b": dict(
        hub="Qwen/Qwen2.5-14B-Instruct",
        hidden_size=5120,
        intermediate_size=13824,
        num_layers=48,
        num_heads=40,
        num_kv_heads=8,
    ),
    "qwen2.5-32b": dict(
        hub="Qwen/Qwen2.5-32B-Instruct",
        hidden_size=5120,
        intermediate_size=27648,
        num_layers=64,
        num_heads=40,
        num_kv_heads=8,
    ),
}


@dataclass
class ModelArgs:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False

    @classmethod
    def from_name(cls, name_or_path: str) -> ModelArgs:
        """A `KNOWN_MODELS` name or hub id (no download), else a HF config (directory, config.json or hub id)."""
        key = name_or_path.lower()
        for name, c in KNOWN_MODELS.items():
            if key in (name, c["hub"].lower()):
                shape = {k: v for k, v in c.items() if k != "hub"}
                return cls(
                    model_type="qwen2",
                    vocab_size=152064,
                    head_dim=c["hidden_size"] // c["num_heads"],
                    rms_norm_eps=1e-6,
                    rope_theta=1e6,
                    attention_bias=True,
                    **shape,
                )
        from pathlib import Path

        from transformers import AutoConfig

        p = Path(name_or_path)
        return cls.from_hf(AutoConfig.from_pretrained(p.parent if p.name == "config.json" else p))

    def fused_linear_shapes(self) -> dict[str, tuple[int, int, bool]]:
        """The decode engine's four fused linears of one layer: name -> (weight rows, K, gate|up)."""
        h, i, kvd = self.hidden_size, self.intermediate_size, self.num_kv_heads * self.head_dim
        qd = self.num_heads * self.head_dim
        return {
            "qkv": (qd + 2 * kvd, h, False),
            "o": (h, qd, False),
            "gate|up": (2 * i, h, True),
            "down": (h, i, False),
        }

    @classmethod
    def from_hf(cls, config) -> ModelArgs:
        mt = getattr(config, "model_type", None)
        if mt not in SUPPORTED_TYPES:
            raise ValueError(
                f"unsupported architecture '{mt}': qerl supports {', '.join(SUPPORTED_TYPES)} "
                f"(decoder blocks with {', '.join(LINEAR_NAMES)})"
            )
        heads = config.num_attention_heads
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        scaling = rope if rope.get("rope_type", rope.get("type", "default")) not in ("default", None) else None
        return cls(
            model_type=mt,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            rms_norm_eps=getattr(config, "rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            attention_bias=mt == "qwen2" or bool(getattr(config, "attention_bias", False)),
            qk_norm=mt == "qwen3",
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )


class RMSNorm(nn.Module):
    """RMSNorm with an fp32 weight, whatever the activation dtype.

    Departs from HF (bf16 weight times bf16 activations) on purpose: AQN adds noise of
    sigma 5e-4..1e-2 to these weights, and a bf16 weight near 1 cannot represent
    steps below ~4e-3, so most of the schedule would round away. The loader keeps
    norm weights in fp32; the product is cast back to the activation dtype.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _elementwise(rms_norm, x)(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * h).to(x.dtype)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


_COMPILED: dict = {}


def _elementwise(fn, x: torch.Tensor):
    """`fn` itself, or on a CUDA training forward (autograd on) `fn` compiled by torch.compile
    into one fused kernel forward and one backward, saving only its inputs: the eager
    versions cost 4-7 launches each and keep fp32 intermediates for backward. Rollouts and
    evals (no autograd) always run `fn` as written. QERL_COMPILE=0 turns compiling off."""
    if not (x.is_cuda and torch.is_grad_enabled()) or os.environ.get("QERL_COMPILE", "1") == "0":
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True)
    return _COMPILED[fn]


def rope_inv_freq(args: ModelArgs, device) -> torch.Tensor:
    d = args.head_dim
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
    s = args.rope_scaling
    if s is None:
        return inv
    kind = s.get("rope_type", s.get("type"))
    if kind == "linear":
        return inv / s["factor"]
    if kind == "llama3":  # Llama 3.1 frequency-dependent scaling
        factor, lo, hi = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old_len / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > old_len / lo, inv / factor, inv)
        mid = (wavelen <= old_len / lo) & (wavelen >= old_len / hi)
        return torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    raise ValueError(f"unsupported rope scaling '{kind}'")


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return _elementwise(rope_rotate, x)(x, cos, sin)


def rope_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, H, T, D]; cos/sin: [B, 1, T, D] (or any layout that broadcasts, e.g. [T, H, D] and [T, 1, D])
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class KVCache(nn.Module):
    """Preallocated keys and values for every layer, indexed by cache position.

    Shape per layer [B, H_kv, S_max, D]. Fixed shapes make the decode step
    capturable in a CUDA graph; rows share cache positions and carry their own
    rotary positions (left padding).
    """

    def __init__(self, num_layers, batch, kv_heads, max_len, head_dim, dtype, device):
        super().__init__()
        shape = (num_layers, batch, kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def repeat_interleave(self, n: int, length: int) -> KVCache:
        """A cache with each row repeated n times (n samples share one prompt prefill)."""
        out = KVCache.__new__(KVCache)
        nn.Module.__init__(out)
        for name in ("k", "v"):
            t = getattr(self, name)
            big = torch.zeros((t.shape[0], t.shape[1] * n) + t.shape[2:], dtype=t.dtype, device=t.device)
            big[:, :, :, :length] = t[:, :, :, :length].repeat_interleave(n, dim=1)
            out.register_buffer(name, big, persistent=False)
        return out


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        h, d = args.hidden_size, args.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, d
        self.q_proj = nn.Linear(h, args.num_heads * d, bias=args.attention_bias)
        self.k_proj = nn.Linear(h, args.num_kv_heads * d, bias=args.attention_bias)
        self.v_proj = nn.Linear(h, args.num_kv_heads * d, bias=args.attention_bias)
        self.o_proj = nn.Linear(args.num_heads * d, h, bias=False)
        if args.qk_norm:
            self.q_norm = RMSNorm(d, args.rms_norm_eps)
            self.k_norm = RMSNorm(d, args.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int, start: int, prefix=None, capture=None):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        if isinstance(mask, Packed):  # one row of packed segments (training): [T, H, D] throughout
            c, s = cos[0, 0, :, None], sin[0, 0, :, None]  # [T, 1, D]
            out = packed_attention(apply_rope(q[0], c, s), apply_rope(k[0], c, s), v[0], mask)
            return self.o_proj(out.reshape(b, t, -1))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if capture is not None:  # a shared prompt's keys/values, kept for the completions (with grad)
            capture.append((k, v))
        if prefix is not None:  # keys/values of this row's prompt, computed once per group
            k, v = torch.cat([prefix[0], k], dim=2), torch.cat([prefix[1], v], dim=2)
        if cache is not None:
            cache.k[layer, :, :, start : start + t] = k
            cache.v[layer, :, :, start : start + t] = v
            k = cache.k[layer, :, :, : mask.shape[-1]]
            v = cache.v[layer, :, :, : mask.shape[-1]]
        if self.num_kv_heads != self.num_heads:
            # GQA without materializing repeated keys: query heads [j*g, (j+1)*g) share kv head j,
            # so fold them into the query-length axis ([B, H_kv, g*T, D]) and repeat the mask rows.
            g = self.num_heads // self.num_kv_heads
            q = q.reshape(b, self.num_kv_heads, g * t, self.head_dim)
            if mask is not None and mask.shape[-2] != 1:
                mask = mask.repeat(1, 1, g, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.reshape(b, self.num_heads, t, self.head_dim)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x):
        g, u = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(_elementwise(silu_mul, g)(g, u))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache, layer, start, prefix=None, capture=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, start, prefix, capture)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class CausalLM(nn.Module):
    """`forward(ids, positions, mask, cache, start) -> hidden`; `logits(hidden)` applies lm_head.

    mask: bool [B, 1, T, S] (True = attend) over the S keys visible to the T queries, or a
    `Packed` layout (B = 1: segments end to end, see `qerl.packing`).
    gradient_checkpointing: False, True (every layer) or an int k (the first k layers):
    a checkpointed layer keeps only its input and recomputes the rest in backward.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Transformer(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.memory_limit: float | None = None  # bytes this process may hold on its GPU ("auto" plans within it)
        self._inv_freq: torch.Tensor | None = None

    def tie_weights(self):
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def rope(self, positions: torch.Tensor, dtype):
        if self._inv_freq is None or self._inv_freq.device != positions.device:
            self._inv_freq = rope_inv_freq(self.args, positions.device)
        freqs = positions.float().unsqueeze(-1) * self._inv_freq  # [B, T, D/2]
        emb = torch.cat([freqs, freqs], dim=-1).unsqueeze(1)  # [B, 1, T, D]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(
        self,
        input_ids,
        positions,
        mask,
        cache: KVCache | None = None,
        start: int = 0,
        prefix: list | None = None,
        capture: list | None = None,
    ):
        """prefix: per layer (k, v) [B, H_kv, P, D] of keys before these tokens (a shared prompt);
        capture: a list that receives each layer's (k, v). Both serve training with one prompt
        forward per group of completions; mask then covers the P prefix keys too."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope(positions, x.dtype)
        ckpt = self.gradient_checkpointing
        if ckpt == "auto":
            ckpt = (
                auto_checkpoint_layers(self.args, input_ids.numel(), free_bytes(input_ids.device, self.memory_limit))
                if self.training and torch.is_grad_enabled()
                else 0
            )
        ckpt = len(self.model.layers) if ckpt is True else int(ckpt or 0)
        for i, layer in enumerate(self.model.layers):
            pre = prefix[i] if prefix is not None else None
            if i < ckpt and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, cache, i, start, pre, capture, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, i, start, pre, capture)
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    @property
    def device(self):
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self):
        return self.model.embed_tokens.weight.dtype


def activation_bytes(a: ModelArgs, dtype_bytes: int = 2) -> tuple[int, int]:
    """(bytes per token a layer keeps for backward, the same with the layer checkpointed).

    Kept by autograd in a training forward (packed layout, fused elementwise ops): the
    layer input and the two norm outputs' inputs and outputs (4 x hidden), the rotated
    queries and the attention output (2 x q heads x head_dim), the rotated keys and the
    gathered keys and values (3 x kv width), gate, up and their product (3 x intermediate).
    A checkpointed layer keeps its input only."""
    qd, kvd = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
    return dtype_bytes * (4 * a.hidden_size + 2 * qd + 3 * kvd + 3 * a.intermediate_size), dtype_bytes * a.hidden_size


def auto_checkpoint_layers(a: ModelArgs, tokens: int, free: float) -> int:
    """How many layers (from the first) a training forward of `tokens` tokens must checkpoint
    so that its activations fit in `free` bytes: as few as possible. Kept free: 2 GiB, the
    chunked log-prob buffers (3 fp32 [1024, vocab]) and one layer's activations twice more
    (its recompute and its gradients in backward)."""
    full, kept = activation_bytes(a)
    if math.isinf(free):
        return 0
    reserve = 2 * 2**30 + 12 * 1024 * a.vocab_size
    n = a.num_layers
    budget = free - reserve - 2 * tokens * full
    uncheckpointed = int((budget - tokens * kept * n) // max(tokens * (full - kept), 1))
    return n - max(0, min(n, uncheckpointed))


def free_bytes(device: torch.device, limit: float | None = None) -> float:
    """Memory a forward may still use: free on the device plus what the allocator holds unused
    (CUDA), and no more than `limit` minus what is allocated."""
    if device.type != "cuda":
        return float("inf")
    free, _ = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    out = float(free + torch.cuda.memory_reserved(device) - allocated)
    return out if limit is None else min(out, limit - allocated)


def causal_mask(attn: torch.Tensor) -> torch.Tensor:
    """[B, T] key-validity (1 = real token) -> [B, 1, T, T] causal bool mask.

    Every query also sees itself, so left-padding rows never attend to nothing
    (which would give NaN); their outputs are ignored downstream.
    """
    t = attn.shape[1]
    tri = torch.ones(t, t, dtype=torch.bool, device=attn.device).tril()
    m = tri & attn.bool()[:, None, :]
    m = m | torch.eye(t, dtype=torch.bool, device=attn.device)
    return m.unsqueeze(1)


def positions_from_mask(attn: torch.Tensor) -> torch.Tensor:
    """Rotary positions for left-padded rows: 0 at each row's first real token."""
    return (attn.long().cumsum(-1) - 1).clamp(min=0)
