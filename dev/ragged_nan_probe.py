"""Which rollout path gives non-finite log-probs with ragged lengths on random Qwen2.5-7B NVFP4 weights.

`qerl bench step --quant nvfp4 --lengths lognormal:600` on one H100 (2026-12-07, growable allocator segments on)
skipped every update for a non-finite loss (entropy NaN) while bf16 in the same run did not. This rolls out
8 prompts x 8 samples, each stopped at a lognormal(600) length (as the benchmark), and counts non-finite
log-probs for: the engine as it is, no shared prompt keys (64 prompts, n 1), the reference token draw (top_k =
vocabulary), and no `nvfp4_wgmma`. Run it twice, with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True and
without, and in the tree before (a `git archive` of 8058eac) with the label `old` (the default case only).
If every case is finite, the non-finite loss came from the update (NVFP4 checkpointed 7 of 28 layers there on
the H100, bf16 10; the H200 run of 2026-12-02 checkpointed none and was finite).
Usage (repo root, GPU): PYTHONPATH=. python dev/ragged_nan_probe.py new|old
"""

import random
import sys

import torch

from qerl.bench import NullTokenizer, build_random_model
from qerl.bench_step import parse_lengths
from qerl.kernels.choice import ALL_KERNELS, LinearKernel
from qerl.modeling import ModelArgs
from qerl.rollout import SamplingParams
from qerl.rollout.cuda import CudaEngine

which = sys.argv[1]
args = ModelArgs.from_name("qwen2.5-7b")
model = build_random_model(args, "nvfp4", lora_rank=16, seed=0)
draw = parse_lengths("lognormal:600", 2048)
g = torch.Generator().manual_seed(0)
prompts = [torch.randint(1, 1000, (256,), generator=g).tolist() for _ in range(8)]
lim = tuple(draw(64, random.Random(0)))


def probe(name, eng, prompts, n, **kw):
    p = SamplingParams(temperature=1.0, max_new_tokens=2048, n=n, seed=1, row_max_tokens=lim, **kw)
    r = eng.generate(prompts, p)
    lp = r.logprobs[r.mask]
    bad = ~torch.isfinite(r.logprobs) & r.mask
    first = bad.float().argmax(1)[bad.any(1)].tolist()
    print(
        f"{which} {name}: non-finite {int(bad.sum())} of {int(r.mask.sum())} tokens, rows {int(bad.any(1).sum())}, "
        f"first NaN step {sorted(first)[:6]}, lp mean {lp[~torch.isnan(lp)].mean():.3f}",
        flush=True,
    )


eng = CudaEngine(model, NullTokenizer())
probe("default", eng, prompts, 8)
if which == "new":
    probe("n=1 (no shared prompt)", eng, [x for x in prompts for _ in range(8)], 1)
    probe("reference draw (top_k=V)", eng, prompts, 8, top_k=args.vocab_size)
    no_wg = CudaEngine(model, NullTokenizer(), kernels=ALL_KERNELS - {LinearKernel.WGMMA})
    probe("without wgmma", no_wg, prompts, 8)
