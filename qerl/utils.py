"""Small helpers shared by the CLI, the engine and the trainer."""

import torch


def resolve_dtype(name: str | None, device) -> torch.dtype:
    """'auto' (or None): bf16 on CUDA, fp32 elsewhere. On CPUs, also those with bf16 matrix units (AMX,
    AVX512-BF16) where bf16 runs faster: fp32 is exact and computes the same on every CPU. (The default task's
    seeds spread as widely in fp32 with a different thread count as in bf16: README, so bf16 is not their cause.)"""
    table = {
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if name in (None, "auto"):
        if torch.device(device).type == "cuda":
            return torch.bfloat16
        return torch.float32
    if name not in table:
        from .errors import QerlError

        raise QerlError(f"unknown dtype '{name}'; choose auto, bfloat16, float16 or float32")
    return table[name]
