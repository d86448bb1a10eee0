"""Does a decode kernel run slower when its weights come from DRAM than from L2, and does an L2 prefetch of them
(`qerl.kernels.prefetch.prefetch_l2`, fire and forget) bring the L2 time back?

The kernel benchmarks replay one call again and again, so every weight that fits the 50 MB L2 (7B q|k|v, o,
down) is read from L2; in the engine's decode step each layer's weights come from DRAM. Per Qwen2.5 layer shape
and row count, medians of CUDA-graph replays (us): `warm` (the call alone, replayed), `cold` (a 256 MB write
flushes L2 first; its own time subtracted), `prefetched` (flush, then `prefetch_l2` of the weight and scale bytes,
then the call; flush + prefetch subtracted), and the prefetch launch alone after a flush.
Usage: python benchmarks/probe_l2_gpu.py [--model qwen2.5-7b] [--rows 1,8] [--shapes qkv,o,gate|up,down]
"""
import argparse
import json
import statistics

import torch

from qerl.bench import random_nvfp4_layers
from qerl.kernels.fused_linear import fused_linear
from qerl.kernels.prefetch import prefetch_l2


def graph_us(fns, reps: int = 60) -> float:
    """Median time of one replay of a CUDA graph holding fns in order."""
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        for f in fns:  # compile / warm up outside the graph
            f()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times[10:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-7b")
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--shapes", default="qkv,o,gate|up,down")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.manual_seed(0)
    junk = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    flush = lambda: junk.fill_(1)  # noqa: E731
    res = []
    for layer in random_nvfp4_layers(a.model, a.shapes):
        w, sc = layer.q["weight_packed"], layer.q["weight_scale"]
        pre = lambda: prefetch_l2([w, sc])  # noqa: E731
        for m in map(int, a.rows.split(",")):
            x = torch.randn(m, layer.k, device="cuda", dtype=torch.bfloat16)
            y = torch.empty(m, layer.n // 2 if layer.glu else layer.n, device="cuda", dtype=torch.bfloat16)
            call = lambda: fused_linear(x, "nvfp4", w, sc, layer.gs, glu=layer.glu, out=y)  # noqa: E731
            t_flush, t_fp = graph_us([flush]), graph_us([flush, pre])
            r = dict(shape=layer.name, m=m, mb=layer.nbytes / 1e6, warm_us=graph_us([call]),
                     cold_us=graph_us([flush, call]) - t_flush, prefetched_us=graph_us([flush, pre, call]) - t_fp,
                     prefetch_us=t_fp - t_flush, flush_us=t_flush)
            res.append(r)
            print(f"{layer.name:8s} M={m:<3d} {r['mb']:6.1f} MB  warm {r['warm_us']:6.1f} us | cold {r['cold_us']:6.1f}"
                  f" | prefetched {r['prefetched_us']:6.1f} | prefetch launch {r['prefetch_us']:5.1f}", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
