"""One decode step's token draw: the reference's inverse-CDF sampling (`qerl.rollout.sampling.sample_tokens`)
against the token-draw kernel (`qerl.kernels.token_draw`), on bf16 logits of the Qwen2.5 vocabulary.

Byte model: the kernel must read the logits once (B x V x 2 bytes); GB/s = those bytes / time, beside the
device-to-device copy bandwidth measured in the same run (read + write bytes a second). Times: medians of
CUDA-graph replays (the seed draw included in the kernel's).
Usage: python benchmarks/bench_sampling_gpu.py [--rows 1,8,64,128] [--vocab 151936] [--out FILE.json]
"""

import argparse

import torch

from qerl.bench import copy_bandwidth, graph_time_us, write_rows
from qerl.kernels.token_draw import draw_tokens
from qerl.rollout.sampling import sample_tokens


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,8,64,128")
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}; copy {bw / 1e9:.0f} GB/s (read + write); vocab {a.vocab}", flush=True)
    torch.manual_seed(0)  # the default generator: graph capture takes it (a custom one needs registering)
    rows = []
    for m in map(int, a.rows.split(",")):
        logits = (torch.randn(m, a.vocab, device="cuda") * 3).bfloat16()
        ref = graph_time_us(lambda: sample_tokens(logits, a.temperature))
        fast = graph_time_us(lambda: draw_tokens(logits, a.temperature, torch.randint(2**31 - 1, (1,), device="cuda")))
        nbytes = logits.numel() * logits.element_size()
        row = dict(rows=m, vocab=a.vocab, reference_us=ref, kernel_us=fast, GBs=nbytes / fast / 1e3)
        row["pct_copy"] = 100 * row["GBs"] / (bw / 1e9)
        rows.append(row)
        print(
            f"rows {m:4d}: reference {ref:8.1f} us, kernel {fast:6.1f} us ({ref / fast:5.1f}x), "
            f"{row['GBs']:.0f} GB/s = {row['pct_copy']:.0f}% of copy",
            flush=True,
        )
    write_rows(a.out, rows, copy_Bps=bw)


if __name__ == "__main__":
    main()
