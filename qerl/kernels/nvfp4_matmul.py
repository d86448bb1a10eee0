"""`torch.ops.qerl.nvfp4_matmul(x, weight_packed, weight_scale, weight_global_scale)` = x @ deq(W).T.

Custom op (so torch.compile and CUDA graphs see one opaque call with a shape-only fake
implementation) with autograd for x only: the weight is frozen, and the backward
re-dequantizes into the shared buffer (`dequant.py`) instead of saving anything.
Reference: `qerl.quant.nvfp4.nvfp4_dequantize` + `F.linear`.
"""

import torch

from .fused_linear import fp4_matmul, fp4_matmul_grad


@torch.library.custom_op("qerl::nvfp4_matmul", mutates_args=())
def nvfp4_matmul(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor
) -> torch.Tensor:
    return fp4_matmul("nvfp4", x, packed, scale, global_scale)


@nvfp4_matmul.register_fake
def _(x, packed, scale, global_scale):
    return x.new_empty(*x.shape[:-1], packed.shape[0])


@torch.library.custom_op("qerl::nvfp4_matmul_grad", mutates_args=())
def nvfp4_matmul_grad(
    g: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor
) -> torch.Tensor:
    return fp4_matmul_grad("nvfp4", g, packed, scale, global_scale)


@nvfp4_matmul_grad.register_fake
def _(g, packed, scale, global_scale):
    return g.new_empty(*g.shape[:-1], packed.shape[1] * 2)


def _setup(ctx, inputs, output):
    _, packed, scale, gs = inputs
    ctx.save_for_backward(packed, scale, gs)


def _backward(ctx, grad):
    packed, scale, gs = ctx.saved_tensors
    return nvfp4_matmul_grad(grad, packed, scale, gs), None, None, None


nvfp4_matmul.register_autograd(_backward, setup_context=_setup)
