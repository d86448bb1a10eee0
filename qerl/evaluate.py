"""Evaluation through the same engine and the same live model as training.

The adapter is applied because there is only one model: `qerl eval --adapter DIR`
loads the PEFT adapter into the quantized model's LoRA modules and samples from it
(tests check that an adapter that changes outputs changes the score, and that the
score equals that of the adapter merged into the weights). Reports pass@1 averaged
over k samples and maj@k (majority vote over the extracted answers), writes one
JSON line per example and records every setting in the summary.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .data import Record, build_prompt
from .rewards import DEFAULT_ANSWER_ORDER, extract_answer, is_correct
from .rollout import Engine, SamplingParams


@dataclass
class EvalSettings:
    samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    system_prompt: str | None = None
    suffix: str | None = None
    chat_template: bool = True
    batch_prompts: int = 32
    seed: int = 0
    answer_order: tuple[str, ...] = DEFAULT_ANSWER_ORDER


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
        for i, rec in enumerate(chunk):
            texts = out.texts[i * settings.samples : (i + 1) * settings.samples]
            answers = [extract_answer(t, settings.answer_order) for t in texts]
            correct = [is_correct(t, rec.answer, order=settings.answer_order) for t in texts]
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


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    p = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True
    )
    p.start()
    return p, p.add_task("eval", total=total)
