"""`QuantLinear`: a frozen quantized weight plus an optional live LoRA adapter.

The packed weight and its scales are buffers named as in compressed-tensors
checkpoints (`weight_packed`, `weight_scale`, `weight_global_scale`); no
full-precision copy is kept. `forward` = dequantize + matmul + bias + LoRA:

    y = x @ deq(W).T + b + (alpha / r) * dropout(x) @ A.T @ B.T

The dequantized weight exists only inside the matmul: the autograd function below
saves no activation for the frozen base and re-dequantizes in backward, so training
memory stays at the packed size. Fast GPU kernels plug in behind the same module
through `backend` (see `qerl.kernels`); the reference path works everywhere.
"""

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .formats import get_format


class _DequantMatmul(torch.autograd.Function):
    """y = x @ deq(W).T with W frozen: backward needs only deq(W), recomputed."""

    @staticmethod
    def forward(ctx, x, module):
        ctx.module = module
        return F.linear(x, module.dequantized(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        w = ctx.module.dequantized(grad_out.dtype)
        return grad_out @ w, None


class QuantLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        fmt: str = "nvfp4",
        bias: bool = False,
        device=None,
        dtype=torch.bfloat16,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.format = get_format(fmt)
        self.bias = (
            nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False) if bias else None
        )
        self.lora_rank = 0
        self.lora_scaling = 0.0
        self.lora_A: nn.Parameter | None = None
        self.lora_B: nn.Parameter | None = None
        self.lora_dropout: nn.Module = nn.Identity()
        self.lora_enabled = True
        # dtype the LoRA products run in; None: the adapter's own (fp32). The GPU trainer sets
        # the activation dtype (bf16 GEMMs, as the rollout engine's LoRA epilogue computes),
        # the fp32 parameters and their gradients stay as they are.
        self.lora_compute_dtype: torch.dtype | None = None
        self.backend = "reference"
        # Opt-in cache of the dequantized weight (CPU rollouts): trades the memory
        # saving for speed; off by default so a GPU never holds a bf16 copy.
        self.cache_dequantized = False
        self._cache: torch.Tensor | None = None
        # Inference-only dense W + (alpha/r) B A for one rollout (`qerl.rollout.folded_weights`);
        # ignored whenever autograd is on, so training never computes with it.
        self._folded: torch.Tensor | None = None

    # --- weights -----------------------------------------------------------
    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        fmt: str = "nvfp4",
        bias: torch.Tensor | None = None,
        global_scale: torch.Tensor | None = None,
    ) -> "QuantLinear":
        out_f, in_f = weight.shape
        m = cls(
            in_f,
            out_f,
            fmt,
            bias=bias is not None,
            device=weight.device,
            dtype=bias.dtype if bias is not None else torch.bfloat16,
        )
        m.set_weight(weight, global_scale=global_scale)
        if bias is not None:
            m.bias.data.copy_(bias.detach())
        return m

    def set_weight(self, weight: torch.Tensor, global_scale: torch.Tensor | None = None):
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight shape {tuple(weight.shape)} != ({self.out_features}, {self.in_features})")
        kwargs = {"global_scale": global_scale} if (global_scale is not None and self.format.fused_global_scale) else {}
        self.load_quantized(self.format.quantize(weight, **kwargs))

    def load_quantized(self, tensors: dict):
        """Adopt already-quantized tensors (e.g. from a compressed-tensors checkpoint) as they are."""
        for name, t in tensors.items():
            self.register_buffer(name, t, persistent=True)
        self._cache = None

    def quantized_tensors(self) -> dict:
        names = ("weight_packed", "weight_scale", "weight_global_scale", "weight")
        return {n: getattr(self, n) for n in names if isinstance(getattr(self, n, None), torch.Tensor)}

    def dequantized(self, dtype=torch.bfloat16) -> torch.Tensor:
        if self._cache is not None and self._cache.dtype == dtype:
            return self._cache
        w = self.format.dequantize(self.quantized_tensors(), dtype)
        if self.cache_dequantized:
            self._cache = w
        return w

    def clear_cache(self):
        self._cache = None

    # --- LoRA ---------------------------------------------------------------
    def add_lora(self, rank: int, alpha: float | None = None, dropout: float = 0.0, dtype=torch.float32):
        """A: Kaiming-uniform (as PEFT), B: zeros, so a fresh adapter changes nothing."""
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        device = self.quantized_tensors()[
            "weight_packed" if "weight_packed" in self.quantized_tensors() else "weight"
        ].device
        self.lora_rank = rank
        self.lora_scaling = (alpha if alpha is not None else rank) / rank
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def lora_delta(self) -> torch.Tensor:
        """The dense update (alpha/r) * B @ A, [N, K]."""
        return self.lora_scaling * (self.lora_B @ self.lora_A)

    def fold_lora(self, dtype: torch.dtype):
        """Hold deq(W) + (alpha/r) B A (the live adapter, if enabled) as one dense weight for
        inference: one GEMM instead of three; the two small LoRA GEMMs per layer cost as much as
        the base GEMM in batch-1 CPU decoding (SmolLM2: +26 ms per token). Undo with `unfold_lora`."""
        w = self.dequantized(dtype)
        if self.lora_rank and self.lora_enabled:
            w = w + self.lora_delta().to(dtype)  # a new tensor: a cached base stays as it is
        self._folded = w

    def unfold_lora(self):
        self._folded = None

    # --- forward --------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._folded is not None and self._folded.dtype == x.dtype and not torch.is_grad_enabled():
            y = F.linear(x, self._folded)  # base + adapter, folded for a rollout
            return y if self.bias is None else y + self.bias.to(y.dtype)
        if self.backend == "reference":
            # Without autograd (rollouts) a plain linear does the same work minus the Function's overhead.
            y = _DequantMatmul.apply(x, self) if torch.is_grad_enabled() else F.linear(x, self.dequantized(x.dtype))
        else:
            from qerl.kernels import quant_matmul  # GPU kernels, imported only when asked for

            y = quant_matmul(x, self)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        if self.lora_rank and self.lora_enabled:
            if self.lora_compute_dtype == y.dtype:
                # In the output's dtype: the up-projection accumulates into y in its GEMM's epilogue
                # (addmm), the scaling folded into B ([N, r]), so no extra pass over the [tokens, N] output.
                h = F.linear(self.lora_dropout(x), self.lora_A.to(y.dtype)).reshape(-1, self.lora_rank)
                b = (self.lora_B * self.lora_scaling).to(y.dtype)
                return torch.addmm(y.reshape(-1, y.shape[-1]), h, b.T).view(y.shape)
            cdt = self.lora_compute_dtype or self.lora_A.dtype
            h = self.lora_dropout(x).to(cdt)
            lora = F.linear(F.linear(h, self.lora_A.to(cdt)), self.lora_B.to(cdt))
            y = y + (lora * self.lora_scaling).to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, format={self.format.name}, "
            f"bias={self.bias is not None}, lora_rank={self.lora_rank}"
        )


def warn_unquantized(name: str, k: int, block: int, fmt: str):
    warnings.warn(f"{name}: K={k} is not divisible by the {fmt} block size {block}; kept unquantized", stacklevel=3)
