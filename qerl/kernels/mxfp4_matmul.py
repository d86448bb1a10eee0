"""`torch.ops.qerl.mxfp4_matmul(x, weight_packed, weight_scale)` = x @ deq(W).T.

Custom op (so torch.compile and CUDA graphs see one opaque call with a shape-only fake
implementation) with autograd for x only: the weight is frozen, and the backward
re-dequantizes into the shared buffer (`dequant.py`) instead of saving anything.
Reference: `qerl.quant.mxfp4.mxfp4_dequantize` + `F.linear`.
"""

import torch

from .fused_linear import fp4_matmul, fp4_matmul_grad


@torch.library.custom_op("qerl::mxfp4_matmul", mutates_args=())
def mxfp4_matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return fp4_matmul("mxfp4", x, packed, scale, None)


@mxfp4_matmul.register_fake
def _(x, packed, scale):
    return x.new_empty(*x.shape[:-1], packed.shape[0])


@torch.library.custom_op("qerl::mxfp4_matmul_grad", mutates_args=())
def mxfp4_matmul_grad(g: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return fp4_matmul_grad("mxfp4", g, packed, scale, None)


@mxfp4_matmul_grad.register_fake
def _(g, packed, scale):
    return g.new_empty(*g.shape[:-1], packed.shape[1] * 2)


def _setup(ctx, inputs, output):
    _, packed, scale = inputs
    ctx.save_for_backward(packed, scale)


def _backward(ctx, grad):
    packed, scale = ctx.saved_tensors
    return mxfp4_matmul_grad(grad, packed, scale), None, None


mxfp4_matmul.register_autograd(_backward, setup_context=_setup)
