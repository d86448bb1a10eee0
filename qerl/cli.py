"""`qerl` command line. Each subcommand is a thin wrapper over a Python API function.

User mistakes (bad config, missing file, unknown format) raise QerlError / ValueError /
OSError and are printed as one line with exit code 2, never a stack trace.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="RL for LLMs on NVFP4 weights with LoRA and AQN.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (rollout speed, the whole RL step).")
app.add_typer(bench_app, name="bench")


def _print_version(value: bool):
    if value:
        from . import __version__

        print(f"qerl {__version__}")
        raise typer.Exit()


@app.callback()
def _top(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
):
    pass


@bench_app.command("rollout")
def bench_rollout(
    model_config: str = typer.Option("qwen2.5-7b", help="qwen2.5-7b | qwen2.5-14b | qwen2.5-32b | a config.json"),
    quant: str = typer.Option("nvfp4,bf16", help="comma-separated weight formats (nvfp4, mxfp4, bf16)"),
    batch: str = typer.Option("1,8,64", help="comma-separated batch sizes"),
    prompt_len: int = typer.Option(256),
    gen_len: int = typer.Option(512),
    lora_rank: int = typer.Option(16),
    hf: bool = typer.Option(True, help="also time transformers generate (bf16)"),
    hf_gen_len: int = typer.Option(64, help="tokens for the (slow) transformers rows"),
    temperature: float = typer.Option(0.0, help="0: greedy; > 0: sampled, as in training rollouts"),
    without: str = typer.Option(
        "",
        help="also time qerl without these linear kernels (same run), '+' to combine, "
        "e.g. 'wgmma,mma_sync+wgmma'; kernels: mma_sync, wgmma, gemv, tc",
    ),
    out: str = typer.Option(None, help="write the numbers as JSON here"),
):
    """Rollout speed on random weights of a real config: qerl (CUDA engine) vs transformers, side by side."""
    from .bench import run_rollout_bench

    run_rollout_bench(
        model_config,
        tuple(q.strip() for q in quant.split(",") if q.strip()),
        tuple(int(b) for b in batch.split(",")),
        prompt_len,
        gen_len,
        lora_rank,
        hf,
        hf_gen_len,
        out,
        temperature,
        without,
    )


@bench_app.command("step")
def bench_step(
    model_config: str = typer.Option("qwen2.5-7b", help="qwen2.5-7b | qwen2.5-14b | qwen2.5-32b | a config.json"),
    quant: str = typer.Option("nvfp4,bf16", help="comma-separated weight formats (nvfp4, mxfp4, bf16)"),
    prompts: int = typer.Option(8, help="prompts per step"),
    group_size: int = typer.Option(8),
    prompt_len: int = typer.Option(256),
    gen_len: int = typer.Option(2048),
    lengths: str = typer.Option("full", help="completion lengths: full | uniform:LO-HI | lognormal:MEAN"),
    micro_batch: int = typer.Option(None, help="sequences per forward/backward (default: one group)"),
    gradient_checkpointing: str = typer.Option("auto", help="auto | on | off"),
    lora_rank: int = typer.Option(16),
    steps: int = typer.Option(2, help="measured steps (after one warm-up)"),
    update_path: str = typer.Option("packed", help="comma-separated: packed (default) | reference (padded oracle)"),
    device: str = typer.Option(None, help="default: cuda when available"),
    profile: str = typer.Option(None, help="write a per-kernel profile of the last step here (a folder)"),
    gpu_mem: float = typer.Option(None, help="GiB: run as on a GPU this size (a process memory cap)"),
    out: str = typer.Option(None, help="write the numbers as JSON here"),
):
    """The trainer's whole RL step (rollout + AQN, rewards, advantages, update) on random weights, formats side by side."""
    from .bench_step import run_step_bench

    run_step_bench(
        model_config,
        tuple(q.strip() for q in quant.split(",") if q.strip()),
        prompts,
        group_size,
        prompt_len,
        gen_len,
        lengths,
        micro_batch,
        gradient_checkpointing,
        lora_rank,
        steps,
        out,
        tuple(p.strip() for p in update_path.split(",") if p.strip()),
        device,
        profile=profile,
        gpu_mem=gpu_mem,
    )


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(
    ctx: typer.Context,
    config: str = typer.Option(None, "--config", "-c", help="YAML config; the embedded default if omitted"),
    no_progress: bool = typer.Option(
        False, "--no-progress", help="one log line per step instead of a progress bar (the default without a terminal)"
    ),
):
    """Train LoRA with GRPO/DAPO/Dr.GRPO + AQN. Any setting can be overridden: --section.key value
    (e.g. --rollout.temperature 0.8), plus --max-steps N, --output-dir DIR and --resume. `qerl config`
    lists every key with its type, default and valid values. Ctrl-C (or SIGTERM) stops after the current
    step with a checkpoint; a second Ctrl-C quits at once. Under torchrun (`torchrun --nproc-per-node N -m qerl
    train ...`) the ranks train data-parallel and rank 0 alone prints, logs and writes."""
    import os
    import shlex
    import signal

    from .config import load_config
    from .distributed import shutdown, world_from_env
    from .trainer import Trainer

    cfg = load_config(config, ctx.args)
    world = world_from_env()
    source = (config or "the embedded default") + (" with overrides" if ctx.args else "")
    if world.is_main:
        m, d = cfg.model, cfg.data
        ranks = f"; {world.size} data-parallel ranks" if world.size > 1 else ""
        run = f"{m.name} ({m.quant}, LoRA r{m.lora_rank}), {cfg.algo.name} on {d.train}, held-out {d.eval} [{d.eval_split}]"
        print(f"qerl train: {source}: {run}; output in {cfg.train.output_dir}{ranks}", flush=True)
    try:
        summary = Trainer(cfg, progress=not no_progress).train()
    finally:
        shutdown()
    if not world.is_main:
        sys.exit(128 + summary["signal"] if "signal" in summary else 0)
    if "signal" in summary:
        again = ["qerl", "train", *(["-c", config] if config else []), *ctx.args]
        again += [] if cfg.train.resume else ["--resume"]
        nodes = ""
        if world.size > 1:  # the same launcher (any number of ranks can resume)
            local = os.environ.get("LOCAL_WORLD_SIZE", str(world.size))
            again = ["torchrun", "--nproc-per-node", local, "-m", *again]
            nodes = " (on every node, with your --nnodes and rendezvous options)" if int(local) < world.size else ""
        print(
            f"qerl train: stopped after step {summary['stopped_at']} ({signal.Signals(summary['signal']).name}), checkpoint in "
            f"{summary['checkpoint']}; continue with: {shlex.join(again)}{nodes}",
            file=sys.stderr,
        )
        sys.exit(128 + summary["signal"])
    print(
        f"qerl train: done. held-out accuracy {summary['eval_start']} -> {summary['eval_end']}; "
        f"summary in {cfg.train.output_dir}/summary.md"
    )


