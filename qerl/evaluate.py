"""Evaluation through the same engine and the same live model as training.

The adapter is applied because there is only one model: `qerl eval --adapter DIR`
loads the PEFT adapter into the quantized model's LoRA modules and samples from it
(tests check that an adapter that changes outputs changes the score, and that the
score equals that of the adapter merged into the weights). Reports pass@1 averaged
over k samples and maj@k (majority vote over the extracted answers), writes one
JSON line per example and records every setting in the summary.

`compare_with_base` is the fair comparison (`qerl eval --adapter DIR --compare-base`): the base
and the adapter scored under the same settings (prompt suffix, system prompt, sampling,
seed, records) with one model in memory, the base pass with the adapter disabled.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .data import Record, build_prompt
from .errors import QerlError
from .lora import adapter_disabled, adapter_weight_format, read_adapter_config
from .rewards import DEFAULT_ANSWER_ORDER, extract_answer, score_batch
from .rollout import Engine, SamplingParams


@dataclass
class EvalSettings:
    samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    max_new_tokens: int = 256
    system_prompt: str | None = None
    suffix: str | None = None
    chat_template: bool = True
    batch_prompts: int = 32
    seed: int = 0
    answer_order: tuple[str, ...] = DEFAULT_ANSWER_ORDER

    def __post_init__(self):
        for name, ok, what in (
            ("samples", self.samples >= 1, ">= 1"),
            ("temperature", self.temperature >= 0, ">= 0 (0: greedy)"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", self.top_k >= 0, ">= 0"),
            ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
        ):
            if not ok:
                raise QerlError(f"eval: {name} must be {what}, got {getattr(self, name)}")


def evaluate(
    engine: Engine,
    records: list[Record],
    settings: EvalSettings,
    out_path: str | Path | None = None,
    progress: bool = True,
    extra: dict | None = None,
) -> dict:
    tok = engine.tokenizer
    gen = torch.Generator(engine.model.device)
    gen.manual_seed(settings.seed)
    params = SamplingParams(
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
        stop=tuple(settings.stop),
        max_new_tokens=settings.max_new_tokens,
        n=settings.samples,
    )
    rows, pass1, maj = [], [], []
    bar = _progress(progress, len(records))
    for start in range(0, len(records), settings.batch_prompts):
        chunk = records[start : start + settings.batch_prompts]
        prompts = [
            build_prompt(
                tok,
                r.question,
                system_prompt=settings.system_prompt,
                suffix=settings.suffix,
                chat_template=settings.chat_template,
            )
            for r in chunk
        ]
        out = engine.generate(prompts, params, generator=gen)
        golds = [r.answer for r in chunk for _ in range(settings.samples)]
        verdicts = score_batch(out.texts, golds, order=settings.answer_order)  # math-verify in parallel
        for i, rec in enumerate(chunk):
            texts = out.texts[i * settings.samples : (i + 1) * settings.samples]
            answers = [extract_answer(t, settings.answer_order) for t in texts]
            correct = verdicts[i * settings.samples : (i + 1) * settings.samples]
            votes = Counter(a.strip() for a in answers if a)
            top = votes.most_common(1)[0][0] if votes else None
            maj_ok = top is not None and any(c for a, c in zip(answers, correct) if a and a.strip() == top)
            pass1.append(sum(correct) / len(correct))
            maj.append(float(maj_ok))
            rows.append(
                {
                    "prompt": prompts[i],
                    "question": rec.question,
                    "gold": rec.answer,
                    "completions": texts,
                    "extracted": answers,
                    "correct": correct,
                    "majority": top,
                    "majority_correct": maj_ok,
                }
            )
        if bar:
            bar[0].update(bar[1], advance=len(chunk), description=f"eval pass@1 {sum(pass1) / len(pass1):.3f}")
    if bar:
        bar[0].stop()
    n = max(len(records), 1)
    summary = {
        "n": len(records),
        "pass@1": sum(pass1) / n,
        f"maj@{settings.samples}": sum(maj) / n,
        "settings": asdict(settings),
        **(extra or {}),
    }
    if out_path is not None:
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with out_path.open("w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        out_path.with_suffix(".summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def run_dir_of(adapter: str | Path) -> Path | None:
    """The qerl run directory that an adapter belongs to (`RUN/adapter` or `RUN/checkpoints/step-N/adapter`,
    RUN holding the run's config.json), or None for an adapter from elsewhere."""
    adapter = Path(adapter).resolve()
    for run in (adapter.parent, adapter.parent.parent.parent):
        if (run / "config.json").is_file() and (adapter.parent == run or adapter.parent.parent.name == "checkpoints"):
            return run
    return None


def run_settings(adapter: str | Path) -> tuple[dict, Path | None]:
    """What `qerl eval` reuses of the run that trained `adapter`, and the config.json it came from: the base
    (model, quant), the prompt (system_prompt, suffix, chat_template), the sampling filters (top_p, top_k,
    stop) and the answer extraction order. ({}, None) for an adapter from elsewhere."""
    run = run_dir_of(adapter)
    if run is None:
        return {}, None
    cfg = json.loads((run / "config.json").read_text())
    model, data, rollout = cfg.get("model", {}), cfg.get("data", {}), cfg.get("rollout", {})
    out = {
        "model": model.get("name"),
        "quant": model.get("quant"),
        "system_prompt": data.get("system_prompt"),
        "suffix": data.get("suffix"),
        "chat_template": data.get("chat_template", True),
        "top_p": rollout.get("top_p", 1.0),
        "top_k": rollout.get("top_k", 0),
        "stop": tuple(rollout.get("stop") or ()),
        "answer_order": tuple(cfg.get("reward", {}).get("answer_order") or DEFAULT_ANSWER_ORDER),
    }
    return out, run / "config.json"


def adapter_base(adapter: str | Path) -> dict:
    """The base model and weight format an adapter from elsewhere names (its adapter_config.json's
    base_model_name_or_path, qerl_adapter.json's weight_format), as far as it names them; a one-line error
    when `adapter` is not a PEFT adapter directory, before any model loads."""
    out = {
        "model": read_adapter_config(adapter).get("base_model_name_or_path"),
        "quant": adapter_weight_format(adapter),
    }
    return {k: v for k, v in out.items() if v}


def default_output(adapter: str | Path | None, dataset: str, split: str) -> Path:
    """Where `qerl eval` writes when no --output is given: the adapter's run's eval/ folder, else ./eval/."""
    name = Path(dataset).stem if Path(dataset).exists() else dataset
    slug = re.sub(r"[^A-Za-z0-9._]+", "-", f"{name}-{split}").strip("-")
    run = run_dir_of(adapter) if adapter else None
    return (run / "eval" if run else Path("eval")).resolve() / f"qerl-eval-{slug}.jsonl"


def _scores(summary: dict, samples: int) -> dict:
    return {"pass@1": summary["pass@1"], f"maj@{samples}": summary[f"maj@{samples}"]}


def compare_with_base(
    engine: Engine,
    records: list[Record],
    settings: EvalSettings,
    out_path: str | Path,
    progress: bool = True,
    extra: dict | None = None,
) -> dict:
    """Score the base (adapter disabled) and the adapter on the same records under the same `settings`.

    Writes `<out>.base.jsonl` and `<out>.adapter.jsonl` (with their .summary.json) and `<out>.compare.json`
    (settings, both scores, the delta adapter - base); returns that comparison."""
    out_path = Path(out_path)
    files = {k: out_path.with_suffix(f".{k}{out_path.suffix or '.jsonl'}") for k in ("base", "adapter")}
    with adapter_disabled(engine.model):
        base = evaluate(engine, records, settings, files["base"], progress, {**(extra or {}), "pass": "base"})
    tuned = evaluate(engine, records, settings, files["adapter"], progress, {**(extra or {}), "pass": "adapter"})
    k = settings.samples
    result = {
        "n": base["n"],
        "settings": base["settings"],
        **(extra or {}),
        "base": _scores(base, k),
        "adapter": _scores(tuned, k),
        "delta": {m: tuned[m] - base[m] for m in _scores(base, k)},
        "files": {name: str(f) for name, f in files.items()},
    }
    out_path.with_suffix(".compare.json").write_text(json.dumps(result, indent=2))
    return result


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    p = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True
    )
    p.start()
    return p, p.add_task("eval", total=total)
