"""Where the non-finite loss of `qerl bench step --quant nvfp4 --lengths lognormal:600` comes from.

Builds the benchmark's own trainer (`qerl.bench_step.step_trainer`), rolls out one step (8 prompts x 8,
lognormal(600) lengths), then for each group (one micro-batch) reports non-finite values in: the
rollout's log-probs, the packed update forward without gradient, the padded reference forward, and the
packed forward + backward in train mode (gradient checkpointing as the trainer planned it). For the first
group whose packed forward is non-finite, forward hooks name the first decoder layer (and module in it)
whose output is non-finite, and the probe repeats the forward with the reference (elementwise
dequantizing) linears. Last, the trainer's own `policy_update` on the whole batch.
Usage (repo root, GPU): PYTHONPATH=. python dev/ragged_update_probe.py [lengths] [checkpointing] [model config]
"""

import sys

import torch

from qerl.bench_step import step_trainer
from qerl.lora import quant_linears
from qerl.modeling import ModelArgs
from qerl.update import packed_logprobs, policy_update, sequence_logprobs

lengths = sys.argv[1] if len(sys.argv) > 1 else "lognormal:600"
ckpt = sys.argv[2] if len(sys.argv) > 2 else "auto"
args = ModelArgs.from_name(sys.argv[3] if len(sys.argv) > 3 else "qwen2.5-7b")
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
tr = step_trainer(
    args,
    "nvfp4",
    prompts=8,
    group_size=8,
    prompt_len=256,
    gen_len=2048,
    lengths=lengths,
    micro_batch=None,
    gradient_checkpointing=ckpt,
    lora_rank=16,
    device=dev,
    dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32,
    out_dir="/tmp/probe",
)
model, G, T = tr.model, 8, 1.0
print(f"lengths {lengths}, checkpointing {ckpt}: {model.gradient_checkpointing} layers", flush=True)
groups, sigma, _ = tr.rollout(0)
rewards = torch.cat([g["rewards"] for g in groups])
batch = tr.batch(groups, rewards)
n = batch.input_ids.shape[0]


def bad(x, mask):
    return int((~torch.isfinite(x) & mask).sum())


def first_bad_module(mb):
    """Forward hooks on every decoder layer and its submodules: the first output that is non-finite."""
    found, hooks = [], []
    for i, layer in enumerate(model.model.layers):
        for name, mod in layer.named_modules():

            def hook(m, inp, out, tag=f"layer {i} {name or 'out'}"):
                o = out[0] if isinstance(out, tuple) else out
                if not found and torch.is_tensor(o) and not bool(torch.isfinite(o).all()):
                    x = inp[0] if inp and torch.is_tensor(inp[0]) else None
                    found.append(
                        f"{tag}: input finite {None if x is None else bool(torch.isfinite(x).all())}, "
                        f"input absmax {None if x is None else float(x.float().abs().max()):.3g}, "
                        f"output non-finite {int((~torch.isfinite(o)).sum())} of {o.numel()} {tuple(o.shape)}"
                    )

            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        packed_logprobs(model, mb, T, group=G)
    for h in hooks:
        h.remove()
    return found[0] if found else "no module output non-finite (lm_head / log-softmax?)"


located = False
for s in range(0, n, G):
    mb = batch.slice(slice(s, s + G))
    m = mb.mask
    with torch.no_grad():
        lp, ent = packed_logprobs(model, mb, T, group=G)
        rlp, _ = sequence_logprobs(model, mb, T, group=G)
    model.train()
    lpg, entg = packed_logprobs(model, mb, T, group=G)
    loss = -(lpg * m).sum() / m.sum()
    loss.backward()
    gbad = sum(int((~torch.isfinite(p.grad)).sum()) for p in tr.params if p.grad is not None)
    tr.optimizer.zero_grad(set_to_none=True)
    model.eval()
    diff = float(((lp - mb.rollout_logp).abs() * m).max())
    print(
        f"group {s // G}: tokens {int(m.sum())}, lengths {m.sum(1).tolist()}; non-finite rollout {bad(mb.rollout_logp, m)}, "
        f"packed {bad(lp, m)}, entropy {bad(ent, m)}, reference {bad(rlp, m)}, train {bad(lpg, m)}, grads {gbad}; "
        f"max |packed - rollout| {diff:.3f}",
        flush=True,
    )
    if not located and (bad(lp, m) or bad(ent, m)):
        located = True
        try:
            print("  first non-finite:", first_bad_module(mb), flush=True)
        except Exception as e:  # a probe: report and go on
            print("  hooks failed:", repr(e), flush=True)
        qs = quant_linears(model).values()
        old = [q.backend for q in qs]
        for q in qs:
            q.backend = "reference"
        with torch.no_grad():
            lp2, ent2 = packed_logprobs(model, mb, T, group=G)
        for q, b in zip(qs, old):
            q.backend = b
        print(f"  reference linears: non-finite packed {bad(lp2, m)}, entropy {bad(ent2, m)}", flush=True)
upd = policy_update(
    model,
    tr.optimizer,
    tr.params + list(tr.norms.values()),
    batch,
    tr.loss_cfg,
    temperature=T,
    micro_batch_size=G,
    num_iterations=1,
    max_grad_norm=1.0,
    is_level="token",
    is_mode="truncate",
    is_threshold=2.0,
    group=G,
)
print("policy_update:", {k: round(v, 4) for k, v in upd.items()}, flush=True)
