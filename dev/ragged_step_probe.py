"""Which step of `qerl bench step --quant nvfp4 --lengths lognormal:600` turns non-finite, and what is then.

Runs the benchmark's own trainer (`qerl.bench_step.step_trainer`) for a few steps and after each prints: the
step's skipped updates, entropy and gradient norm, and the non-finite entries of every floating-point tensor
of the model (parameters and buffers: LoRA, norms, biases, embedding, lm_head), named.
Usage (repo root, GPU): PYTHONPATH=. python dev/ragged_step_probe.py [steps] [lengths] [model config]
"""

import sys
import warnings

import torch

from qerl.bench_step import step_trainer
from qerl.modeling import ModelArgs

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 4
lengths = sys.argv[2] if len(sys.argv) > 2 else "lognormal:600"
args = ModelArgs.from_name(sys.argv[3] if len(sys.argv) > 3 else "qwen2.5-7b")
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
warnings.simplefilter("always")
tr = step_trainer(
    args,
    "nvfp4",
    prompts=8,
    group_size=8,
    prompt_len=256,
    gen_len=2048,
    lengths=lengths,
    micro_batch=None,
    gradient_checkpointing="auto",
    lora_rank=16,
    device=dev,
    dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32,
    out_dir="/tmp/probe",
)


def non_finite(model) -> str:
    bad = [
        f"{n} {int((~torch.isfinite(t)).sum())}/{t.numel()}"
        for n, t in [*model.named_parameters(), *model.named_buffers()]
        if t.is_floating_point() and t.element_size() > 1 and not bool(torch.isfinite(t).all())
    ]
    return f"{len(bad)} tensors non-finite: {bad[:6]}" if bad else "every tensor finite"


print("before:", non_finite(tr.model), flush=True)
for s in range(steps):
    m = tr.step(s)
    print(
        f"step {s}: skipped {m.get('skipped_updates')}, entropy {m.get('entropy', float('nan')):.3f}, "
        f"grad_norm {m.get('grad_norm', float('nan')):.4f}, completion_len {m.get('completion_len')}; "
        f"after: {non_finite(tr.model)}",
        flush=True,
    )
