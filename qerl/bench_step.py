"""`qerl bench step`: the whole RL step (rollout with AQN, rewards, advantages, policy update,
optimizer step) on random weights of a real model shape, several formats side by side.

It runs `Trainer.step` itself, not a copy. What a benchmark must supply instead of a real run:
- prompts: `RandomTokenizer` turns each synthetic question into `prompt_len` random token ids;
- lengths: random weights never emit EOS, so `ForcedLengths` gives each completion a length
  drawn from `--lengths` (`full`, `uniform:LO-HI`, `lognormal:MEAN`, capped at `gen_len`) through
  `SamplingParams.row_max_tokens`, and the engine stops each row there (ragged batches);
- rewards: alternating 1/0 within each group, so every group is informative and the update
  does all of its work (a real run skips all-equal groups).

Per format it prints rollout / update / step seconds (median of `--steps` measured steps after
one warm-up step), generated tokens/s, the update's model FLOP rate and its share of the bf16
matmul peak measured in the same run, and the peak memory beside `qerl plan`'s estimate.
Update FLOPs (stated, attention excluded): 6 x decoder Linear parameters x training tokens
(each group's prompt once plus every completion token: forward, recompute, input gradient)
+ 6 x lm_head parameters x completion tokens.

Under torchrun (`torchrun --nproc-per-node N -m qerl bench step ...`) the step is the trainer's
data-parallel step: `--prompts` is the whole step's count, each rank (one GPU each) samples and
trains on its share, and rank 0 prints. Each row then also has the ranks, the all-reduce of the
adapter's gradients per step (seconds, the slowest rank, waiting included) and every rank's peak
memory; tokens per second count the whole step's tokens, so 1-rank and N-rank rows compare directly
(`benchmarks/dp_step_gpu.sh` runs both in one call).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import statistics
import time
from pathlib import Path

import torch

from .bench import NullTokenizer, build_random_model
from .config import Config, load_config
from .data import Record
from .distributed import shutdown, world_from_env
from .modeling import ModelArgs
from .plan import linear_shapes, plan_memory


class RandomTokenizer(NullTokenizer):
    """Maps any text to `length` random ids fixed by the text (so a prompt is the same every time)."""

    chat_template = None

    def __init__(self, vocab: int, length: int):
        self.vocab, self.length = vocab, length

    def __call__(self, text, add_special_tokens=False):
        rng = random.Random(text)
        ids = [rng.randrange(3, self.vocab) for _ in range(self.length)]
        return type("Encoding", (), {"input_ids": ids})()


def parse_lengths(spec: str, gen_len: int):
    """'full' | 'uniform:LO-HI' | 'lognormal:MEAN' -> a function (n, rng) -> n lengths in [1, gen_len]."""
    kind, _, arg = spec.partition(":")
    try:
        if kind == "full" and not arg:
            return lambda n, rng: [gen_len] * n
        if kind == "uniform":
            lo, hi = (int(x) for x in arg.split("-"))
            if not 1 <= lo <= hi:
                raise ValueError
            return lambda n, rng: [min(gen_len, rng.randint(lo, hi)) for _ in range(n)]
        if kind == "lognormal":
            mean = float(arg)
            if mean <= 0:
                raise ValueError
            s = 0.8  # log-space spread; mu so that the (uncapped) mean is `mean`
            mu = math.log(mean) - s * s / 2
            return lambda n, rng: [max(1, min(gen_len, round(rng.lognormvariate(mu, s)))) for _ in range(n)]
    except ValueError:
        pass
    raise ValueError(f"--lengths {spec!r}: expected full, uniform:LO-HI or lognormal:MEAN")


class ForcedLengths:
    """An engine whose every completion ends at a length drawn from `draw` (see module doc)."""

    def __init__(self, engine, draw, seed: int = 0):
        self.engine, self.draw, self.rng = engine, draw, random.Random(seed)

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, prompts, params, generator=None):
        rows = self.draw(len(prompts) * params.n, self.rng)
        return self.engine.generate(
            prompts, dataclasses.replace(params, row_max_tokens=tuple(rows)), generator=generator
        )


def alternating_rewards(texts, golds, lengths, max_len, cfg=None):
    r = [float(i % 2) for i in range(len(texts))]
    return r, {"correct": r}


def matmul_peak(device, n: int = 8192, iters: int = 10) -> float:
    """bf16 FLOP/s of an n x n x n matmul (median of `iters`), the ceiling the update is measured against."""
    if device.type != "cuda":
        return float("nan")
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    times = []
    for _ in range(iters + 3):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        a @ b
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) / 1e3)
    return 2 * n**3 / statistics.median(times[3:])


def update_flops(args, train_tokens: int, completion_tokens: int) -> float:
    lin = args.num_layers * sum(n * k for n, k in linear_shapes(args).values())
    return 6.0 * lin * train_tokens + 6.0 * args.vocab_size * args.hidden_size * completion_tokens


def step_config(
    prompts: int,
    group_size: int,
    gen_len: int,
    micro_batch: int | None,
    gradient_checkpointing: str,
    lora_rank: int,
    device: str,
    out_dir: str,
) -> Config:
    return load_config(
        None,
        {
            "model": {
                "lora_rank": lora_rank,
                "lora_alpha": 2 * lora_rank,
                "gradient_checkpointing": gradient_checkpointing,
                "device": device,
            },
            "data": {"chat_template": False, "suffix": None},
            "rollout": {
                "prompts_per_step": prompts,
                "group_size": group_size,
                "max_new_tokens": gen_len,
                "temperature": 1.0,
            },
            "algo": {"name": "grpo"},
            "optim": {"micro_batch_size": micro_batch or group_size, "lr": 1e-5},
            "train": {"max_steps": 100, "output_dir": out_dir, "eval_every": 0},
        },
    )


def step_trainer(
    args,
    quant: str,
    *,
    prompts: int,
    group_size: int,
    prompt_len: int,
    gen_len: int,
    lengths: str,
    micro_batch: int | None,
    gradient_checkpointing: str,
    lora_rank: int,
    device,
    dtype,
    update_path: str = "packed",
    out_dir: str,
    gpu_mem: float | None = None,
):
    """The `Trainer` that `bench_one` times: random weights of `args` in `quant`, synthetic prompts,
    alternating rewards, completions stopped at lengths drawn from `lengths`."""
    from .trainer import Trainer

    ranks = world_from_env().size  # under torchrun the config names the device type; each rank's GPU is its own
    cfg = step_config(
        prompts,
        group_size,
        gen_len,
        micro_batch,
        gradient_checkpointing,
        lora_rank,
        device.type if ranks > 1 else str(device),
        out_dir,
    )
    model = build_random_model(args, quant, lora_rank, device=device, dtype=dtype)
    if gpu_mem and model.device.type == "cuda":  # as on a GPU of gpu_mem GiB: allocations past it fail, "auto" plans so
        total = torch.cuda.get_device_properties(model.device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, gpu_mem * 2**30 / total), model.device)
        model.memory_limit = gpu_mem * 2**30
    tok = RandomTokenizer(args.vocab_size, prompt_len)
    recs = [Record(f"question {i}", "0") for i in range(max(64, 4 * prompts))]
    tr = Trainer(
        cfg, progress=False, model=model, tokenizer=tok, records=(recs, recs[:1]), reward_fn=alternating_rewards
    )
    tr.update_path = update_path
    tr.engine = ForcedLengths(_engine(model, tok), parse_lengths(lengths, gen_len))
    return tr


def bench_one(args, quant: str, *, steps: int, profile: str | None = None, **setup) -> dict:
    """`steps` measured steps (after a warm-up step) of `step_trainer(args, quant, **setup)`."""
    tr = step_trainer(args, quant, **setup)
    prompts, group_size, prompt_len = setup["prompts"], setup["group_size"], setup["prompt_len"]
    gpu_mem, update_path = setup.get("gpu_mem"), tr.update_path
    cfg, model, world = tr.cfg, tr.model, tr.world  # world: torchrun's ranks (size 1 without torchrun)
    device = model.device  # with its index (cuda:N)
    cuda = device.type == "cuda"
    total = torch.cuda.get_device_properties(device).total_memory if cuda else None
    rows = []
    for s in range(steps + 1):  # step 0 warms up: compiling, CUDA-graph capture, allocator growth
        if cuda:
            torch.cuda.synchronize()
            if s == 1:
                torch.cuda.reset_peak_memory_stats()
        if profile and s == steps and cuda:  # the last measured step, per kernel
            m = _profiled(tr, s, Path(profile) / f"{quant}-{update_path}.txt")
        else:
            m = tr.step(s)
        if s:
            rows.append(m)
    med = {k: statistics.median(r[k] for r in rows) for k in ("rollout_s", "update_s", "step_s")}
    gen_tokens = statistics.median(r["completion_len"] for r in rows) * prompts * group_size
    train_tokens = prompts * prompt_len + gen_tokens  # a group's prompt runs once
    fl = update_flops(args, train_tokens, gen_tokens)
    peaks = world.gather(
        (torch.cuda.max_memory_allocated(device) / 2**30, torch.cuda.max_memory_reserved(device) / 2**30)
        if cuda
        else (math.nan, math.nan)
    )
    avail = (gpu_mem * 2**30 if gpu_mem else total) / 1e9 if cuda else None
    plan = plan_memory(args, cfg, prompt_len=prompt_len, quant=quant, available_gb=avail, ranks=world.size)
    out = dict(
        quant=quant,
        update_path=update_path,
        ranks=world.size,
        **med,
        allreduce_s=statistics.median(r.get("allreduce_s", 0.0) for r in rows),
        generated_tokens=gen_tokens,
        gen_tok_s=gen_tokens / med["rollout_s"],
        step_tok_s=gen_tokens / med["step_s"],
        update_flops=fl,
        update_tflop_s=fl / med["update_s"] / 1e12,
        peak_gib=max(p for p, _ in peaks),
        reserved_gib=max(r for _, r in peaks),
        peak_gib_ranks=[p for p, _ in peaks],
        reserved_gib_ranks=[r for _, r in peaks],
        plan_gib=plan.estimate / 2**30,
        plan_checkpointed=plan.checkpointed,
        gpu_mem_gib=gpu_mem,
        entropy=statistics.median(r.get("entropy", math.nan) for r in rows),
        # measured steps whose update was skipped (a non-finite loss or gradient): their update time is no update's
        skipped_updates=sum(r.get("skipped_updates", 0.0) > 0 for r in rows),
        measured_steps=len(rows),
    )
    if cuda:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    del tr, model
    if cuda:
        torch.cuda.empty_cache()
    return out


def _profiled(tr, s: int, path: Path) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        m = tr.step(s)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=90))
    return m


def _engine(model, tok):
    from .rollout import make_engine

    return (
        make_engine(model, tok, eos_ids=[])
        if model.device.type == "cuda"
        else make_engine(model, tok, backend="reference")
    )


def run_step_bench(
    model_config: str = "qwen2.5-7b",
    quants=("nvfp4", "bf16"),
    prompts: int = 8,
    group_size: int = 8,
    prompt_len: int = 256,
    gen_len: int = 2048,
    lengths: str = "full",
    micro_batch: int | None = None,
    gradient_checkpointing: str = "auto",
    lora_rank: int = 16,
    steps: int = 2,
    out: str | None = None,
    update_paths=("packed",),
    device: str | None = None,
    dtype=None,
    profile: str | None = None,
    gpu_mem: float | None = None,
) -> list[dict]:
    parse_lengths(lengths, gen_len)  # a bad spec fails before any model is built
    world = world_from_env()  # torchrun's ranks: one GPU each, rank 0 reports
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and world.size > 1:
        dev = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(dev)
    say = print if world.is_main else (lambda *a, **k: None)
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    args = ModelArgs.from_name(model_config)
    peak = matmul_peak(dev)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    ranks = f"; {world.size} data-parallel ranks" if world.size > 1 else ""
    say(
        f"device {name}; bf16 matmul peak {peak / 1e12:.0f} TFLOP/s (8192^3, median); model {model_config}; "
        f"{prompts} prompts x {group_size} x ({prompt_len} + {gen_len}), lengths {lengths}, LoRA r{lora_rank}, "
        f"checkpointing {gradient_checkpointing}{ranks}",
        flush=True,
    )
    rows = []
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for q in quants:
            for path in update_paths:
                t = time.perf_counter()
                r = bench_one(
                    args,
                    q,
                    prompts=prompts,
                    group_size=group_size,
                    prompt_len=prompt_len,
                    gen_len=gen_len,
                    lengths=lengths,
                    micro_batch=micro_batch,
                    gradient_checkpointing=gradient_checkpointing,
                    lora_rank=lora_rank,
                    steps=steps,
                    device=dev,
                    dtype=dtype,
                    update_path=path,
                    out_dir=f"{tmp}/{q}-{path}",
                    profile=profile,
                    gpu_mem=gpu_mem,
                )
                r["peak_pct"] = 100 * r["update_tflop_s"] * 1e12 / peak if peak == peak else math.nan
                r["bench_s"] = time.perf_counter() - t
                rows.append(r)
                say(_line(r), flush=True)
    base = {r["update_path"]: r for r in rows if r["quant"] == "bf16"}
    for r in rows:
        b = base.get(r["update_path"])
        valid = b and not r["skipped_updates"] and not b["skipped_updates"]
        r["step_vs_bf16"] = b["step_s"] / r["step_s"] if valid else math.nan
    say()
    say(table(rows))
    for r in rows:
        if r["skipped_updates"]:
            say(
                f"warning: {r['quant']} skipped the update in {_skipped(r)} (non-finite loss or gradient): its update "
                "and step times are no update's, and it has no ratio to bf16"
            )
    shutdown()
    if out and world.is_main:
        Path(out).write_text(
            json.dumps(
                dict(
                    device=name,
                    matmul_peak_flop_s=peak,
                    model=model_config,
                    prompts=prompts,
                    group_size=group_size,
                    prompt_len=prompt_len,
                    gen_len=gen_len,
                    lengths=lengths,
                    lora_rank=lora_rank,
                    gradient_checkpointing=gradient_checkpointing,
                    ranks=world.size,
                    rows=rows,
                ),
                indent=1,
            )
        )
    return rows


def _line(r: dict) -> str:
    dp = f"  all-reduce {r['allreduce_s']:.3f} s, peak per rank {_gib(r['peak_gib_ranks'])}" if r["ranks"] > 1 else ""
    return (
        f"{r['quant']:<6} {r['update_path']:<9} rollout {r['rollout_s']:7.2f} s  update {r['update_s']:7.2f} s  "
        f"step {r['step_s']:7.2f} s  {r['gen_tok_s']:8.0f} gen tok/s  {r['step_tok_s']:8.0f} tok/s a step  {r['update_tflop_s']:6.1f} TFLOP/s "
        f"({r['peak_pct']:.0f}% of peak)  peak {r['peak_gib']:.1f} GiB allocated, {r['reserved_gib']:.1f} reserved "
        f"(plan {r['plan_gib']:.1f}, {r['plan_checkpointed']} layers checkpointed){dp}"
        + (f"  UPDATE SKIPPED in {_skipped(r)}" if r["skipped_updates"] else "")
    )


def _skipped(r: dict) -> str:
    return f"{r['skipped_updates']} of {r['measured_steps']} measured steps"


def _ratio(x: float) -> str:
    return f"{x:.2f}x" if x == x else "-"  # no bf16 row in the run: no ratio


def _gib(values: list[float]) -> str:
    return " / ".join(f"{v:.1f}" for v in values) + " GiB"


def table(rows: list[dict]) -> str:
    lines = [
        "| format | update path | ranks | rollout s | update s | all-reduce s | step s | gen tok/s | tok/s a step | "
        "update TFLOP/s | % bf16 peak | peak GiB (allocated / reserved, largest rank) | plan GiB | step vs bf16 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['quant']} | {r['update_path']} | {r['ranks']} | {r['rollout_s']:.2f} | {r['update_s']:.2f} | "
            f"{r['allreduce_s']:.3f} | {r['step_s']:.2f} | {r['gen_tok_s']:.0f} | {r['step_tok_s']:.0f} | "
            f"{r['update_tflop_s']:.1f} | {r['peak_pct']:.0f} | "
            f"{r['peak_gib']:.1f} / {r['reserved_gib']:.1f} | "
            f"{r['plan_gib']:.1f} | {'update skipped' if r['skipped_updates'] else _ratio(r['step_vs_bf16'])} |"
        )
    return "\n".join(lines)
