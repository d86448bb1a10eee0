"""Quantized checkpoints on disk: compressed-tensors (the format vLLM serves) and ModelOpt NVFP4.

Reading. `detect_quantized(dir)` says what a checkpoint stores; `read_quantized` returns one
Linear's stored tensors under qerl's names (which are compressed-tensors' names), so that
`QuantLinear.load_quantized` adopts the packed bytes as they are, with no re-quantization.
  - compressed-tensors (`quant_method: compressed-tensors`, status `compressed`), weights FP4
    E2M1 and symmetric: group size 16 with FP8 scales and a global scale (`nvfp4-pack-quantized`),
    or group size 32 with E8M0 scales (`mxfp4-pack-quantized`). One weight format per checkpoint.
  - ModelOpt NVFP4 (`hf_quant_config.json`, or `quant_method: modelopt` in config.json): the same
    packed bytes under `weight` (uint8) and the same FP8 `weight_scale`; its `weight_scale_2` is
    amax / 2688, the reciprocal of compressed-tensors' global scale. qerl takes
    `weight_global_scale = 1 / weight_scale_2` in fp32, exactly as compressed-tensors' own
    ModelOpt converter does (and so as vLLM serves the converted checkpoint). 1 / (1 / x) can be
    one ulp off x, so the weights match ModelOpt's `e2m1 * scale * weight_scale_2` to about one
    ulp (2^-23 relative), not bit for bit.
  - Linear layers a checkpoint keeps in full precision (its `ignore` / `exclude_modules`) stay
    unquantized in qerl too (format bf16); a Linear qerl keeps in full precision (lm_head) that
    the checkpoint quantized is dequantized on load.
  - Activation and KV-cache scales of W4A4 checkpoints (`input_global_scale`, `input_scale`,
    `k_scale`, `v_scale`) are ignored: qerl computes with unquantized activations (W4A16), so a
    W4A4 checkpoint runs in qerl as its weight-only variant.
  Not supported (a one-line QerlError): other compressed-tensors formats (int4/int8
  pack-quantized, FP8, sparse), asymmetric or mixed-format schemes, and ModelOpt algorithms other
  than NVFP4 (FP8, NVFP4_AWQ with its pre-quant scales, mixed precision).

Writing. `quantize_group` is the one per-group quantization rule, shared with the loader: NVFP4
members of a fused group (q/k/v, gate/up) share the minimum of their global scales, as
llm-compressor does, because vLLM fuses them into one GEMM with one tensor scale.
`ShardedWriter` streams tensors into safetensors shards plus the index, and
`ct_quantization_config` is the config.json entry of `docs/formats.md` section 1 (weight-only
"NVFP4A16" / "MXFP4A16").
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import QerlError
from .quant import WeightFormat
from .quant.nvfp4 import nvfp4_global_scale

log = logging.getLogger(__name__)

# The compressed-tensors format name of each qerl format it can store.
CT_FORMATS = {"nvfp4": "nvfp4-pack-quantized", "mxfp4": "mxfp4-pack-quantized"}
_CT_WEIGHTS = {
    "nvfp4": {
        "num_bits": 4,
        "type": "float",
        "strategy": "tensor_group",
        "group_size": 16,
        "symmetric": True,
        "dynamic": False,
        "scale_dtype": "float8_e4m3fn",
    },
    "mxfp4": {
        "num_bits": 4,
        "type": "float",
        "strategy": "group",
        "group_size": 32,
        "symmetric": True,
        "dynamic": False,
        "scale_dtype": "uint8",
    },
}
# Per-Linear tensors qerl stores, by format; the first is the one whose presence marks the
# Linear as quantized (compressed-tensors' convention).
_CT_TENSORS = {
    "nvfp4": ("weight_packed", "weight_scale", "weight_global_scale"),
    "mxfp4": ("weight_packed", "weight_scale"),
}
_SCALE_DTYPE = {"nvfp4": torch.float8_e4m3fn, "mxfp4": torch.uint8}
# Activation / KV-cache scales of W4A4 checkpoints: qerl runs activations unquantized.
ACTIVATION_SCALES = ("input_global_scale", "input_scale", "k_scale", "v_scale", "output_scale")
WEIGHT_QPARAMS = ("weight_packed", "weight_scale", "weight_global_scale", "weight_scale_2", "weight_zero_point")
DEFAULT_SHARD_BYTES = 5 * 10**9  # Hugging Face's default shard size
# Files copied beside the weights: tokenizer and generation settings.
SIDE_FILES = (
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.model",
    "chat_template*",
)


@dataclass(frozen=True)
class QuantizedCheckpoint:
    method: str  # "compressed-tensors" or "modelopt"
    format: str  # qerl's format name: "nvfp4" or "mxfp4"


# --- reading --------------------------------------------------------------------------
def _ct_format(qc: dict, where: str) -> str:
    if qc.get("quantization_status", "compressed") != "compressed":
        raise QerlError(
            f"{where}: compressed-tensors status '{qc.get('quantization_status')}' is not supported "
            "(qerl reads packed checkpoints, status 'compressed')"
        )
    found = set()
    for name, group in (qc.get("config_groups") or {}).items():
        w = group.get("weights") or {}
        if w.get("num_bits") != 4 or w.get("type") != "float" or not w.get("symmetric", True):
            raise QerlError(
                f"{where}: compressed-tensors group '{name}' ({group.get('format') or qc.get('format')}) "
                "is not FP4; qerl reads nvfp4-pack-quantized and mxfp4-pack-quantized"
            )
        found.add({16: "nvfp4", 32: "mxfp4"}.get(w.get("group_size"), f"fp4 with group size {w.get('group_size')}"))
    if len(found) != 1 or not found <= set(CT_FORMATS):
        raise QerlError(
            f"{where}: weight formats {sorted(found) or 'none'} are not supported; qerl reads "
            "checkpoints with one format, nvfp4-pack-quantized or mxfp4-pack-quantized"
        )
    return found.pop()


def detect_quantized(path: str | Path) -> QuantizedCheckpoint | None:
    """What a checkpoint directory stores: None for full precision, else method and format."""
    path = Path(path)
    cfg_file, modelopt_file = path / "config.json", path / "hf_quant_config.json"
    qc = json.loads(cfg_file.read_text()).get("quantization_config") if cfg_file.exists() else None
    if qc is None and modelopt_file.exists():
        qc = json.loads(modelopt_file.read_text())
    if not qc:
        return None
    method = str(qc.get("quant_method", "")).lower().replace("_", "-")
    if method == "compressed-tensors":
        return QuantizedCheckpoint("compressed-tensors", _ct_format(qc, str(path)))
    # ModelOpt writes either {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": ...}}
    # (hf_quant_config.json) or a flat {"quant_method": "modelopt", "quant_algo": ...}.
    if method.startswith("modelopt") or (qc.get("producer") or {}).get("name") == "modelopt":
        algo = qc.get("quant_algo") or (qc.get("quantization") or {}).get("quant_algo")
        if str(algo).upper() != "NVFP4":
            raise QerlError(f"{path}: ModelOpt quantization '{algo}' is not supported; qerl reads ModelOpt NVFP4")
        return QuantizedCheckpoint("modelopt", "nvfp4")
    raise QerlError(
        f"{path}: quantization method '{qc.get('quant_method')}' is not supported; qerl reads "
        "compressed-tensors NVFP4/MXFP4 and ModelOpt NVFP4 checkpoints (or full-precision ones)"
    )


def read_quantized(source, module: str, ckpt: QuantizedCheckpoint, shape: tuple[int, int]) -> dict | None:
    """The stored tensors of Linear `module` ([N, K] = `shape`) under qerl's names, or None
    where the checkpoint keeps it in full precision. `source` has `keys()` and `get(name)`."""
    keys = source.keys()
    if ckpt.method == "modelopt":
        if f"{module}.weight" not in keys or f"{module}.weight_scale_2" not in keys:
            return None
        # An excluded (full-precision) module has a float `weight` and no `weight_scale_2`.
        t = {"weight_packed": source.get(f"{module}.weight"), "weight_scale": source.get(f"{module}.weight_scale")}
        # Reciprocal in fp32, as compressed-tensors' ModelOpt converter computes it.
        t["weight_global_scale"] = (1 / source.get(f"{module}.weight_scale_2").float()).reshape(1)
    else:
        names = _CT_TENSORS[ckpt.format]
        if f"{module}.{names[0]}" not in keys:
            return None
        absent = [n for n in names if f"{module}.{n}" not in keys]
        if absent:
            raise QerlError(f"checkpoint lacks {module}.{absent[0]}")
        t = {n: source.get(f"{module}.{n}") for n in names}
        if "weight_global_scale" in t:
            t["weight_global_scale"] = t["weight_global_scale"].float().reshape(1)
    n, k = shape
    block = _CT_WEIGHTS[ckpt.format]["group_size"]
    want = {"weight_packed": ((n, k // 2), torch.uint8), "weight_scale": ((n, k // block), _SCALE_DTYPE[ckpt.format])}
    for name, (s, dtype) in want.items():
        if tuple(t[name].shape) != s or t[name].dtype != dtype:
            raise QerlError(
                f"{module}.{name}: stored {tuple(t[name].shape)} {t[name].dtype}, "
                f"expected {s} {dtype} for a [{n}, {k}] {ckpt.format} Linear"
            )
    return t


# --- quantizing -----------------------------------------------------------------------
def quantize_group(names: list[str], weights: list[torch.Tensor], fmt: WeightFormat) -> list[dict | None]:
    """Quantize the members of one fused group (q/k/v, gate/up, or a lone Linear) -> each
    member's stored tensors. A member whose K is not a multiple of the format's block size is
    left in full precision: its entry is None and the caller keeps its weight."""
    ok = [w.shape[1] % fmt.block_size == 0 for w in weights]
    for name, w, good in zip(names, weights, ok):
        if not good:
            log.warning(
                "%s: K=%d is not divisible by the %s block size %d; kept unquantized",
                name,
                w.shape[1],
                fmt.name,
                fmt.block_size,
            )
    kwargs = {}
    if fmt.fused_global_scale and any(ok):
        kwargs["global_scale"] = min((nvfp4_global_scale(w) for w, good in zip(weights, ok) if good), key=float)
    return [fmt.quantize(w, **kwargs) if good else None for w, good in zip(weights, ok)]


# --- writing --------------------------------------------------------------------------
def ct_quantization_config(fmt: str, ignore: list[str]) -> dict:
    """config.json's `quantization_config` of a weight-only compressed-tensors checkpoint."""
    if fmt not in CT_FORMATS:
        raise QerlError(f"compressed-tensors stores nvfp4 or mxfp4, not '{fmt}'")
    return {
        "quant_method": "compressed-tensors",
        "format": CT_FORMATS[fmt],
        "quantization_status": "compressed",
        "ignore": ignore,
        "kv_cache_scheme": None,
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "format": CT_FORMATS[fmt],
                "input_activations": None,
                "output_activations": None,
                "weights": dict(_CT_WEIGHTS[fmt]),
            }
        },
    }


