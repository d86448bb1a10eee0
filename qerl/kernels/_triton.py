"""Whether the GPU kernels can run here, and the one error raised when they cannot.

Asking for a kernel where it cannot run (no Triton, a CPU tensor) raises
`KernelUnavailable` instead of quietly falling back to the slow reference path, so a
benchmark or a rollout never reports reference-path numbers as kernel numbers.
`TRITON_INTERPRET=1` runs the kernels on CPU tensors (slowly) for debugging.
"""
from __future__ import annotations

import os

import torch

from qerl.errors import QerlError

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs: the reference path needs none of this
    triton = None
    tl = None
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


class KernelUnavailable(QerlError):
    """A GPU kernel was requested where it cannot run."""


def require(*tensors: torch.Tensor, what: str = "qerl GPU kernels"):
    if not HAS_TRITON:
        raise KernelUnavailable(f"{what} need Triton (pip install triton); use backend='reference' on this machine")
    for t in tensors:
        if t is not None and t.device.type != "cuda" and not INTERPRET:
            raise KernelUnavailable(f"{what} need CUDA tensors, got a tensor on {t.device}; "
                                    f"use backend='reference' on this device")


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
