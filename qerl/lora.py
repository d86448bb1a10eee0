"""LoRA on qerl's QuantLinear modules, saved and loaded in PEFT's format.

Keys follow PEFT exactly: `base_model.model.<module path>.lora_A.weight` ([r, K]) and
`...lora_B.weight` ([N, r]) in `adapter_model.safetensors`, with an
`adapter_config.json` that `peft.PeftModel.from_pretrained(bf16_base, dir)` accepts.
qerl's own facts (weight format, group size) go into `qerl_adapter.json` beside it,
never into a file name.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

from .errors import QerlError
from .modeling import FUSED_GROUPS
from .quant import QuantLinear

PEFT_PREFIX = "base_model.model."


def quant_linears(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def add_lora(
    model: nn.Module,
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    targets: tuple[str, ...] | None = None,
) -> list[nn.Parameter]:
    """Attach adapters to every QuantLinear (optionally only names ending in `targets`); freeze the rest."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for name, m in quant_linears(model).items():
        if targets and name.rsplit(".", 1)[-1] not in targets:
            continue
        m.add_lora(rank, alpha, dropout)
        params += [m.lora_A, m.lora_B]
    if not params:
        raise QerlError("no quantized Linear layers to attach LoRA to")
    model.lora_config = {"r": rank, "lora_alpha": alpha if alpha is not None else rank, "lora_dropout": dropout}
    return params


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in quant_linears(model).values() if m.lora_rank for p in (m.lora_A, m.lora_B)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in quant_linears(model).items():
        if m.lora_rank:
            out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.detach()
            out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.detach()
    return out


@contextlib.contextmanager
def adapter_disabled(model: nn.Module):
    """The base policy (reference for KL) without a second model in memory."""
    mods = [m for m in quant_linears(model).values() if m.lora_rank]
    for m in mods:
        m.lora_enabled = False
    try:
        yield model
    finally:
        for m in mods:
            m.lora_enabled = True


def save_adapter(model: nn.Module, out_dir: str | Path, base_model: str | None = None):
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(torch.float32).contiguous().cpu() for k, v in lora_state_dict(model).items()}
    if not state:
        raise QerlError("the model has no LoRA adapter to save")
    cfg = getattr(model, "lora_config", {})
    targets = sorted({k.split(".")[-3] for k in state})
    peft_cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        # resolvable by PEFT and transformers: `load_model` records it (`loading.resolvable_base`)
        "base_model_name_or_path": base_model or getattr(model, "base_model_id", getattr(model, "name_or_path", None)),
        "r": cfg.get("r"),
        "lora_alpha": cfg.get("lora_alpha"),
        "lora_dropout": cfg.get("lora_dropout", 0.0),
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
        "revision": None,
    }
    save_file(state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(peft_cfg, indent=2))
    (out / "qerl_adapter.json").write_text(json.dumps({"weight_format": getattr(model, "quant", None)}, indent=2))


def read_adapter_config(adapter_dir: str | Path) -> dict:
    """The adapter_config.json of a PEFT LoRA adapter directory, checked before any model loads: a one-line
    error for a directory that is no PEFT adapter, a config that does not read, has no valid rank or is not LoRA."""
    d = Path(adapter_dir)
    cfg_path = d / "adapter_config.json"
    if not cfg_path.is_file() or not (d / "adapter_model.safetensors").is_file():
        raise QerlError(f"{d}: not a PEFT adapter directory (needs adapter_config.json and adapter_model.safetensors)")
    try:
        cfg = json.loads(cfg_path.read_text())
        int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"]))
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # bad JSON, not a mapping, no or a bad r
        why = f"no LoRA rank {e}" if isinstance(e, KeyError) else str(e).splitlines()[0]
        raise QerlError(f"{cfg_path}: not a LoRA adapter config ({why})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise QerlError(f"{d}: adapter type {cfg.get('peft_type')} is not LoRA")
    return cfg


def adapter_weight_format(adapter_dir: str | Path) -> str | None:
    """The base weight format a qerl adapter was trained on (its qerl_adapter.json); None for other adapters."""
    meta = Path(adapter_dir) / "qerl_adapter.json"
    return json.loads(meta.read_text()).get("weight_format") if meta.is_file() else None


def load_adapter(model: nn.Module, adapter_dir: str | Path, strict: bool = True):
    """Load a PEFT LoRA adapter into the model, creating the LoRA modules if needed."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(adapter_dir)
    cfg, w_path = read_adapter_config(d), d / "adapter_model.safetensors"
    r, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"]))
    try:
        state = load_file(str(w_path))
    except (SafetensorError, OSError) as e:
        raise QerlError(f"{w_path}: cannot be read ({str(e).strip().splitlines()[0]})") from None
    mods = quant_linears(model)
    seen = set()
    for key, t in state.items():
        name = key.removeprefix(PEFT_PREFIX)
        mod_name, _, which = name.rpartition(".lora_")
        which = which.split(".")[0]  # "A" or "B" (PEFT may insert an adapter name before .weight)
        if mod_name not in mods:
            if strict:
                raise QerlError(f"{d}: adapter key {key} matches no quantized Linear of this model")
            continue
        m = mods[mod_name]
        if m.lora_rank != r:
            m.add_lora(r, alpha, cfg.get("lora_dropout", 0.0))
        m.lora_scaling = alpha / r
        target = m.lora_A if which == "A" else m.lora_B
        if target.shape != t.shape:
            raise QerlError(f"{d}: {key} has shape {tuple(t.shape)}, the model expects {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(t.to(target.dtype))
        seen.add(mod_name)
    model.lora_config = {"r": r, "lora_alpha": alpha, "lora_dropout": cfg.get("lora_dropout", 0.0)}
    return sorted(seen)


@torch.no_grad()
def merge_lora(model: nn.Module, quant: str | None = None):
    """Fold each adapter into its base: dequantize, add (alpha/r) B A in fp32, re-quantize once.

    `quant` picks the merged format (default: each layer's own). Fused groups (q/k/v,
    gate/up) are re-quantized together so they share one NVFP4 global scale, as vLLM needs.
    """
    from .checkpoint import quantize_group
    from .quant import get_format

    group_of = {leaf: g for g in FUSED_GROUPS for leaf in g}
    groups: dict[tuple[str, tuple], list[tuple[str, QuantLinear]]] = {}
    for name, m in quant_linears(model).items():
        if m.lora_rank:
            parent, leaf = name.rsplit(".", 1)
            groups.setdefault((parent, group_of.get(leaf, (leaf,))), []).append((name, m))
    for members in groups.values():
        fmt = get_format(quant or members[0][1].format.name)
        weights = [m.dequantized(torch.float32) + m.lora_delta().float() for _, m in members]
        for (_name, m), w, q in zip(members, weights, quantize_group([n for n, _ in members], weights, fmt)):
            for n in ("weight_packed", "weight_scale", "weight_global_scale", "weight"):
                m._buffers.pop(n, None)
            m.format = fmt if q is not None else get_format("bf16")
            m.load_quantized(q if q is not None else m.format.quantize(w))
            m.lora_rank, m.lora_A, m.lora_B = 0, None, None
