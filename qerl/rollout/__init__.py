"""Rollouts: sample completions from the live model (quantized base + LoRA + AQN noise).

- `sampling.py`: `SamplingParams`, `Rollout`, `sample_tokens` (what both engines share);
- `engine.py`: `Engine`, the reference engine in plain PyTorch (any device), and the `generate` template;
- `cuda.py`: `CudaEngine`, the CUDA-graph decode engine on the GPU kernels (`qerl.kernels`);
- `make_engine`: the fastest engine that runs here.
"""

from __future__ import annotations

from ..modeling import CausalLM
from .engine import Engine, dequant_cache, folded_weights
from .sampling import Rollout, SamplingParams, left_pad, sample_tokens

__all__ = [
    "Engine",
    "Rollout",
    "SamplingParams",
    "dequant_cache",
    "folded_weights",
    "left_pad",
    "make_engine",
    "sample_tokens",
]


def make_engine(model: CausalLM, tokenizer, backend: str = "auto", **kwargs) -> Engine:
    """The fastest engine that can run `model` here.

    backend="auto": `CudaEngine` (`qerl.rollout.cuda`) when the model is on a CUDA device, Triton works
    and the architecture and weight formats are supported; else the reference `Engine`.
    backend="cuda": `CudaEngine`, or a `KernelUnavailable` error saying why it cannot run (no fallback).
    backend="reference": `Engine`. Extra keyword arguments go to `CudaEngine` (eos_ids, check_every, ...).
    """
    if backend not in ("auto", "cuda", "reference"):
        raise ValueError(f"unknown rollout backend '{backend}' (auto, cuda or reference)")
    if backend == "reference":
        return Engine(model, tokenizer)
    from ..kernels import KernelUnavailable

    try:
        from .cuda import CudaEngine

        return CudaEngine(model, tokenizer, **kwargs)
    except (KernelUnavailable, ImportError) as e:  # no GPU or Triton, q/k-norm, nf4 weights
        if backend == "cuda":
            if isinstance(e, KernelUnavailable):
                raise
            raise KernelUnavailable(f"the CUDA rollout engine cannot run here: {e}") from e
        return Engine(model, tokenizer)
