"""`qerl bench rollout`: rollout speed on random weights of real model shapes, side by side.

Random weights come from `RandomSource`, which makes each tensor on the GPU when the
loader asks for it (layer by layer), so a 32B NVFP4 model is built without ever
holding its bf16 weights. Every row of the table is measured in the same process:

- qerl NVFP4 / MXFP4 / bf16: `CudaEngine` (same engine, same LoRA), EOS disabled so
  each row decodes exactly `gen_len` tokens;
- transformers bf16: `Qwen2ForCausalLM.generate` (random init; LoRA added through PEFT
  when it is installed, so that it also carries a live adapter), greedy (or sampled at
  `temperature`, full vocabulary, on both sides),
  `min_new_tokens = max_new_tokens`.

Columns: decode tokens/s (rows * steps / decode time), end-to-end tokens/s (prefill
included), ms per decode step, achieved GB/s (bytes a decode step must read: weights,
scales, LoRA, lm_head, and the KV cache at the mean context, over the measured step
time) and that as a % of the device-to-device copy bandwidth measured in the same run.
"""

from __future__ import annotations

import gc
import json
import math
import time
from pathlib import Path

import torch

from .modeling import ModelArgs


def graph_time_us(fn) -> float:
    """Median time of `fn` in microseconds over CUDA-graph replays (about 30 ms of them): the kernel
    benchmarks' one timer."""
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=30, return_mode="median") * 1e3


def write_rows(path: str | None, rows: list[dict], **extra) -> None:
    """A kernel benchmark's `--out` JSON: the GPU's name, `extra` (e.g. copy_Bps), the rows (nothing without path)."""
    if path:
        with open(path, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), **extra, rows=rows), f, indent=1)


def random_nvfp4_layers(name: str, only: str | None = None, device: str = "cuda"):
    """Kernel benchmarks' inputs: for each of `ModelArgs.from_name(name).fused_linear_shapes()` (or the comma-separated `only`), random
    weights (std 0.02) quantized to NVFP4, one layer at a time. Yields namespaces with name, n (packed rows),
    k, glu, q (the quantized tensors), wb (the bf16 weight), gs (global scale per segment) and nbytes
    (packed weight + scale bytes)."""
    from types import SimpleNamespace

    from .quant import nvfp4_quantize

    for layer, (n, k, glu) in ModelArgs.from_name(name).fused_linear_shapes().items():
        if only and layer not in only.split(","):
            continue
        w = torch.randn(n, k, device=device) * 0.02
        q = nvfp4_quantize(w)
        wb = w.bfloat16()
        del w
        yield SimpleNamespace(
            name=layer,
            n=n,
            k=k,
            glu=glu,
            q=q,
            wb=wb,
            gs=q["weight_global_scale"].reshape(1).repeat(2 if glu else 1),
            nbytes=q["weight_packed"].numel() + q["weight_scale"].numel(),
        )


class RandomSource:
    """A tensor source for `build_quantized`: HF names -> random tensors made on demand on `device`."""

    def __init__(self, args: ModelArgs, device, dtype=torch.bfloat16, seed: int = 0, std: float = 0.02):
        self.args, self.device, self.dtype, self.std = args, torch.device(device), dtype, std
        self.gen = torch.Generator(self.device)
        self.gen.manual_seed(seed)
        a, h, d = args, args.hidden_size, args.head_dim
        shapes = {"model.embed_tokens.weight": (a.vocab_size, h), "model.norm.weight": (h,)}
        if not a.tie_word_embeddings:
            shapes["lm_head.weight"] = (a.vocab_size, h)
        for i in range(a.num_layers):
            p = f"model.layers.{i}."
            shapes.update(
                {
                    p + "input_layernorm.weight": (h,),
                    p + "post_attention_layernorm.weight": (h,),
                    p + "self_attn.q_proj.weight": (a.num_heads * d, h),
                    p + "self_attn.k_proj.weight": (a.num_kv_heads * d, h),
                    p + "self_attn.v_proj.weight": (a.num_kv_heads * d, h),
                    p + "self_attn.o_proj.weight": (h, a.num_heads * d),
                    p + "mlp.gate_proj.weight": (a.intermediate_size, h),
                    p + "mlp.up_proj.weight": (a.intermediate_size, h),
                    p + "mlp.down_proj.weight": (h, a.intermediate_size),
                }
            )
            if a.attention_bias:
                shapes.update(
                    {
                        p + "self_attn.q_proj.bias": (a.num_heads * d,),
                        p + "self_attn.k_proj.bias": (a.num_kv_heads * d,),
                        p + "self_attn.v_proj.bias": (a.num_kv_heads * d,),
                    }
                )
        self.shapes = shapes

    checkpoint = None  # full precision: the loader quantizes every Linear itself

    def keys(self):
        return self.shapes.keys()

    def quantized(self, module: str, shape):
        return None

    def get(self, key: str) -> torch.Tensor:
        shape = self.shapes[key]
        if key.endswith("norm.weight"):
            return 1.0 + 0.1 * torch.randn(shape, device=self.device, generator=self.gen)
        return (self.std * torch.randn(shape, device=self.device, generator=self.gen)).to(self.dtype)


