"""Resumable checkpoints: written atomically, verified on resume.

A checkpoint is a directory `checkpoints/step-N/` holding the adapter in PEFT format
(`adapter/`), `state.pt` (optimizer, LR scheduler, the RNG states of every rank, data position,
step, the trainable norm weights if any: tensors and plain values only, loaded with
`weights_only=True`) and `manifest.json` (the step, each file's size and SHA-256). It is
written under a temporary name (`.tmp-step-N-PID`) and renamed into place, then
`checkpoints/latest` is replaced atomically: a crash mid-write leaves the previous
checkpoints intact, and the partial directory is removed by the next save or resume.
A write that fails (a full disk) removes its partial directory and raises one line naming
the file and the space needed. `find_checkpoint` returns the newest checkpoint whose
manifest verifies, warning about each damaged one it skips.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import shutil
from pathlib import Path

import torch

from .errors import QerlError
from .lora import load_adapter, lora_state_dict, save_adapter

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _nbytes(obj) -> int:
    """Bytes of the tensors in a nested state (what writing it needs, to within its small metadata)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def remove_partial(run_dir: Path) -> list[Path]:
    """Delete what interrupted writes left in `checkpoints/` (`.tmp-step-*`, `.latest-*`)."""
    root = Path(run_dir) / "checkpoints"
    gone = [p for pattern in (".tmp-step-*", ".latest-*") for p in root.glob(pattern)]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return gone


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
    rng_states: list[dict] | None = None,
) -> Path:
    """`rng_states`: every rank's `rng_state`, in rank order (default: this process's, with `generator`)."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    remove_partial(run_dir)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_states or [rng_state(generator)],  # one per rank
        "extra": extra,
        "norms": {k: v.detach().cpu() for k, v in (norm_params or {}).items()},
    }
    writing = tmp / "adapter"
    try:
        save_adapter(model, writing)
        writing = tmp / "state.pt"
        torch.save(state, writing)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {
            "step": step,
            "files": {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files},
        }
        writing = tmp / MANIFEST
        writing.write_text(json.dumps(manifest, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        writing = root / "latest"
        latest_tmp = root / f".latest-{os.getpid()}"
        latest_tmp.write_text(json.dumps({"step": step, "path": final.name}))
        os.replace(latest_tmp, writing)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        remove_partial(run_dir)
        where = final / writing.relative_to(tmp) if writing.is_relative_to(tmp) else writing
        reason = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [type(e).__name__])[0]
        needed = _nbytes(state) + _nbytes(lora_state_dict(model))
        free = shutil.disk_usage(root).free
        raise QerlError(
            f"checkpoint: could not write {where} ({reason}); "
            f"{_size(free)} free on that disk, a checkpoint needs about {_size(needed)}"
        ) from None
    for _, p in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    return final


def _step_of(path: Path) -> int | None:
    name = path.name.removeprefix("step-")
    return int(name) if name.isdigit() else None


def checkpoint_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every `checkpoints/step-N/` in `run_dir`, oldest first."""
    root = Path(run_dir) / "checkpoints"
    return sorted((_step_of(p), p) for p in root.glob("step-*") if _step_of(p) is not None)


def verify(path: Path) -> str | None:
    """What is wrong with a checkpoint directory (None: every file matches its manifest)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return f"no {MANIFEST}"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} unreadable ({e})"
    if "state.pt" not in files:
        return f"{MANIFEST} lists no state.pt"
    for rel, want in files.items():
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != want["bytes"]:
            return f"{rel} has {f.stat().st_size} bytes, the manifest says {want['bytes']} (truncated?)"
        if _sha256(f) != want["sha256"]:
            return f"{rel} does not match its checksum"
    return None


def find_checkpoint(run_dir: Path) -> tuple[Path, int] | None:
    """(directory, step) of the newest intact checkpoint, `checkpoints/latest` first; damaged ones
    are skipped with a warning. None: no checkpoint at all. QerlError: checkpoints, none intact."""
    root = Path(run_dir) / "checkpoints"
    remove_partial(run_dir)
    candidates = [p for _, p in reversed(checkpoint_dirs(run_dir))]
    latest, problems = root / "latest", []
    if latest.exists():
        try:
            named = root / json.loads(latest.read_text())["path"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            problems.append(f"{latest} is unreadable ({type(e).__name__}: {e})")
        else:
            if named in candidates:
                candidates.remove(named)
                candidates.insert(0, named)
            else:
                problems.append(f"{latest} names {named.name}, which is missing")
    if not candidates:
        if problems:
            raise QerlError(f"--resume: no checkpoint in {root}: {'; '.join(problems)}")
        return None
    for ck in candidates:
        problem = verify(ck)
        if problem is None:
            for p in problems:
                log.warning("qerl: warning: %s; resuming from %s instead", p, ck)
            return ck, _step_of(ck)
        problems.append(f"{ck} is damaged: {problem}")
    raise QerlError(f"--resume: no intact checkpoint in {root} ({'; '.join(problems)})")


def load_checkpoint(
    path: Path,
    model,
    optimizer,
    scheduler,
    generator,
    norm_params: dict[str, torch.Tensor] | None = None,
    rank: int = 0,
) -> tuple[int, dict, bool]:
    """-> (step, extra, whether the RNG states of `rank` were in the checkpoint and are restored: a run
    resumed on more ranks than it was saved from has ranks that start fresh streams)."""
    if not (path / "state.pt").exists():
        raise QerlError(f"{path}: not a qerl checkpoint (no state.pt)")
    load_adapter(model, path / "adapter")
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (RuntimeError, OSError, KeyError, ValueError, pickle.UnpicklingError) as e:
        raise QerlError(f"{path / 'state.pt'}: cannot be loaded ({str(e).strip().splitlines()[0]})") from None
    rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]  # older checkpoints: one process
    if rank < len(rngs):
        set_rng_state(rngs[rank], generator)
    with torch.no_grad():
        for k, v in state.get("norms", {}).items():
            if norm_params and k in norm_params:
                norm_params[k].copy_(v)
    return state["step"], state["extra"], rank < len(rngs)
