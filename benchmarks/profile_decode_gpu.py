"""Where one decode step's time goes: per-kernel GPU time of `CudaEngine._decode_step` (torch.profiler,
eager launches, same kernels as the graph) next to the CUDA-graph replay time of the same step.

Random Qwen2.5 weights (no download), LoRA rank 16 live, KV cache filled to `--ctx` keys.
Usage: python benchmarks/profile_decode_gpu.py [--model qwen2.5-7b] [--quant nvfp4,bf16] [--batch 1,8,64]
"""

import argparse
import json
import re
import statistics
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from qerl.bench import NullTokenizer, build_random_model
from qerl.modeling import ModelArgs
from qerl.rollout.cuda import CudaEngine


def kernel_family(name: str) -> str:
    """Group launches: Triton kernels by function name, the rest by a short prefix."""
    n = re.sub(r"<.*", "", name)
    for key in ("gemv", "gemm", "Kernel2", "cutlass", "sm90", "nvjet"):
        if key in n:
            return "cuBLAS " + n[:48]
    return n[:60]


def profile_step(eng: CudaEngine, b: int, ctx: int, reps: int = 3) -> dict:
    eng._ensure_capacity(b, ctx + 64)
    eng.refresh_weights()
    eng.slot.fill_(ctx)
    eng.nkeys.fill_(ctx + 1)
    eng.pos[:b] = ctx
    for _ in range(2):  # compile
        eng._decode_step(b)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            eng._decode_step(b)
        torch.cuda.synchronize()
    fam = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        t = getattr(e, "device_time", None)
        if t is None:
            t = e.cuda_time
        f = fam[kernel_family(e.name)]
        f[0] += t / reps
        f[1] += 1 / reps
    # graph replay of the same step
    eng.graphs.clear()
    eng._run_step(b)
    times = []
    for _ in range(30):
        s, t = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        eng.graphs[b].replay()
        t.record()
        t.synchronize()
        times.append(s.elapsed_time(t))
    rows = sorted(((k, v[0], v[1]) for k, v in fam.items()), key=lambda r: -r[1])
    return dict(
        batch=b,
        graph_ms=statistics.median(times[5:]),
        kernel_us_total=sum(r[1] for r in rows),
        launches=sum(r[2] for r in rows),
        kernels=[dict(name=k, us=round(u, 1), n=round(n)) for k, u, n in rows],
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-7b")
    ap.add_argument("--quant", default="nvfp4,bf16")
    ap.add_argument("--batch", default="1,8,64")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    args = ModelArgs.from_name(a.model)
    res = []
    for q in a.quant.split(","):
        model = build_random_model(args, q, 16)
        eng = CudaEngine(model, NullTokenizer(), eos_ids=[])
        for b in map(int, a.batch.split(",")):
            r = profile_step(eng, b, a.ctx)
            r["quant"] = q
            res.append(r)
            print(
                f"\n== {a.model} {q} batch {b}: graph replay {r['graph_ms']:.3f} ms/step; kernels "
                f"{r['kernel_us_total'] / 1e3:.3f} ms in {r['launches']:.0f} launches",
                flush=True,
            )
            for k in r["kernels"][:14]:
                print(f"  {k['us']:9.1f} us  x{k['n']:<4} {k['name']}")
        del eng, model
        torch.cuda.empty_cache()
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
