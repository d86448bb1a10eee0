"""Whether the GPU kernels can run here, and the one error raised when they cannot.

Asking for a kernel where it cannot run (no Triton, a CPU tensor) raises
`KernelUnavailable` instead of quietly falling back to the slow reference path, so a
benchmark or a rollout never reports reference-path numbers as kernel numbers.
`TRITON_INTERPRET=1` runs the kernels on CPU tensors (slowly) for debugging.
"""

from __future__ import annotations

import functools
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
            raise KernelUnavailable(
                f"{what} need CUDA tensors, got a tensor on {t.device}; use backend='reference' on this device"
            )


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# ---- programmatic dependent launch (PDL, Hopper+) ---------------------------------------------------------
# Inside `programmatic_launch(True)`, the decode-step kernels are launched with CUDA's programmatic stream
# serialization: a kernel may be scheduled while the previous one is still running and waits for it with
# `griddepcontrol.wait` (`pdl_wait`) before touching its inputs; every PDL kernel waits unconditionally, so
# each kernel's completion still implies its predecessors' (the chain stays transitive). Off by default.
_PDL = [False]


@functools.cache
def _pdl_supported() -> bool:
    return HAS_TRITON and not INTERPRET and torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


class programmatic_launch:
    """Context manager: launch the decode-step kernels with PDL (`enabled` and a Hopper-or-newer GPU)."""

    def __init__(self, enabled: bool = True):
        self.enabled = bool(enabled) and _pdl_supported()

    def __enter__(self):
        self.prev, _PDL[0] = _PDL[0], self.enabled
        return self

    def __exit__(self, *exc):
        _PDL[0] = self.prev


def pdl_launch() -> dict:
    """Launch arguments of a PDL-aware kernel: the PDL constexpr and Triton's launch_pdl option."""
    return dict(PDL=_PDL[0], launch_pdl=_PDL[0])


if HAS_TRITON:
    try:
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    except ImportError:  # older Triton: PDL stays off (programmatic_launch is never entered with it)
        gdc_launch_dependents = gdc_wait = None

    @triton.jit
    def pdl_wait(PDL: tl.constexpr):
        """Wait for the previous kernel (its writes visible), then let the next one be scheduled."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
else:
    pdl_wait = None


# ---- offline looks at the machine code (tests/test_nvfp4_mma.py, benchmarks/sass_decode.py) -------------------
def _cubin_tool(compiled, tool: str, *args: str) -> str:
    """Run one of the CUDA binary tools Triton ships (nvdisasm, cuobjdump) on a compiled kernel's cubin."""
    import subprocess
    import tempfile

    exe = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)
    with tempfile.TemporaryDirectory() as d:
        cubin = os.path.join(d, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        return subprocess.run([exe, *args, cubin], capture_output=True, text=True, check=True).stdout


def disassemble(compiled) -> str:
    """The SASS of a compiled kernel (`triton.compile` output), by the nvdisasm Triton ships: no GPU needed."""
    return _cubin_tool(compiled, "nvdisasm", "-c")


def registers(compiled) -> int:
    """Registers a thread of a compiled kernel uses (cuobjdump's resource usage): no GPU needed."""
    import re

    return int(re.search(r"REG:(\d+)", _cubin_tool(compiled, "cuobjdump", "-res-usage")).group(1))


def main_loop(sass: str) -> list[str]:
    """The instructions of the longest loop in `disassemble`'s output: from a label to a conditional backward
    branch to it (an unconditional one is out-of-line code, e.g. an mbarrier wait's retry, jumping back in)."""
    import re

    labels, instrs, pending = {}, [], []
    for line in sass.splitlines():
        lab = re.match(r"^\.(L_x_\d+):", line)
        if lab:
            pending.append(lab.group(1))
            continue
        ins = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*)", line)
        if ins:
            addr = int(ins.group(1), 16)
            labels.update({p: addr for p in pending})
            pending = []
            instrs.append((addr, ins.group(2)))
    best: list[str] = []
    for addr, text in instrs:
        br = re.search(r"^@!?P\d\s+BRA\s+`\(\.(L_x_\d+)\)", text)
        if br and labels.get(br.group(1), 1 << 62) <= addr:
            loop = [t for a, t in instrs if labels[br.group(1)] <= a <= addr]
            if len(loop) > len(best):
                best = loop
    return best
