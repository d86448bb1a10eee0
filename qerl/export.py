"""`qerl quantize` and `qerl export`: checkpoints that vLLM, PEFT and transformers load.

`quantize_checkpoint(model, out, fmt)` writes a compressed-tensors checkpoint (`docs/formats.md`,
section 1): per decoder Linear `weight_packed` / `weight_scale` (/ `weight_global_scale` for
NVFP4), every other tensor under its own name in the compute dtype (the source's bf16 or fp16; an
fp32 source, such as a converted GGUF, becomes bf16) and that dtype declared in config.json beside
`quantization_config`, so transformers + compressed-tensors load and `generate` with no extra arguments;
tokenizer and generation config copied. It streams: one fused group is read and
quantized at a time and only the shard being filled is held in memory. The quantizer and the
fused-group rule are the loader's (`qerl.checkpoint.quantize_group`), so loading the written
checkpoint gives bit for bit the model that `load_model(model, quant=fmt)` builds. A source that
is already quantized (compressed-tensors of the same format, ModelOpt NVFP4) is converted without
re-quantization; its activation / KV-cache scales are dropped (the output is weight-only).

`export_adapter(adapter, out, merge, model)`, for an adapter saved by `qerl.lora.save_adapter`:
  - merge None: `out/adapter` (the PEFT adapter, its `base_model_name_or_path` pointing at the
    base) and the quantized base the adapter was trained on: a pointer when the base already is a
    compressed-tensors checkpoint of the adapter's weight format, otherwise `out/base` written by
    `quantize_checkpoint`. Serve with
    `vllm serve <base> --enable-lora --lora-modules qerl=<out>/adapter`.
    An adapter trained on bf16 points at its full-precision base; nf4 has no vLLM format (merge).
  - merge "bf16": a plain HF model dir: per Linear, dequantized base + (alpha/r) B A summed in
    fp32 and rounded once to bf16; every other tensor in bf16.
  - merge "nvfp4" / "mxfp4": the same fp32 sums re-quantized (fused-group rule) into a
    compressed-tensors checkpoint; other tensors in the base's dtype. This rounds a second time:
    the result is close to, not equal to, base + LoRA.
The merges load the quantized model (small) and write one fused group at a time.

`export_base(out, model)` (`qerl export --base-only`): the full-precision base as a plain HF directory,
for PEFT users of the embedded default, whose GGUF no `base_model_name_or_path` resolves to offline.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from .checkpoint import (
    ACTIVATION_SCALES,
    CT_FORMATS,
    DEFAULT_SHARD_BYTES,
    WEIGHT_QPARAMS,
    ShardedWriter,
    compute_dtype,
    copy_side_files,
    ct_quantization_config,
    detect_quantized,
    prepare_out_dir,
    quantize_group,
    to_compute_dtype,
    write_config,
)
from .errors import QerlError
from .loading import DEFAULT_MODEL, SafetensorsSource, default_device, load_model, model_dir
from .lora import PEFT_PREFIX, adapter_weight_format, load_adapter, quant_linears, read_adapter_config
from .modeling import FUSED_GROUPS, CausalLM, ModelArgs, linear_path
from .quant import get_format

log = logging.getLogger(__name__)

MERGE_CHOICES = ("bf16",) + tuple(CT_FORMATS)


def _model_args(path: Path) -> ModelArgs:
    from transformers import AutoConfig

    try:
        return ModelArgs.from_hf(AutoConfig.from_pretrained(path))
    except ValueError as e:
        raise QerlError(f"{path}: {e}") from e


def _groups(args: ModelArgs):
    """Module paths of each fused group of decoder Linears, layer by layer."""
    for i in range(args.num_layers):
        for group in FUSED_GROUPS:
            yield [linear_path(i, n) for n in group]


def _linear_shapes(args: ModelArgs) -> dict[str, tuple[int, int]]:
    """[N, K] of every decoder Linear, read off a meta-device model."""
    with torch.device("meta"):
        model = CausalLM(args)
    return {p: tuple(model.get_submodule(p).weight.shape) for g in _groups(args) for p in g}


def _write_group(writer: ShardedWriter, paths, weights, fmt, ignore: list[str], keep_dtype: torch.dtype):
    """Quantize and write one fused group; members left unquantized go into `ignore`, in `keep_dtype`."""
    for path, w, t in zip(paths, weights, quantize_group(paths, weights, fmt)):
        if t is None:
            ignore.append(path)
            writer.add(f"{path}.weight", w.to(keep_dtype))
        else:
            for name, v in t.items():
                writer.add(f"{path}.{name}", v)


def quantize_checkpoint(
    model: str, out: str | Path, fmt: str = "nvfp4", device=None, max_shard_bytes: int = DEFAULT_SHARD_BYTES
) -> Path:
    """Write `model` (HF dir, hub id, GGUF, or a quantized checkpoint) as a compressed-tensors checkpoint."""
    if fmt not in CT_FORMATS:
        raise QerlError(f"format must be one of {', '.join(CT_FORMATS)} (the compressed-tensors formats), not '{fmt}'")
    src = model_dir(model)
    args = _model_args(src)
    source = SafetensorsSource(src)
    ckpt = source.checkpoint
    if ckpt and ckpt.format != fmt:
        raise QerlError(f"{model} is a {ckpt.method} {ckpt.format} checkpoint; qerl does not re-quantize it to {fmt}")
    device = torch.device(device) if device is not None else default_device()
    out = prepare_out_dir(out)
    writer = ShardedWriter(out, max_shard_bytes)
    shapes = _linear_shapes(args)
    keys = source.keys()
    dtype = compute_dtype(src)

    dropped = 0
    for key in keys:
        owner, _, leaf = key.rpartition(".")
        if leaf in ACTIVATION_SCALES:
            dropped += 1
        elif owner in shapes:
            continue  # decoder Linears are written group by group below
        elif ckpt and leaf in WEIGHT_QPARAMS:
            raise QerlError(
                f"{model}: {key} is quantized; qerl converts checkpoints whose quantized layers "
                "are the decoder Linears only"
            )
        else:
            writer.add(key, to_compute_dtype(source.get(key), dtype))  # same name, the compute dtype

    ignore = ["lm_head"]
    for paths in _groups(args):
        for p in paths:
            if f"{p}.bias" in keys:
                writer.add(f"{p}.bias", to_compute_dtype(source.get(f"{p}.bias"), dtype))
        if ckpt is None:
            weights = [source.get(f"{p}.weight").to(device) for p in paths]
            _write_group(writer, paths, weights, get_format(fmt), ignore, dtype)
            continue
        for p in paths:  # already quantized: the stored bytes as they are
            t = source.quantized(p, shapes[p])
            if t is None:
                ignore.append(p)
                writer.add(f"{p}.weight", to_compute_dtype(source.get(f"{p}.weight"), dtype))
            else:
                for name, v in t.items():
                    writer.add(f"{p}.{name}", v)
    writer.close()
    if dropped:
        log.info("dropped %d activation / KV-cache scales: the checkpoint written is weight-only", dropped)
    write_config(src, out, ct_quantization_config(fmt, ignore), dtype)
    copy_side_files(src, out)
    return out


def _adapter_format(adapter: Path, base_dir: Path) -> str:
    """The weight format the adapter was trained on (qerl_adapter.json; else the base's, else nvfp4)."""
    fmt = adapter_weight_format(adapter)
    if fmt is None:
        ckpt = detect_quantized(base_dir)
        fmt = ckpt.format if ckpt else "nvfp4"
    return fmt


def _check_adapter_fits(adapter: Path, source: SafetensorsSource, src: Path):
    """Every adapted module must be a Linear of the base, of the shape the adapter's A and B multiply (catches
    a wrong --model before anything is written)."""
    from safetensors import safe_open

    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        lora = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    modules = {k.removeprefix(PEFT_PREFIX).rpartition(".lora_")[0] for k in lora}
    keys = source.keys()
    stray = sorted(m for m in modules if f"{m}.weight" not in keys and f"{m}.weight_packed" not in keys)
    if stray:
        raise QerlError(f"{adapter}: adapter module {stray[0]} is not a Linear of the base model")
    shapes = _linear_shapes(_model_args(src))
    for key, shape in sorted(lora.items()):
        module, _, which = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        if module not in shapes or len(shape) != 2:
            continue
        n, k = shapes[module]
        if (which.startswith("A") and shape[1] != k) or (which.startswith("B") and shape[0] != n):
            raise QerlError(
                f"{adapter}: {key} has shape {shape}, which does not fit the base's {module} ({n} x {k}): "
                "pass the adapter's own base as --model"
            )


def _write_merged(model, args: ModelArgs, src: Path, out: Path, merge: str):
    """Write base + LoRA, one fused group at a time: bf16 HF weights or a compressed-tensors checkpoint."""
    other = torch.bfloat16 if merge == "bf16" else compute_dtype(src)
    writer = ShardedWriter(out)
    linears = quant_linears(model)
    for name, p in model.named_parameters():  # a tied lm_head appears once, as embed_tokens
        if name.rpartition(".")[0] not in linears:
            writer.add(name, p.to(other))
    ignore = ["lm_head"]
    for paths in _groups(args):
        mods = [linears[p] for p in paths]
        # Summed in fp32, rounded once (to bf16, or by the quantizer).
        merged = [m.dequantized(torch.float32) + (m.lora_delta().float() if m.lora_rank else 0) for m in mods]
        for p, m in zip(paths, mods):
            if m.bias is not None:
                writer.add(f"{p}.bias", m.bias.to(other))
        if merge == "bf16":
            for p, w in zip(paths, merged):
                writer.add(f"{p}.weight", w.to(torch.bfloat16))
        else:
            _write_group(writer, paths, merged, get_format(merge), ignore, other)
    writer.close()
    write_config(src, out, None if merge == "bf16" else ct_quantization_config(merge, ignore), other)


def _base_of(adapter: Path, peft_cfg: dict, model: str | None) -> str:
    base = model or peft_cfg.get("base_model_name_or_path")
    if not base:
        raise QerlError(f"{adapter}: the adapter does not name its base model; pass --model")
    return base


def export_base(out: str | Path, model: str | None = None, adapter: str | Path | None = None, device=None) -> Path:
    """The full-precision base as a plain HF directory (safetensors, config.json, tokenizer) that transformers
    and PEFT load: `model`, else the base `adapter` names, else the embedded default (the weights of the GGUF
    qerl ships, which `base_model_name_or_path` cannot name offline). Tensors in the compute dtype (bf16 for
    an fp32 source); a quantized source (compressed-tensors, ModelOpt) is dequantized. -> the directory."""
    if model is None and adapter is not None:
        model = _base_of(Path(adapter), read_adapter_config(adapter), None)
    model = model or DEFAULT_MODEL
    src = model_dir(model)
    source = SafetensorsSource(src)
    out = prepare_out_dir(out)
    if source.checkpoint is not None:  # dequantized by qerl's loader, written as a bf16 merge without LoRA
        m, _ = load_model(model, quant=source.checkpoint.format, lora_rank=0, device=device, dtype=torch.float32)
        _write_merged(m, m.args, src, out, "bf16")
    else:
        dtype = compute_dtype(src)
        writer = ShardedWriter(out)
        for key in source.keys():
            writer.add(key, to_compute_dtype(source.get(key), dtype))
        writer.close()
        write_config(src, out, None, dtype)
    copy_side_files(src, out)
    log.info("base %s as a Hugging Face directory: %s", model, out)
    return out


def export_adapter(
    adapter: str | Path, out: str | Path, merge: str | None = None, model: str | None = None, device=None
) -> Path:
    """Export a qerl (PEFT) adapter for serving; see the module docstring. -> the output directory."""
    adapter = Path(adapter)
    peft_cfg = read_adapter_config(adapter)
    if merge is not None and merge not in MERGE_CHOICES:
        raise QerlError(f"--merge must be one of {', '.join(MERGE_CHOICES)}, not '{merge}'")
    base = _base_of(adapter, peft_cfg, model)
    src = model_dir(base)
    trained = _adapter_format(adapter, src)
    _check_adapter_fits(adapter, SafetensorsSource(src), src)
    out = prepare_out_dir(out)

    if merge is not None:
        # fp32 compute dtype: full-precision tensors pass through exactly and the merge sums in fp32.
        m, _ = load_model(base, quant=trained, lora_rank=0, device=device, dtype=torch.float32)
        load_adapter(m, adapter)
        _write_merged(m, m.args, src, out, merge)
        copy_side_files(src, out)
        log.info("merged %s (%s base) into %s weights: %s", adapter, trained, merge, out)
        return out

    ckpt = detect_quantized(src)
    if trained == "bf16" or (ckpt and ckpt.method == "compressed-tensors" and ckpt.format == trained):
        base_ref = src.resolve()  # already servable as it is: point at it
    elif trained in CT_FORMATS:
        base_ref = quantize_checkpoint(base, out / "base", trained, device).resolve()
    else:
        raise QerlError(f"the adapter was trained on {trained} weights, which vLLM cannot serve; use --merge bf16")
    (out / "adapter").mkdir()
    for f in adapter.iterdir():
        if f.is_file() and f.name != "adapter_config.json":
            shutil.copy2(f, out / "adapter" / f.name)
    peft_cfg["base_model_name_or_path"] = str(base_ref)
    (out / "adapter" / "adapter_config.json").write_text(json.dumps(peft_cfg, indent=2))
    log.info("serve with: vllm serve %s --enable-lora --lora-modules qerl=%s", base_ref, (out / "adapter").resolve())
    return out
