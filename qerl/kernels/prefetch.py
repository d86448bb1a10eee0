"""Bring tensors' bytes into the GPU's L2 cache ahead of the kernel that reads them (Hopper's bulk L2 prefetch).

`prefetch_l2(tensors, max_bytes)`: one launch; each thread of a one-warp program issues one
`cp.async.bulk.prefetch.L2` of up to CHUNK bytes (a request to the copy engine: no registers, nothing to wait
for), with an evict-last cache policy so that a kernel streaming other bytes meanwhile does not push these out
first. Nothing is computed or written: only where a later read finds the bytes changes. The decode engine
(`CudaEngine(prefetch=True)`) prefetches each layer's next weights on a side stream while the current kernels
run (measured by `benchmarks/probe_l2_gpu.py`: a decode kernel reading its weights from DRAM takes 10-15%
longer than from L2).
"""
from __future__ import annotations

import torch

from ._triton import HAS_TRITON, require

CHUNK = 16384  # bytes a thread (a multiple of 16)

if HAS_TRITON:
    import triton
    import triton.language as tl

    _ASM = tl.constexpr(
        "{\n.reg .pred p;\n.reg .b64 pol;\ncreatepolicy.fractional.L2::evict_last.b64 pol, 1.0;\n"
        "setp.gt.s32 p, $2, 0;\n@p cp.async.bulk.prefetch.L2.global.L2::cache_hint [$1], $2, pol;\n"
        "mov.u32 $0, 0;\n}")

    @triton.jit
    def _prefetch_range(ptr, nbytes, prog, CHUNK: tl.constexpr):
        """Program `prog` of a tensor's programs: its 32 chunks (the tail chunk rounded down to 16 bytes)."""
        offs = (prog * 32 + tl.arange(0, 32)).to(tl.int64) * CHUNK
        size = (tl.minimum(tl.maximum(nbytes - offs, 0), CHUNK) // 16 * 16).to(tl.int32)
        tl.inline_asm_elementwise(_ASM, "=r,l,r", [ptr + offs, size], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _prefetch_kernel(a_ptr, a_bytes, a_progs, b_ptr, b_bytes, CHUNK: tl.constexpr):
        """Programs [0, a_progs) prefetch a's bytes, the rest b's."""
        pid = tl.program_id(0)
        if pid < a_progs:
            _prefetch_range(a_ptr, a_bytes, pid, CHUNK)
        else:
            _prefetch_range(b_ptr, b_bytes, pid - a_progs, CHUNK)


def prefetch_l2(tensors: list[torch.Tensor], max_bytes: int | None = None) -> None:
    """Ask for the bytes of one or two contiguous tensors (each up to `max_bytes`, from its start) to be brought
    into L2, evict-last; returns at once (one launch, nothing written)."""
    if not 1 <= len(tensors) <= 2:
        raise ValueError("prefetch_l2 takes one or two tensors")
    require(*tensors, what="the L2 prefetch kernel")
    flat = [t.reshape(-1).view(torch.uint8) for t in tensors]
    nbytes = [min(f.numel(), max_bytes or f.numel()) for f in flat]
    progs = [triton.cdiv(n, 32 * CHUNK) for n in nbytes]
    a, b = flat[0], flat[-1]
    nb = nbytes[1] if len(flat) == 2 else 0
    _prefetch_kernel[(progs[0] + (progs[1] if len(flat) == 2 else 0),)](a, nbytes[0], progs[0], b, nb, CHUNK=CHUNK,
                                                                         num_warps=1)
