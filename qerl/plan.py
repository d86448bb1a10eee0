"""Memory planner: says before a run starts whether it fits on the GPU, and what dominates.

An analytic estimate from the model's shape and the run config, component by component:
quantized weights (bits per weight of the format, scales included), bf16 embeddings and
lm_head, LoRA parameters with their gradients and AdamW states (fp32), the rollout KV cache
(all prompts x group size, prompt + completion length), sampling logits, training activations
of one packed micro-batch (its groups' prompts once plus every completion token; per layer
`qerl.modeling.activation_bytes`, a checkpointed layer keeping its input only; `auto` picks
the checkpointed layers by the same rule the model applies, `auto_checkpoint_layers`, given
the memory the rest leaves), one layer's recompute / gradients in backward, the chunked
log-prob buffers, one layer's dequantization buffer, and a fixed CUDA context / allocator
reserve. `estimate` is the sum (what `qerl bench step` compares with the measured peak);
`total` adds 10% headroom for fragmentation and decides whether the run fits.

Data-parallel runs (`ranks` > 1, `qerl.distributed`) are planned per rank: every rank holds the
whole quantized model, the adapter and its optimizer states; its rollout holds its share of the
prompts (prompts_per_step / ranks, each with its group_size completions), its update micro-batches
are as large as in one process, and one gradient all-reduce bucket is added.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import Config
from .distributed import BUCKET_BYTES
from .errors import QerlError
from .modeling import KNOWN_MODELS, LINEAR_NAMES, ModelArgs, activation_bytes, auto_checkpoint_layers
from .quant import get_format

GB = 1e9
CUDA_RESERVE_GB = 1.5  # context, cuBLAS workspaces, allocator slack


def linear_shapes(a: ModelArgs) -> dict[str, tuple[int, int]]:
    h, i, d = a.hidden_size, a.intermediate_size, a.head_dim
    return {
        "q_proj": (a.num_heads * d, h),
        "k_proj": (a.num_kv_heads * d, h),
        "v_proj": (a.num_kv_heads * d, h),
        "o_proj": (h, a.num_heads * d),
        "gate_proj": (i, h),
        "up_proj": (i, h),
        "down_proj": (h, i),
    }


@dataclass
class Plan:
    components: dict[str, float]  # bytes
    available: float | None  # bytes

    checkpointed: int = 0  # layers the training forward checkpoints

    @property
    def estimate(self) -> float:
        return sum(self.components.values())

    @property
    def total(self) -> float:
        return self.estimate * 1.10

    @property
    def fits(self) -> bool | None:
        return None if self.available is None else self.total <= self.available

    def table(self) -> str:
        rows = [f"{k:<44} {v / GB:8.2f} GB" for k, v in sorted(self.components.items(), key=lambda kv: -kv[1])]
        rows.append(f"{'total (+10% headroom)':<44} {self.total / GB:8.2f} GB")
        if self.available is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            rows.append(f"{'available':<44} {self.available / GB:8.2f} GB  -> {verdict}")
        return "\n".join(rows)


def plan_memory(
    a: ModelArgs,
    cfg: Config,
    prompt_len: int = 512,
    available_gb: float | None = None,
    quant: str | None = None,
    ranks: int = 1,
) -> Plan:
    fmt = get_format(quant or cfg.model.quant)
    shapes = linear_shapes(a)
    r = cfg.model.lora_rank
    act = 2  # bf16 activations on the GPU
    weights = a.num_layers * sum(n * k * fmt.bits_per_weight / 8 + 4 for n, k in shapes.values())
    embed = a.vocab_size * a.hidden_size * act * (1 if a.tie_word_embeddings else 2)
    lora_params = a.num_layers * sum(r * (n + k) for name, (n, k) in shapes.items() if name in LINEAR_NAMES)
    rows = max(1, cfg.rollout.prompts_per_step // ranks) * cfg.rollout.group_size  # this rank's rollout
    seq = prompt_len + cfg.rollout.max_new_tokens
    kv = a.num_layers * 2 * rows * a.num_kv_heads * a.head_dim * seq * act
    sampling = rows * a.vocab_size * 4 * 3  # fp32 logits, probabilities, CDF
    g = cfg.rollout.group_size
    groups = max(1, cfg.optim.micro_batch_size // g)
    tokens = groups * (prompt_len + g * cfg.rollout.max_new_tokens)  # one packed micro-batch
    full, kept = activation_bytes(a, act)
    logits = min(1024, tokens) * a.vocab_size * 4 * 3  # one chunk of chunked log-probs, forward + backward
    dequant = max(n * k for n, k in shapes.values()) * act if fmt.name != "bf16" else 0
    rest = weights + embed + lora_params * 16 + kv + sampling + dequant + CUDA_RESERVE_GB * GB
    mode = cfg.model.gradient_checkpointing
    if mode == "on":
        ckpt = a.num_layers
    elif mode == "auto" and available_gb:
        ckpt = auto_checkpoint_layers(a, tokens, available_gb * GB - rest)
    else:
        ckpt = 0
    activations = tokens * (ckpt * kept + (a.num_layers - ckpt) * full)
    comps = {
        f"weights ({fmt.name}, decoder Linears)": weights,
        "embeddings + lm_head (bf16)": embed,
        f"LoRA r={r}: params+grads+AdamW (fp32)": lora_params * 16,
        f"rollout KV cache ({rows} x {seq} tokens)": kv,
        "sampling logits": sampling,
        f"training activations ({tokens} tokens, {ckpt}/{a.num_layers} layers checkpointed)": activations,
        "one layer's recompute / gradients": tokens * full,
        "log-prob chunk": logits,
        "dequantization buffer (one layer)": dequant,
        "CUDA context + reserve": CUDA_RESERVE_GB * GB,
    }
    if ranks > 1:
        comps[f"gradient all-reduce bucket ({ranks} ranks)"] = min(BUCKET_BYTES, lora_params * 4)
    return Plan(comps, available_gb * GB if available_gb else None, ckpt)


def known_model(name: str) -> bool:
    """A model the planner knows offline: a `KNOWN_MODELS` name or its hub id (Qwen/Qwen2.5-7B-Instruct)."""
    return name.lower() in {k for n, c in KNOWN_MODELS.items() for k in (n, c["hub"].lower())}


def plan_model_args(name: str) -> ModelArgs:
    """The shape `qerl plan --model-config NAME` plans for: a known model (offline), a config.json or HF
    directory, or another hub id (needs the hub); anything else is a one-line error listing the known ones."""
    if known_model(name) or Path(name).exists():
        return ModelArgs.from_name(name)
    known = ", ".join(f"{n} ({c['hub']})" for n, c in KNOWN_MODELS.items())
    if "/" not in name:
        raise QerlError(f"--model-config {name}: not a known model, config.json or directory; known: {known}")
    try:
        return ModelArgs.from_name(name)
    except (OSError, ValueError) as e:
        raise QerlError(f"--model-config {name}: {str(e).strip().splitlines()[0]}; known offline: {known}") from None


def rollout_shape(cfg: Config, prompt_len: int, ranks: int = 1) -> str:
    r = cfg.rollout
    share = f" per rank ({r.prompts_per_step} a step over {ranks} ranks)" if ranks > 1 else ""
    return (
        f"rollout shape{share}: {max(1, r.prompts_per_step // ranks)} prompts x {r.group_size} completions, "
        f"prompts up to {prompt_len} "
        f"tokens (--prompt-len) + up to {r.max_new_tokens} generated (rollout.max_new_tokens); "
        f"update micro-batch {cfg.optim.micro_batch_size} sequences"
    )
