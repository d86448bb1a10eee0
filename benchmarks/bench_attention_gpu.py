"""Decode attention with a group's prompt keys shared (`decode_attention(prefix_rows=, prefix_len=)`) against each
row reading its own copy, at the rollout's shapes (Qwen2.5-7B heads, bf16 cache, groups of `--group` samples).

Byte model: each row reads its keys and values, ctx x Hkv x D x 2 tensors x 2 bytes; shared, a group's prompt
keys are needed once (groups x prompt + rows x (ctx - prompt) keys). GB/s = the bytes each variant must read /
its time, beside the copy bandwidth measured in the same run (read + write bytes a second). Medians of CUDA-graph
replays of the whole call (split + merge). The shared output is checked against the unshared one on a cache
where every row holds its prompt's keys.
Usage: python benchmarks/bench_attention_gpu.py [--rows 64,128] [--ctx 512,1280,2304] [--prompt 256] [--group 8]
"""

import argparse

import torch

from qerl.bench import copy_bandwidth, graph_time_us, write_rows
from qerl.kernels.decode_attention import attention_splits, decode_attention
from qerl.modeling import ModelArgs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-7b")
    ap.add_argument("--rows", default="64,128")
    ap.add_argument("--ctx", default="512,1280,2304")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    m = ModelArgs.from_name(a.model)
    hq, hkv, d = m.num_heads, m.num_kv_heads, m.head_dim
    bw = copy_bandwidth()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name()}; copy {bw / 1e9:.0f} GB/s (read + write); {a.model}", flush=True)
    out_rows = []
    for b in map(int, a.rows.split(",")):
        ctxs = list(map(int, a.ctx.split(",")))
        cap = max(ctxs) + 64
        kc, vc = (torch.randn(b, hkv, cap, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        src = (torch.arange(b, device="cuda") // a.group * a.group).int()  # each group's first row holds the prompt
        for c in (kc, vc):
            c[:, :, : a.prompt] = c[src.long(), :, : a.prompt]
        q = torch.randn(b, hq, d, device="cuda", dtype=torch.bfloat16)
        mask = torch.ones(b, cap, device="cuda", dtype=torch.int8)
        plen = torch.tensor([a.prompt], device="cuda", dtype=torch.int32)
        out = torch.empty(b, hq * d, device="cuda", dtype=torch.bfloat16)
        ns = attention_splits(b, hkv, cap, sms)
        for ctx in ctxs:
            nk = torch.tensor([ctx], device="cuda", dtype=torch.int32)
            own = decode_attention(q, kc, vc, mask, nk, ns).float()
            shared = decode_attention(q, kc, vc, mask, nk, ns, prefix_rows=src, prefix_len=plen).float()
            err = ((shared - own).abs().max() / own.abs().max()).item()
            t_own = graph_time_us(lambda: decode_attention(q, kc, vc, mask, nk, ns, out=out))
            t_sh = graph_time_us(
                lambda: decode_attention(q, kc, vc, mask, nk, ns, out=out, prefix_rows=src, prefix_len=plen)
            )
            per_key = hkv * d * 2 * 2
            need_own = b * ctx * per_key
            need_sh = (-(-b // a.group) * a.prompt + b * (ctx - a.prompt)) * per_key
            row = dict(
                rows=b,
                ctx=ctx,
                prompt=a.prompt,
                group=a.group,
                nsplit=ns,
                own_us=t_own,
                shared_us=t_sh,
                own_GBs=need_own / t_own / 1e3,
                shared_GBs=need_sh / t_sh / 1e3,
                err=err,
            )
            out_rows.append(row)
            print(
                f"rows {b:4d} ctx {ctx:5d}: own {t_own:7.1f} us ({row['own_GBs']:.0f} GB/s), shared {t_sh:7.1f} us "
                f"({row['shared_GBs']:.0f} GB/s of the bytes it needs) {t_own / t_sh:.2f}x; "
                f"copy {bw / 1e9:.0f}; rel err {err:.1e}",
                flush=True,
            )
    write_rows(a.out, out_rows, copy_Bps=bw)


if __name__ == "__main__":
    main()