@app.command("eval")
def eval_cmd(
    model: str = typer.Option(
        None, "--model", "-m", help="default: the adapter's base (its run's, else its PEFT config's), else SmolLM2"
    ),
    quant: str = typer.Option(None, "--quant", help="default: the format the adapter was trained on, else nvfp4"),
    adapter: str = typer.Option(None, "--adapter", help="PEFT adapter directory to apply"),
    compare_base: bool = typer.Option(
        False, "--compare-base", help="also score the base (adapter disabled) under the same settings; print the delta"
    ),
    dataset: str = typer.Option("arithmetic:1", "--dataset", "-d"),
    split: str = typer.Option("test", "--split"),
    limit: int = typer.Option(None, "--limit"),
    samples: int = typer.Option(1, "--samples", "-k"),
    temperature: float = typer.Option(0.0, "--temperature"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens"),
    system_prompt: str = typer.Option(None, "--system-prompt", help="default: the adapter's training run's"),
    suffix: str = typer.Option(None, "--suffix", help="default: the adapter's training run's"),
    question_key: str = typer.Option(None, "--question-key"),
    answer_key: str = typer.Option(None, "--answer-key"),
    output: str = typer.Option(
        None, "--output", "-o", help="per-example jsonl (default: the adapter's run's eval/, else ./eval/)"
    ),
    device: str = typer.Option(None, "--device"),
    seed: int = typer.Option(0, "--seed"),
):
    """pass@1 (averaged over k samples) and maj@k, with a per-example jsonl; --compare-base: base vs adapter."""
    from .data import load_records
    from .errors import QerlError
    from .evaluate import EvalSettings, adapter_base, compare_with_base, default_output, evaluate, run_settings
    from .loading import load_model
    from .lora import load_adapter
    from .rollout import make_engine

    if compare_base and not adapter:
        raise QerlError("--compare-base compares an adapter with its base: pass --adapter DIR")
    if limit is not None and limit < 1:
        raise QerlError(f"--limit must be >= 1 (or left out: every record), got {limit}")
    if adapter and (Path(adapter) / "adapter" / "adapter_config.json").is_file():
        adapter = str(Path(adapter) / "adapter")  # a checkpoint directory: its adapter
    # An adapter from a qerl run is evaluated on its run's base, with the prompt, sampling filters and answer
    # extraction it was trained with (the base too, with --compare-base); the options given win.
    run, source = {}, None
    if adapter:
        run = adapter_base(adapter)  # also checks the directory, before anything loads
        settings, source = run_settings(adapter)
        run.update({k: v for k, v in settings.items() if v is not None})
    model = model or run.get("model") or "smollm2-135m-instruct"
    quant = quant or run.get("quant") or "nvfp4"
    if system_prompt is None and suffix is None:
        system_prompt, suffix = run.get("system_prompt"), run.get("suffix")
    if source:
        print(f"base, prompt and sampling settings from {source} (options given win)")
    s = EvalSettings(
        samples=samples,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        system_prompt=system_prompt,
        suffix=suffix,
        seed=seed,
        **{k: run[k] for k in ("chat_template", "top_p", "top_k", "stop", "answer_order") if k in run},
    )
    records, report = load_records(dataset, split, question_key=question_key, answer_key=answer_key, limit=limit)
    print(report.summary())
    m, tok = load_model(model, quant=quant, lora_rank=0, device=device)
    if adapter:
        applied = load_adapter(m, adapter)
        print(f"adapter {adapter}: applied to {len(applied)} layers")
    out = Path(output).resolve() if output else default_output(adapter, dataset, split)
    extra = {"model": model, "quant": quant, "adapter": adapter, "dataset": dataset, "split": split, "limit": limit}
    print(
        f"settings: model={model} quant={quant} system_prompt={system_prompt!r} suffix={suffix!r} "
        f"temperature={temperature} samples={samples} limit={limit} max_new_tokens={max_new_tokens} seed={seed}"
    )
    engine = make_engine(m, tok)
    k = f"maj@{samples}"
    if compare_base:
        res = compare_with_base(engine, records, s, out, extra=extra)
        print(f"{dataset}/{split}: n={res['n']}, the same settings for both")
        for name in ("base", "adapter"):
            print(f"  {name:<8} pass@1={res[name]['pass@1']:.4f} {k}={res[name][k]:.4f}")
        print(f"  {'delta':<8} pass@1={res['delta']['pass@1']:+.4f} {k}={res['delta'][k]:+.4f}")
        print(
            f"results: {out.with_suffix('.compare.json')} (per example: {res['files']['base']}, {res['files']['adapter']})"
        )
        return
    res = evaluate(engine, records, s, out, extra=extra)
    print(f"{dataset}/{split}: n={res['n']} pass@1={res['pass@1']:.4f} {k}={res[k]:.4f} (adapter: {adapter or 'none'})")
    print(f"results: {out} (summary: {out.with_suffix('.summary.json')})")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def plan(
    ctx: typer.Context,
    config: str = typer.Option(None, "--config", "-c", help="YAML config (the embedded default if omitted)"),
    model_config: str = typer.Option(
        None,
        "--model-config",
        help="qwen2.5-7b | qwen2.5-14b | qwen2.5-32b (or their hub ids, offline) | a config.json or HF dir; "
        "default: the config's model",
    ),
    gpu_mem: float = typer.Option(None, "--gpu-mem", help="GB available; default: the visible GPU's memory"),
    prompt_len: int = typer.Option(512, "--prompt-len", help="longest prompt in tokens"),
    ranks: int = typer.Option(
        None, "--ranks", help="data-parallel ranks (torchrun's nodes x nproc-per-node); default: $WORLD_SIZE or 1"
    ),
):
    """Estimate GPU memory for a training run, component by component, before starting it (per rank
    with --ranks: each rank holds the whole quantized model and samples its share of the prompts)."""
    import torch

    from .config import load_config
    from .distributed import check_shares, world_from_env
    from .errors import QerlError
    from .modeling import ModelArgs
    from .plan import known_model, plan_memory, plan_model_args, rollout_shape

    cfg = load_config(config, ctx.args)
    ranks = world_from_env().size if ranks is None else ranks
    for name, value in (("--ranks", ranks), ("--prompt-len", prompt_len)):
        if value < 1:
            raise QerlError(f"{name} must be >= 1, got {value}")
    if gpu_mem is not None and not gpu_mem > 0:
        raise QerlError(f"--gpu-mem must be > 0 GB, got {gpu_mem:g}")
    check_shares(cfg.rollout.prompts_per_step, cfg.rollout.group_size, ranks)
    if model_config:
        args = plan_model_args(model_config)
    else:  # the run's own model: a known name or hub id offline, else what `qerl train` would load
        name = cfg.model.name
        args = ModelArgs.from_name(name if known_model(name) else _model_dir(name))
    if gpu_mem is not None:
        memory = f"{gpu_mem:g} GB (--gpu-mem)"
    elif torch.cuda.is_available():
        gpu_mem = torch.cuda.get_device_properties(0).total_memory / 1e9
        memory = f"{gpu_mem:.1f} GB, the visible GPU ({torch.cuda.get_device_name(0)})"
    else:
        memory = "unknown: no GPU visible and no --gpu-mem, so the estimate only (--gpu-mem GB checks the fit)"
    p = plan_memory(args, cfg, prompt_len=prompt_len, available_gb=gpu_mem, ranks=ranks)
    print(f"memory plan: {model_config or cfg.model.name}, {cfg.model.quant} + LoRA r={cfg.model.lora_rank}")
    print(rollout_shape(cfg, prompt_len, ranks))
    print(f"GPU memory: {memory}")
    print(p.table())
    if p.fits is False:
        sys.exit(1)


def _model_dir(name: str) -> str:
    from .loading import resolve

    path, gguf = resolve(name)
    if gguf:
        from .loading import gguf_to_hf_dir

        return str(gguf_to_hf_dir(path / gguf))
    return str(path)


@app.command()
def quantize(
    model: str = typer.Argument(..., help="HF directory, hub id or GGUF file (or a ModelOpt NVFP4 checkpoint)"),
    fmt: str = typer.Option("nvfp4", "--format", "-f", help="nvfp4 or mxfp4"),
    out: str = typer.Option(..., "--out", "-o", help="new output directory"),
):
    """Write a compressed-tensors checkpoint (what vLLM serves), streaming one layer group at a time."""
    from .export import quantize_checkpoint

    print(f"qerl quantize: {fmt} checkpoint in {quantize_checkpoint(model, out, fmt)}")


@app.command()
def export(
    adapter: str = typer.Option(None, "--adapter", "-a", help="PEFT adapter directory saved by qerl"),
    out: str = typer.Option(..., "--out", "-o", help="new output directory"),
    merge: str = typer.Option(None, "--merge", help="bf16, nvfp4 or mxfp4: fold the adapter into the weights"),
    model: str = typer.Option(
        None,
        "--model",
        "-m",
        help="base model (default: the adapter's base_model_name_or_path; --base-only alone: the embedded default)",
    ),
    base_only: bool = typer.Option(
        False,
        "--base-only",
        help="write only the full-precision base (bf16 safetensors + config + tokenizer) for transformers / PEFT",
    ),
):
    """Adapter + compressed-tensors base for vLLM LoRA serving, (--merge) one merged model, or (--base-only)
    the base model as a plain Hugging Face directory."""
    from .errors import QerlError
    from .export import export_adapter, export_base

    if base_only:
        if merge:
            raise QerlError("--base-only writes the base model without the adapter: drop --merge")
        d = export_base(out, model=model, adapter=adapter).resolve()
        print(
            f"qerl export: base model in {d}; with PEFT: "
            f"PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained('{d}'), '{adapter or 'ADAPTER_DIR'}')"
        )
        return
    if adapter is None:
        raise QerlError("--adapter is required (or --base-only to write the base model alone)")
    print(f"qerl export: {export_adapter(adapter, out, merge=merge, model=model)}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def config(
    ctx: typer.Context,
    config: str = typer.Option(None, "--config", "-c", help="YAML config; the embedded default if omitted"),
    markdown: bool = typer.Option(False, "--markdown", help="one Markdown table (docs/config.md is this)"),
):
    """List every config key with its type, its value (the embedded default, or the file's and the
    overrides'; an algorithm's key left none shows what the algorithm fills in), its valid values and what
    it does: what `qerl train` would run with."""
    from .config import describe, load_config

    print(describe(load_config(config, ctx.args), markdown=markdown))


@app.command()
def compare(
    experiment: str = typer.Argument(..., help="experiment YAML: configs (name -> overrides), seeds, shared overrides"),
    report_only: bool = typer.Option(
        False, "--report-only", help="rebuild the report from the finished runs, no training"
    ),
):
    """Train every configuration x seed of an experiment file (finished runs are skipped), then write the
    report (default docs/results.md): mean +- std over seeds per configuration and one PNG of reward and
    entropy curves per configuration. Per-run small files are kept beside it (docs/results/<config>/seed<N>/)."""
    from .compare import main as compare_main

    done = compare_main(experiment, report_only=report_only)
    if done.get("failed"):
        print(f"qerl compare: {len(done['failed'])} runs failed: {done['failed']}", file=sys.stderr)
        sys.exit(1)


def main():
    import logging
    import os

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # RL steps allocate tensors of new shapes every step (ragged completions, packed micro-batches): with the
    # caching allocator's fixed segments a ragged 7B step reserved the whole 80 GB card for a 52 GiB peak
    # (docs/training.md, "GPU memory"). Growable segments keep the reserve near the peak. A user's setting wins.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 alone reports (every rank exits)
    try:
        app()
    except KeyboardInterrupt:  # a second Ctrl-C during training, or one before it starts
        if main_rank:
            print("\nqerl: interrupted", file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError, KeyError) as e:  # QerlError is a ValueError
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if main_rank:
            print(f"qerl: error: {msg}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