def write_config(src_dir: Path, out_dir: Path, quantization_config: dict | None, dtype: torch.dtype):
    """config.json of `src_dir` with its quantization replaced (or removed when None) and `dtype` declared
    under both names (`dtype` for transformers >= 4.56, `torch_dtype` for older readers and vLLM), so
    that `from_pretrained(dir)` with no arguments computes in the dtype the tensors are stored in."""
    cfg = json.loads((Path(src_dir) / "config.json").read_text())
    cfg.pop("quantization_config", None)
    if quantization_config is not None:
        cfg["quantization_config"] = quantization_config
    cfg["dtype"] = cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    (Path(out_dir) / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))


def copy_side_files(src_dir: Path, out_dir: Path):
    """Tokenizer files and generation config, copied as they are."""
    for pattern in SIDE_FILES:
        for f in Path(src_dir).glob(pattern):
            if f.is_file():
                shutil.copy2(f, Path(out_dir) / f.name)


def compute_dtype(src_dir: Path) -> torch.dtype:
    """The dtype a written checkpoint computes in: the source's declared fp16 or bf16, else bf16
    (a source that declares fp32 or nothing, such as a converted GGUF, is served in bf16)."""
    cfg = json.loads((Path(src_dir) / "config.json").read_text())
    name = str(cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16")
    return torch.float16 if name == "float16" else torch.bfloat16


def to_compute_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A full-precision tensor (fp16 / bf16 / fp32 / fp64) in `dtype`; packed bytes, FP8 scales, ints as they are."""
    return t.to(dtype) if t.is_floating_point() and t.element_size() >= 2 else t


def prepare_out_dir(out: str | Path) -> Path:
    """Create `out`; refuse a non-empty one, so stale shards never mix with new ones."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise QerlError(f"{out} exists and is not an empty directory; pass a new output directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


class ShardedWriter:
    """Streams tensors into `model-0000i-of-0000n.safetensors` shards of at most `max_shard_bytes`
    and writes `model.safetensors.index.json`. Only the shard being filled is held in memory.

    Shards are written under temporary names and renamed in `close()`, once n is known.
    """

    def __init__(self, out_dir: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.out, self.max_bytes = Path(out_dir), max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._names: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor):
        if name in self._names:
            raise ValueError(f"tensor {name} written twice")
        self._names.add(name)
        # A copy: fused members share one global-scale tensor, and safetensors refuses shared storage.
        t = tensor.detach().to("cpu", copy=True).contiguous()
        nbytes = t.numel() * t.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_bytes:
            self._flush()
        self._pending[name] = t
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self):
        from safetensors.torch import save_file

        tmp = self.out / f".shard-{len(self._shards):05d}.tmp"
        save_file(self._pending, str(tmp), metadata={"format": "pt"})
        self._shards.append((tmp, sorted(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self):
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        weight_map = {}
        for i, (tmp, names) in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(tmp, self.out / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
