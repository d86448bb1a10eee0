"""Resumable checkpoints, written atomically.

A checkpoint is a directory `checkpoints/step-N/` holding the adapter in PEFT format
(`adapter/`), the trainable norm weights if any, and `state.pt` (optimizer, LR
scheduler, RNG states, data position, step). It is written under a temporary name and
renamed into place, then `checkpoints/latest` is replaced atomically; a crash mid-write
leaves the previous latest checkpoint intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

from .errors import QerlError
from .lora import load_adapter, save_adapter


def rng_state(generator: torch.Generator | None) -> dict:
    return {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "generator": generator.get_state() if generator is not None else None,
    }


def set_rng_state(state: dict, generator: torch.Generator | None):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and state.get("generator") is not None:
        generator.set_state(state["generator"])


def save_checkpoint(
    run_dir: Path,
    step: int,
    model,
    optimizer,
    scheduler,
    generator,
    extra: dict,
    norm_params: dict[str, torch.Tensor] | None = None,
    keep: int = 2,
) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_adapter(model, tmp / "adapter")
    torch.save(
        {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(generator),
            "extra": extra,
            "norms": {k: v.detach().cpu() for k, v in (norm_params or {}).items()},
        },
        tmp / "state.pt",
    )
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = root / f".latest-{os.getpid()}"
    latest_tmp.write_text(json.dumps({"step": step, "path": final.name}))
    os.replace(latest_tmp, root / "latest")
    steps = sorted((int(p.name.split("-")[1]), p) for p in root.glob("step-*"))
    for _, p in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    f = Path(run_dir) / "checkpoints" / "latest"
    if not f.exists():
        return None
    p = f.parent / json.loads(f.read_text())["path"]
    return p if p.exists() else None


def load_checkpoint(
    path: Path, model, optimizer, scheduler, generator, norm_params: dict[str, torch.Tensor] | None = None
) -> tuple[int, dict]:
    if not (path / "state.pt").exists():
        raise QerlError(f"{path}: not a qerl checkpoint (no state.pt)")
    load_adapter(model, path / "adapter")
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"], generator)
    with torch.no_grad():
        for k, v in state.get("norms", {}).items():
            if norm_params and k in norm_params:
                norm_params[k].copy_(v)
    return state["step"], state["extra"]
