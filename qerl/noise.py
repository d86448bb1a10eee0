"""Adaptive Quantization Noise (AQN): scheduled Gaussian noise in the RMSNorm scales.

QeRL (arXiv 2510.11696; `docs/formats.md` section 3) adds Z ~ N(0, sigma^2 I) to the
weight of every decoder layer's `input_layernorm` and `post_attention_layernorm`
while rollouts are sampled. Because RMSNorm scales channel-wise, this equals a
row-wise multiplicative noise (1 + Z / w) on the Linear weights that the norm feeds
(q, k, v and gate, up), at no memory or FLOP cost. The final `model.norm` is left
clean. sigma follows a K-stage schedule (`aqn_sigma`): 0 in stage 0, then decaying
from sigma_start to sigma_end.

How this departs from the released QeRL code:
- The released code adds the noise to Hugging Face RMSNorm modules while rollouts
  run in vLLM's own model classes, so as released the noise very likely never
  reached the sampling policy. Here the noise is written IN PLACE into the weights
  of the same model that samples, so every consumer of those tensors (including a
  captured CUDA graph, which keeps pointers, not values) sees it. A rollout engine
  that copies or folds the norm weights elsewhere would not; tests check that the
  logits move.
- The training forward is noise-free (the context manager restores the weights
  bit-exactly), so rollout and training policies differ; `qerl.rl.sampling`
  measures that mismatch and can correct it with importance weights.
- Noise is drawn from an explicit `torch.Generator` (fp32, on the generator's
  device), so a run is reproducible from its seed.

Precision note: the noisy weight is rounded once to the weight dtype. In bf16 the
spacing is 2^-8 ~ 3.9e-3 just below 1.0 and 7.8e-3 above, so for weights near 1 the
share of entries that change at all falls from 77% at sigma 1e-2 (stage 1 of the
default schedule) to 23% at 2.2e-3 (stage 5), 3% at 1.1e-3 (stage 7) and 0.005% at
5e-4 (stage 9): with bf16 norm weights the late stages are nearly a no-op. Keep the
norm weights in fp32 if the whole schedule is to act.
"""

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

SCHEDULES = ("exp", "linear", "cosine", "log")
# Where the decoder layers live: a causal LM, a bare base model, and a PEFT-wrapped causal LM.
_LAYER_PATHS = ("model.layers", "layers", "base_model.model.model.layers")


@dataclass
class AQNConfig:
    enabled: bool = True
    sigma_start: float = 1e-2
    sigma_end: float = 5e-4  # paper Table 4; the released scripts used 1e-4
    num_stages: int = 10
    schedule: str = "exp"  # "exp" (the paper's choice) | "linear" | "cosine" | "log"

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.num_stages < 3:
            # Stage 0 is noise-free and stages 1..K-1 must span sigma_start -> sigma_end.
            raise ValueError(f"num_stages must be >= 3, got {self.num_stages}")
        if not (self.sigma_start > 0 and self.sigma_end > 0):
            raise ValueError(f"sigma_start and sigma_end must be > 0, got {self.sigma_start}, {self.sigma_end}")


def aqn_sigma(step: int, total_steps: int, cfg: AQNConfig) -> float:
    """sigma for a 0-based training `step` out of `total_steps`.

    The steps split into K equal stages, stage = min(step * K // total_steps, K - 1).
    Stage 0 gives 0. Stages k = 1..K-1 interpolate from sigma_start (k = 1) to exactly
    sigma_end (k = K-1) in t = (k - 1) / (K - 2):
      exp     sigma_start^(1-t) * sigma_end^t     (= sigma_start * (end/start)^t)
      linear  (1-t) * sigma_start + t * sigma_end
      cosine  sigma_end + (sigma_start - sigma_end) * (1 + cos(pi t)) / 2
      log     linear in log(k): u = ln(1 + t (K-2)) / ln(K-1) = ln k / ln(K-1),
              (1-u) * sigma_start + u * sigma_end -- falls fastest in the first
              noisy stages, then flattens (the paper names but does not define it)
    The forms are written so that both endpoints are exact in floating point.
    """
    if not cfg.enabled:
        return 0.0
    if total_steps < 1 or step < 0:
        raise ValueError(f"need total_steps >= 1 and step >= 0, got {step}, {total_steps}")
    k_stages = cfg.num_stages
    stage = min(step * k_stages // total_steps, k_stages - 1)
    if stage == 0:
        return 0.0
    t = (stage - 1) / (k_stages - 2)
    s0, s1 = cfg.sigma_start, cfg.sigma_end
    if cfg.schedule == "exp":
        return s0 ** (1.0 - t) * s1**t
    if cfg.schedule == "linear":
        u = t
    elif cfg.schedule == "cosine":
        u = 1.0 - 0.5 * (1.0 + math.cos(math.pi * t))
    else:  # "log"
        u = math.log(stage) / math.log(k_stages - 1)
    return (1.0 - u) * s0 + u * s1


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    for path in _LAYER_PATHS:
        mod = model
        for name in path.split("."):
            mod = getattr(mod, name, None)
            if mod is None:
                break
        if isinstance(mod, nn.ModuleList):
            return mod
    raise ValueError(
        f"{type(model).__name__} has no decoder layers at any of {', '.join(_LAYER_PATHS)}; "
        "AQN needs a Llama/Qwen2/Qwen3-style model (possibly PEFT-wrapped)"
    )


def norm_weights(model: nn.Module) -> list[torch.Tensor]:
    """The input_layernorm and post_attention_layernorm weights of every decoder layer.

    Order: layer 0 input, layer 0 post-attention, layer 1 input, ... The final norm
    (`model.model.norm`) and Qwen3's q_norm / k_norm are not included.
    """
    weights = []
    for i, layer in enumerate(_decoder_layers(model)):
        for name in ("input_layernorm", "post_attention_layernorm"):
            w = getattr(getattr(layer, name, None), "weight", None)
            if not isinstance(w, torch.Tensor):
                raise ValueError(f"decoder layer {i} ({type(layer).__name__}) has no {name}.weight")
            weights.append(w)
    return weights


@contextlib.contextmanager
def apply_noise(model: nn.Module, sigma: float, generator: torch.Generator) -> Iterator[dict]:
    """Context manager: the norm weights of `model` carry fresh AQN noise inside, clean after.

    On entry each tensor of `norm_weights(model)` gets its own Z ~ N(0, sigma^2 I),
    sampled in fp32 with `generator` on the generator's device (use a generator on
    the model's device to avoid a host copy), added in fp32 and rounded once to the
    weight dtype, in place. On exit, exception or not, the weights are restored
    bit-exactly from clones. `sigma == 0` does nothing at all. Works under no_grad /
    inference_mode; the weights stay the same Parameters with the same requires_grad.
    Do not keep an autograd graph that uses the norm weights across the context: the
    in-place writes bump their version counters. Yields {"sigma", "num_tensors"}.
    """
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if sigma == 0:
        yield {"sigma": 0.0, "num_tensors": 0}
        return
    weights = norm_weights(model)
    originals: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            for w in weights:
                originals.append(w.detach().clone())
                z = torch.randn(w.shape, generator=generator, device=generator.device, dtype=torch.float32)  # [H]
                w.copy_(originals[-1].float() + sigma * z.to(w.device))
        yield {"sigma": float(sigma), "num_tensors": len(weights)}
    finally:
        with torch.no_grad():
            for w, orig in zip(weights, originals):
                w.copy_(orig)