def build_random_model(args: ModelArgs, quant: str, lora_rank: int, device="cuda", dtype=torch.bfloat16, seed: int = 0):
    """Random-weight qerl model with a live LoRA adapter whose B is random (not zero), eval mode."""
    from .loading import build_quantized
    from .lora import add_lora

    model = build_quantized(args, RandomSource(args, device, dtype, seed), quant, device, dtype)
    if lora_rank:
        add_lora(model, lora_rank)
        g = torch.Generator(device)
        g.manual_seed(seed + 1)
        for m in model.modules():
            if getattr(m, "lora_rank", 0):
                m.lora_B.data.normal_(0.0, 0.01, generator=g)
    model.quant = quant
    return model.eval()


class NullTokenizer:
    """What the engine needs from a tokenizer when prompts are token ids and texts are not wanted."""

    pad_token_id = 0
    eos_token_id = None

    def get_vocab(self):
        return {}

    def decode(self, ids, skip_special_tokens=True):
        return ""

    def batch_decode(self, rows):
        return ["" for _ in rows]


def copy_bandwidth(nbytes: int = 1 << 30, iters: int = 20) -> float:
    """Device-to-device copy, bytes read + written per second (median)."""
    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(iters + 3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    t = sorted(times[3:])[len(times[3:]) // 2]
    del src, dst
    return 2 * nbytes / t


def decode_bytes(model, rows: int, mean_ctx: float) -> float:
    """Bytes one decode step must read: every decoder weight (packed + scales), LoRA, norms,
    lm_head, the embedding rows, and the KV cache of `rows` rows at context `mean_ctx`."""
    from .quant import QuantLinear

    total = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += sum(t.numel() * t.element_size() for t in m.quantized_tensors().values())
            total += sum(t.numel() * t.element_size() for t in (m.bias, m.lora_A, m.lora_B) if t is not None)
    a = model.args
    total += sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "norm" in n)
    total += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    total += rows * a.hidden_size * 2
    total += 2 * a.num_layers * rows * a.num_kv_heads * a.head_dim * 2 * mean_ctx
    return float(total)


def parse_without(spec: str) -> list[frozenset]:
    """'wgmma,mma_sync+wgmma' -> [{WGMMA}, {MMA_SYNC, WGMMA}]: kernel sets a `--without` row leaves out."""
    from .kernels.choice import LinearKernel

    names = {k.value: k for k in LinearKernel if k is not LinearKernel.CUBLAS}
    out = []
    for v in (v.strip() for v in spec.split(",") if v.strip()):
        bad = [o for o in v.split("+") if o not in names]
        if bad:
            raise ValueError(f"unknown kernel {bad[0]!r} in --without {v!r}; known: {', '.join(names)}")
        out.append(frozenset(names[o] for o in v.split("+")))
    return out


def bench_qerl(
    model, batch: int, prompt_len: int, gen_len: int, seed: int = 0, temperature: float = 0.0, **engine_opts
) -> dict:
    from .rollout import SamplingParams
    from .rollout.cuda import CudaEngine

    eng = CudaEngine(model, NullTokenizer(), eos_ids=[], **engine_opts)
    g = torch.Generator("cpu")
    g.manual_seed(seed)
    prompts = torch.randint(0, model.args.vocab_size, (batch, prompt_len), generator=g).tolist()
    eng._ensure_capacity(batch, prompt_len + gen_len)
    eng.generate(prompts, SamplingParams(temperature=temperature, max_new_tokens=32, seed=seed))  # compile + capture
    torch.cuda.synchronize()
    r = eng.generate(prompts, SamplingParams(temperature=temperature, max_new_tokens=gen_len, seed=seed))
    s = eng.last_stats
    assert r.completion_ids.shape == (batch, gen_len) and bool(r.mask.all())
    step_ms = s["decode_ms"] / s["decode_steps"]
    out = dict(
        decode_tok_s=batch * s["decode_steps"] / (s["decode_ms"] / 1e3),
        step_ms=step_ms,
        e2e_tok_s=batch * gen_len / ((s["prefill_ms"] + s["decode_ms"]) / 1e3),
        prefill_ms=s["prefill_ms"],
        bytes_per_step=decode_bytes(model, batch, prompt_len + gen_len / 2),
    )
    del eng
    return out


def bench_hf(
    args: ModelArgs, batch: int, prompt_len: int, gen_len: int, lora_rank: int, temperature: float = 0.0
) -> dict:
    """transformers generate in bf16 on a random-init Qwen2ForCausalLM (+ PEFT LoRA when available)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        rms_norm_eps=args.rms_norm_eps,
        rope_theta=args.rope_theta,
        max_position_embeddings=32768,
        tie_word_embeddings=False,
    )
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = Qwen2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    lora = "none"
    if lora_rank:
        try:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(
                model,
                LoraConfig(
                    r=lora_rank,
                    lora_alpha=lora_rank,
                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                ),
            )
            lora = f"peft r{lora_rank}"
        except ImportError:
            pass
    model.eval()
    ids = torch.randint(0, args.vocab_size, (batch, prompt_len), device="cuda")
    am = torch.ones_like(ids)

    sample = (
        dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
    )

    def run(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = model.generate(  # noqa: F821 (ruff reads the later `del model` as unbinding it)
            input_ids=ids,
            attention_mask=am,
            max_new_tokens=n,
            min_new_tokens=n,
            pad_token_id=0,
            **sample,
        )
        torch.cuda.synchronize()
        assert out.shape[1] == prompt_len + n
        return time.perf_counter() - t

    run(4)
    t1, tn = run(1), run(gen_len)
    step = (tn - t1) / (gen_len - 1)
    res = dict(
        decode_tok_s=batch / step,
        step_ms=step * 1e3,
        e2e_tok_s=batch * gen_len / tn,
        prefill_ms=t1 * 1e3,
        lora=lora,
        gen_len=gen_len,
    )
    del model
    return res


def _free():
    gc.collect()
    torch.cuda.empty_cache()


def run_rollout_bench(
    model_config: str = "qwen2.5-7b",
    quants=("nvfp4", "bf16"),
    batches=(1, 8, 64),
    prompt_len: int = 256,
    gen_len: int = 512,
    lora_rank: int = 16,
    hf: bool = True,
    hf_gen_len: int = 64,
    out: str | None = None,
    temperature: float = 0.0,
    without: str = "",
) -> list[dict]:
    """without: also time each qerl row without these linear kernels, in the same run ('wgmma,mma_sync+wgmma':
    two more rows, 'qerl <fmt> -wgmma' and 'qerl <fmt> -mma_sync-wgmma'; `qerl.kernels.choice` picks among
    the rest)."""
    from .kernels.choice import ALL_KERNELS

    variants = parse_without(without)
    if not torch.cuda.is_available():
        from .kernels import KernelUnavailable

        raise KernelUnavailable("qerl bench rollout needs a CUDA GPU")
    args = ModelArgs.from_name(model_config)
    bw = copy_bandwidth()
    dev = torch.cuda.get_device_name()
    print(
        f"device {dev}; device-to-device copy {bw / 1e9:.0f} GB/s (read + write); model {model_config}, "
        f"prompt {prompt_len}, gen {gen_len}, LoRA r{lora_rank}, temperature {temperature}",
        flush=True,
    )
    rows = []
    for q in quants:
        t = time.perf_counter()
        model = build_random_model(args, q, lora_rank)
        torch.cuda.synchronize()
        print(
            f"built {q} model in {time.perf_counter() - t:.1f}s, {torch.cuda.memory_allocated() / 1e9:.1f} GB",
            flush=True,
        )
        for b in batches:
            for v in [frozenset()] + variants:
                r = bench_qerl(model, b, prompt_len, gen_len, temperature=temperature, kernels=ALL_KERNELS - v)
                name = "".join(f"-{k.value}" for k in sorted(v, key=lambda k: k.value))
                r.update(system=f"qerl {q}" + (f" {name}" if name else ""), batch=b, gen_len=gen_len)
                rows.append(r)
                print(_fmt(r, bw), flush=True)
        del model
        _free()
    if hf:
        for b in batches:
            r = bench_hf(args, b, prompt_len, hf_gen_len, lora_rank, temperature)
            r.update(system=f"transformers bf16 ({r.pop('lora')} LoRA)", batch=b)
            rows.append(r)
            print(_fmt(r, bw), flush=True)
            _free()
    print()
    print(table(rows, bw))
    if out:
        Path(out).write_text(
            json.dumps(
                dict(
                    device=dev,
                    copy_bytes_per_s=bw,
                    model=model_config,
                    prompt_len=prompt_len,
                    gen_len=gen_len,
                    lora_rank=lora_rank,
                    temperature=temperature,
                    rows=rows,
                ),
                indent=1,
            )
        )
    return rows


def _fmt(r: dict, bw: float) -> str:
    gbs = r["bytes_per_step"] / (r["step_ms"] / 1e3) / 1e9 if "bytes_per_step" in r else math.nan
    return (
        f"{r['system']:<34} batch {r['batch']:>3}: {r['decode_tok_s']:9.1f} tok/s decode, {r['e2e_tok_s']:9.1f} e2e, "
        f"{r['step_ms']:7.2f} ms/step, {gbs:6.0f} GB/s, {100 * gbs * 1e9 / bw:5.1f}% of copy"
    )


def table(rows: list[dict], bw: float) -> str:
    lines = [
        "| system | batch | decode tok/s | end-to-end tok/s | ms/step | GB/s | % of copy roofline |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "bytes_per_step" in r:
            gbs = r["bytes_per_step"] / (r["step_ms"] / 1e3) / 1e9
            g, pct = f"{gbs:.0f}", f"{100 * gbs * 1e9 / bw:.1f}"
        else:
            g = pct = "-"
        lines.append(
            f"| {r['system']} | {r['batch']} | {r['decode_tok_s']:.1f} | {r['e2e_tok_s']:.1f} | "
            f"{r['step_ms']:.2f} | {g} | {pct} |"
        )
    return "\n".join(lines)
