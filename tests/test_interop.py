"""Interoperability: compressed-tensors / ModelOpt checkpoints in and out, PEFT adapters, merged exports.

The other side of every check is the real library: compressed-tensors compresses a tiny model and
decompresses qerl's files, its ModelOpt converter defines the reciprocal global scale, PEFT loads
the exported adapter and transformers loads the merged model.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import char_tokenizer, hf_model, make_tiny_checkpoint, qerl_logits, rel_err

from qerl.checkpoint import detect_quantized, quantize_group
from qerl.errors import QerlError
from qerl.export import export_adapter, export_base, quantize_checkpoint
from qerl.loading import load_model
from qerl.lora import quant_linears, save_adapter
from qerl.quant import get_format, nvfp4_dequantize, nvfp4_quantize
from qerl.quant.e2m1 import e2m1_decode, unpack_nibbles

pytest.importorskip("compressed_tensors")
from safetensors.torch import load_file, save_file  # noqa: E402

IDS = torch.tensor([[5, 17, 40, 3, 77, 12, 9, 60], [2, 33, 33, 8, 91, 45, 20, 4]])


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bytes view, so FP8 tensors compare bit for bit (and -0 != +0)."""
    return t.contiguous().view(torch.uint8) if t.element_size() == 1 else t.contiguous().view(torch.int8)


def _assert_same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(_bits(a[k]), _bits(b[k])), k


def _read_dir(path) -> dict:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _ct_compress(src, out, fmt: str):
    """Compress `src` with compressed-tensors itself, calibrating as llm-compressor does
    (min-max weights; fused q/k/v and gate/up share the minimum NVFP4 global scale)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, apply_quantization_config
    from compressed_tensors.quantization.quant_scheme import MXFP4A16, NVFP4A16
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    model = hf_model(src)  # fp32: the bf16 checkpoint values exactly
    preset, group = {"nvfp4": (NVFP4A16, 16), "mxfp4": (MXFP4A16, 32)}[fmt]
    qc = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], **preset)}, ignore=["lm_head"]
    )
    apply_quantization_config(model, qc)
    with torch.no_grad():
        for layer in model.model.layers:
            for fused in (
                [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj],
                [layer.self_attn.o_proj],
                [layer.mlp.gate_proj, layer.mlp.up_proj],
                [layer.mlp.down_proj],
            ):
                gs = None
                if fmt == "nvfp4":
                    gs = min((generate_gparam(m.weight.amin(), m.weight.amax()) for m in fused), key=float)
                for m in fused:
                    blocks = m.weight.view(m.weight.shape[0], -1, group)
                    scale, _ = calculate_qparams(
                        blocks.amin(-1), blocks.amax(-1), m.quantization_scheme.weights, global_scale=gs
                    )
                    m.weight_scale.copy_(scale)
                    if gs is not None:
                        m.weight_global_scale.copy_(gs)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    with torch.no_grad():  # back to the checkpoint's bf16 for what stays unquantized
        for name, p in model.named_parameters():
            if p.dtype == torch.float32 and not name.endswith("global_scale"):
                p.data = p.data.to(torch.bfloat16)
    model.save_pretrained(out)
    compressor.update_config(out)
    char_tokenizer().save_pretrained(out)
    return out


def _ct_decompress(path) -> dict:
    from compressed_tensors.entrypoints.convert import CompressedTensorsDequantizer

    return CompressedTensorsDequantizer(path, dtype=torch.float32).process(_read_dir(path))


CASES = [("qwen2", "nvfp4"), ("qwen2", "mxfp4"), ("llama", "nvfp4")]


@pytest.fixture(scope="module")
def src_dirs(tmp_path_factory):
    """Own tiny checkpoints (the measured bounds below belong to these exact weights): qwen2 has
    q/k/v biases and an untied lm_head, llama ties lm_head to the embeddings."""
    root = tmp_path_factory.mktemp("interop-src")
    return {
        arch: make_tiny_checkpoint(root / arch, arch, seed=seed, std=0.05)
        for seed, arch in enumerate(("llama", "qwen2"))
    }


@pytest.fixture(scope="module")
def written(src_dirs, tmp_path_factory):
    """{(arch, fmt): (qerl-written dir, compressed-tensors-written dir)} of the same tiny model."""
    root = tmp_path_factory.mktemp("interop")
    out = {}
    for arch, fmt in CASES:
        src = src_dirs[arch]
        # A tiny shard limit so that the qwen2 NVFP4 checkpoint spans several shards + index.
        limit = 20_000 if (arch, fmt) == ("qwen2", "nvfp4") else 10**9
        ours = quantize_checkpoint(str(src), root / f"{arch}-{fmt}-qerl", fmt, device="cpu", max_shard_bytes=limit)
        out[arch, fmt] = ours, _ct_compress(src, root / f"{arch}-{fmt}-ct", fmt)
    return out


@pytest.mark.parametrize("arch, fmt", CASES)
def test_quantize_writes_what_compressed_tensors_writes(written, src_dirs, arch, fmt):
    ours, theirs = written[arch, fmt]
    # Every tensor (names, dtypes, bytes) equals compressed-tensors' own compression, fused scales
    # included; unquantized tensors are the source's, untouched (bf16).
    _assert_same_tensors(_read_dir(ours), _read_dir(theirs))
    src = _read_dir(src_dirs[arch])
    for k, v in _read_dir(ours).items():
        if not k.endswith(("weight_packed", "weight_scale", "weight_global_scale")):
            assert torch.equal(_bits(v), _bits(src[k])), k

    from compressed_tensors.quantization import QuantizationConfig

    qc = json.loads((ours / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)
    assert parsed.format == {"nvfp4": "nvfp4-pack-quantized", "mxfp4": "mxfp4-pack-quantized"}[fmt]
    assert parsed.ignore == ["lm_head"] and parsed.quantization_status == "compressed"
    w = parsed.config_groups["group_0"].weights
    assert (w.num_bits, w.type, w.group_size, w.symmetric) == (4, "float", 16 if fmt == "nvfp4" else 32, True)
    index = json.loads((ours / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(_read_dir(ours))
    if (arch, fmt) == ("qwen2", "nvfp4"):
        assert len(set(index["weight_map"].values())) > 1  # really sharded
    assert (ours / "tokenizer.json").exists() and (ours / "generation_config.json").exists()


@pytest.mark.parametrize("arch, fmt", CASES)
def test_quantized_checkpoints_load_as_stored(written, src_dirs, arch, fmt):
    """Both checkpoints load in qerl with their bytes untouched, equal to quantize-on-load, and
    compressed-tensors' decompression equals qerl's dequantization exactly."""
    ours, theirs = written[arch, fmt]
    on_load, _ = load_model(str(src_dirs[arch]), quant=fmt, lora_rank=0, device="cpu")
    ref = quant_linears(on_load)
    ct_dense = _ct_decompress(ours)
    for path in (ours, theirs):
        stored = _read_dir(path)
        model, _ = load_model(str(path), quant=fmt, lora_rank=0, device="cpu")
        mods = quant_linears(model)
        assert len(mods) == 14
        for name, m in mods.items():
            held = m.quantized_tensors()
            _assert_same_tensors(held, {k: stored[f"{name}.{k}"] for k in held})
            _assert_same_tensors(held, ref[name].quantized_tensors())
            # compressed-tensors decompresses NVFP4 through bf16 (its unpack dtype), MXFP4 in fp32.
            dtype = torch.bfloat16 if fmt == "nvfp4" else torch.float32
            assert torch.equal(m.dequantized(dtype).float(), ct_dense[f"{name}.weight"]), name
        assert torch.equal(qerl_logits(model, IDS), qerl_logits(on_load, IDS))


def _to_modelopt(ct_dir, out, layout: str):
    """A ModelOpt-style NVFP4 checkpoint holding the same bytes: `weight` (uint8), `weight_scale`,
    `weight_scale_2` = 1 / global scale (a 0-d fp32), plus W4A4 input scales qerl must ignore."""
    tensors = {}
    for k, v in _read_dir(ct_dir).items():
        module, _, leaf = k.rpartition(".")
        if leaf == "weight_packed":
            tensors[f"{module}.weight"] = v
            tensors[f"{module}.input_scale"] = torch.tensor(0.01)
        elif leaf == "weight_global_scale":
            tensors[f"{module}.weight_scale_2"] = (1 / v).reshape(())
        else:
            tensors[k] = v
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"))
    cfg = json.loads((ct_dir / "config.json").read_text())
    del cfg["quantization_config"]
    algo = {"quant_algo": "NVFP4", "group_size": 16, "exclude_modules": ["lm_head"]}
    if layout == "hf_quant_config":
        (out / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": "modelopt"}, "quantization": algo}))
    else:
        cfg["quantization_config"] = {"quant_method": "modelopt", **algo}
    (out / "config.json").write_text(json.dumps(cfg))
    char_tokenizer().save_pretrained(out)
    return out, tensors


def test_quantized_fp32_source_loads_and_generates_in_transformers_with_no_arguments(tmp_path):
    """An fp32 source that declares no dtype (what a converted GGUF is, e.g. the embedded default):
    the written checkpoint declares bf16 and stores its unquantized tensors in bf16, so plain
    `from_pretrained(dir)` + `generate` works (it raised a float/bf16 dtype mismatch before)."""
    from transformers import AutoModelForCausalLM

    src = tmp_path / "fp32"
    hf_model(make_tiny_checkpoint(tmp_path / "bf16", "llama", seed=3, std=0.05)).save_pretrained(src)
    char_tokenizer().save_pretrained(src)
    cfg = json.loads((src / "config.json").read_text())
    assert cfg.pop("dtype") == "float32"
    cfg.pop("torch_dtype", None)
    (src / "config.json").write_text(json.dumps(cfg))

    out = quantize_checkpoint(str(src), tmp_path / "q", "nvfp4", device="cpu")
    written_cfg = json.loads((out / "config.json").read_text())
    assert written_cfg["dtype"] == written_cfg["torch_dtype"] == "bfloat16"
    stored = _read_dir(out)
    assert stored["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert stored["model.norm.weight"].dtype == torch.bfloat16
    assert stored["model.layers.0.self_attn.q_proj.weight_global_scale"].dtype == torch.float32

    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.dtype == torch.bfloat16
    gen = hf.generate(IDS[:1], max_new_tokens=6, do_sample=False)
    assert gen.shape == (1, IDS.shape[1] + 6)
    # Same model as qerl's quantize-on-load (bf16 compute against fp32): measured 0.82% relative.
    with torch.no_grad():
        got = hf(IDS).logits.float()
    qerl_model, _ = load_model(str(src), quant="nvfp4", lora_rank=0, device="cpu")
    assert rel_err(got, qerl_logits(qerl_model, IDS)) < 0.02


@pytest.mark.parametrize("layout", ["hf_quant_config", "config_json"])
def test_modelopt_nvfp4_loads_to_the_same_weights(written, tmp_path, layout):
    from compressed_tensors.entrypoints.convert import ModelOptNvfp4Converter

    ct_dir = written["qwen2", "nvfp4"][0]
    mo_dir, mo = _to_modelopt(ct_dir, tmp_path / "modelopt", layout)
    assert detect_quantized(mo_dir).method == "modelopt"
    converted = ModelOptNvfp4Converter(ignore=["lm_head"]).process(dict(mo))
    ref = quant_linears(load_model(str(ct_dir), quant="nvfp4", lora_rank=0, device="cpu")[0])
    model, _ = load_model(str(mo_dir), quant="nvfp4", lora_rank=0, device="cpu")
    worst = 0.0
    for name, m in quant_linears(model).items():
        held = m.quantized_tensors()
        # Codes and block scales bit for bit; the global scale as compressed-tensors' converter computes it.
        _assert_same_tensors(
            {k: held[k] for k in ("weight_packed", "weight_scale")},
            {k: ref[name].quantized_tensors()[k] for k in ("weight_packed", "weight_scale")},
        )
        assert torch.equal(held["weight_global_scale"], converted[f"{name}.weight_global_scale"].reshape(1))
        # ModelOpt's own dequantization: e2m1 * block_scale * weight_scale_2.
        step = m.weight_scale.float() * mo[f"{name}.weight_scale_2"]  # [N, K/16]
        modelopt_w = e2m1_decode(unpack_nibbles(m.weight_packed)) * step.repeat_interleave(16, 1)
        w = m.dequantized(torch.float32)
        worst = max(
            worst,
            float(((w - modelopt_w).abs() / modelopt_w.abs().clamp(min=1e-30)).max()),
            float(((w - ref[name].dequantized(torch.float32)).abs() / w.abs().clamp(min=1e-30)).max()),
        )
    # 1 / (1 / gs) is gs to within an ulp: measured worst relative difference over the 14 Linears
    # 1.5e-7 (1.27 * 2^-23), against both ModelOpt's formula and the compressed-tensors original.
    assert worst <= 2**-22
    # `qerl quantize` converts it to compressed-tensors without touching the bytes.
    out = quantize_checkpoint(str(mo_dir), tmp_path / "converted", "nvfp4", device="cpu")
    got = _read_dir(out)
    assert not any(k.endswith("input_scale") for k in got)
    for name, m in quant_linears(model).items():
        _assert_same_tensors({k: got[f"{name}.{k}"] for k in m.quantized_tensors()}, m.quantized_tensors())


def test_format_mismatch_and_unsupported_are_one_line_errors(written, tmp_path):
    ct_dir = written["qwen2", "mxfp4"][0]
    with pytest.raises(QerlError, match="compressed-tensors mxfp4: load it with quant 'mxfp4'"):
        load_model(str(ct_dir), quant="nvfp4", lora_rank=0, device="cpu")
    with pytest.raises(QerlError, match="does not re-quantize"):
        quantize_checkpoint(str(ct_dir), tmp_path / "x", "nvfp4")
    with pytest.raises(QerlError, match="format must be one of nvfp4, mxfp4"):
        quantize_checkpoint(str(ct_dir), tmp_path / "y", "nf4")
    with pytest.raises(QerlError, match="not an empty directory"):
        quantize_checkpoint(str(ct_dir), ct_dir, "mxfp4")
    gptq = tmp_path / "gptq"
    shutil.copytree(ct_dir, gptq)
    cfg = json.loads((gptq / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (gptq / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QerlError, match="quantization method 'gptq' is not supported"):
        load_model(str(gptq), quant="nvfp4", lora_rank=0, device="cpu")


def test_layers_left_unquantized_round_trip(tmp_path):
    """hidden 48 is not a multiple of MXFP4's 32: q/k/v, o and gate/up stay full precision, listed
    in `ignore`; compressed-tensors and qerl both read them back as they were."""
    src = make_tiny_checkpoint(tmp_path / "odd", "qwen2", seed=3, std=0.05, hidden_size=48)
    out = quantize_checkpoint(str(src), tmp_path / "odd-mx", "mxfp4", device="cpu")
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    assert ignore[0] == "lm_head" and len(ignore) == 1 + 2 * 6  # all but down_proj (K = 128), 2 layers
    original, dense = _read_dir(src), _ct_decompress(out)
    model, _ = load_model(str(out), quant="mxfp4", lora_rank=0, device="cpu")
    for name, m in quant_linears(model).items():
        if name in ignore:
            assert m.format.name == "bf16"
            assert torch.equal(m.dequantized(torch.bfloat16), original[f"{name}.weight"])
        else:
            assert m.format.name == "mxfp4"
        assert torch.equal(m.dequantized(torch.float32), dense[f"{name}.weight"].float())


def test_quantized_lm_head_is_dequantized_on_load(written, tmp_path):
    """qerl keeps lm_head in full precision; a checkpoint that quantized it loads dequantized."""
    ct_dir = written["qwen2", "nvfp4"][0]
    path = tmp_path / "qhead"
    shutil.copytree(ct_dir, path)
    tensors = _read_dir(path)
    for f in path.glob("*.safetensors*"):
        f.unlink()
    head = nvfp4_quantize(tensors.pop("lm_head.weight").float())
    tensors.update({f"lm_head.{k}": v for k, v in head.items()})
    save_file(tensors, str(path / "model.safetensors"))
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"]["ignore"] = []
    (path / "config.json").write_text(json.dumps(cfg))
    model, _ = load_model(str(path), quant="nvfp4", lora_rank=0, device="cpu")
    assert torch.equal(model.lm_head.weight, nvfp4_dequantize(head, torch.float32))
    with pytest.raises(QerlError, match="lm_head.weight_.* is quantized"):
        quantize_checkpoint(str(path), tmp_path / "again", "nvfp4")


# --- adapters ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(src_dirs, tmp_path_factory):
    """A qwen2 NVFP4 model with a non-trivial rank-4 adapter, saved in PEFT format."""
    src = src_dirs["qwen2"]
    model, _ = load_model(str(src), quant="nvfp4", lora_rank=4, lora_alpha=8, device="cpu")
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in quant_linears(model).values():  # seeded: add_lora's init draws from the global RNG
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) / m.in_features**0.5)
            m.lora_B.copy_(0.01 * torch.randn(m.lora_B.shape, generator=g))
    adapter = tmp_path_factory.mktemp("adapter") / "adapter"
    save_adapter(model, adapter, base_model=str(src))
    return model, adapter


def _merged_fp32(model) -> dict:
    """What merging means: dequantized base + (alpha/r) B A, summed in fp32."""
    return {n: m.dequantized(torch.float32) + m.lora_delta().float() for n, m in quant_linears(model).items()}


def test_merged_bf16_export_matches_adapter_logits(trained, tmp_path):
    model, adapter = trained
    out = export_adapter(adapter, tmp_path / "merged", merge="bf16", device="cpu")
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    files = _read_dir(out)
    assert all(v.dtype == torch.bfloat16 for v in files.values())
    for name, w in _merged_fp32(model).items():  # rounded once, from the fp32 sum
        assert torch.equal(files[f"{name}.weight"], w.to(torch.bfloat16)), name
    with torch.no_grad():
        got = hf_model(out)(IDS).logits.float()  # plain transformers, fp32 compute on the bf16 weights
    want = qerl_logits(model, IDS)
    # The one difference is the bf16 rounding of the merged weights (2^-9 relative): measured max
    # |diff| 0.0050 and 0.31% relative, on logits of std 0.41 that the adapter moves by 20% and
    # the NVFP4 rounding of the base by 15%. Bounds: twice the measurement.
    assert float((got - want).abs().max()) < 0.01
    assert rel_err(got, want) < 0.006
    assert (out / "tokenizer.json").exists()


def test_merged_nvfp4_export_loads_in_qerl_and_compressed_tensors(trained, tmp_path):
    model, adapter = trained
    out = export_adapter(adapter, tmp_path / "merged4", merge="nvfp4", device="cpu")
    merged, _ = load_model(str(out), quant="nvfp4", lora_rank=0, device="cpu")
    mods = quant_linears(merged)
    want_w = _merged_fp32(model)
    for i in range(2):  # the fp32 sums quantized with the fused-group rule (one global scale per group)
        for parent, group in (
            ("self_attn", ("q_proj", "k_proj", "v_proj")),
            ("self_attn", ("o_proj",)),
            ("mlp", ("gate_proj", "up_proj")),
            ("mlp", ("down_proj",)),
        ):
            names = [f"model.layers.{i}.{parent}.{n}" for n in group]
            expected = quantize_group(names, [want_w[n] for n in names], get_format("nvfp4"))
            for n, t in zip(names, expected):
                _assert_same_tensors(mods[n].quantized_tensors(), t)
    dense = _ct_decompress(out)
    for name, m in mods.items():
        assert torch.equal(m.dequantized(torch.bfloat16).float(), dense[f"{name}.weight"])
    # Re-quantizing base + LoRA rounds a second time: measured 13.3% relative logit error against
    # the adapter model, the size of the first rounding (bf16 base -> NVFP4 base: 15.4%).
    assert rel_err(qerl_logits(merged, IDS), qerl_logits(model, IDS)) < 0.2


def test_export_without_merge_serves_adapter_on_the_nvfp4_base(trained, src_dirs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model, adapter = trained
    out = export_adapter(adapter, tmp_path / "served", device="cpu")
    base, ad = out / "base", out / "adapter"
    assert json.loads((ad / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base.resolve())
    # The written base is bit for bit the model the adapter was trained on.
    trained_on, _ = load_model(str(src_dirs["qwen2"]), quant="nvfp4", lora_rank=0, device="cpu")
    loaded, _ = load_model(str(base), quant="nvfp4", lora_rank=0, device="cpu")
    ref = quant_linears(trained_on)
    for name, m in quant_linears(loaded).items():
        _assert_same_tensors(m.quantized_tensors(), ref[name].quantized_tensors())

    # PEFT loads the adapter onto the bf16 base ...
    peft_bf16 = PeftModel.from_pretrained(hf_model(src_dirs["qwen2"]), ad)
    a = peft_bf16.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert torch.equal(a, model.model.layers[0].self_attn.q_proj.lora_A)
    # ... and onto the NVFP4 base as transformers + compressed-tensors load it, where it gives
    # qerl's logits up to CT's decompression through bf16: measured max |diff| 0.0046, 0.29% relative.
    hf_base = AutoModelForCausalLM.from_pretrained(
        base, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    peft_nvfp4 = PeftModel.from_pretrained(hf_base, ad).eval()
    with torch.no_grad():
        got = peft_nvfp4(IDS).logits.float()
    want = qerl_logits(model, IDS)
    assert float((got - want).abs().max()) < 0.01
    assert rel_err(got, want) < 0.006

    # A base that already is a compressed-tensors NVFP4 checkpoint is pointed at, not copied.
    again = export_adapter(ad, tmp_path / "pointer", device="cpu")
    assert not (again / "base").exists()
    assert json.loads((again / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        base.resolve()
    )


def test_cli_quantize_and_export(trained, src_dirs, tmp_path):
    from typer.testing import CliRunner

    from qerl.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["quantize", str(src_dirs["llama"]), "--format", "mxfp4", "--out", str(tmp_path / "q")])
    assert r.exit_code == 0, r.output
    assert detect_quantized(tmp_path / "q").format == "mxfp4"
    r = runner.invoke(app, ["export", "--adapter", str(trained[1]), "--out", str(tmp_path / "e"), "--merge", "fp8"])
    assert isinstance(r.exception, QerlError) and "--merge must be one of bf16, nvfp4, mxfp4" in str(r.exception)
    # another base of other shapes: refused before anything is written, with or without a merge
    wide = make_tiny_checkpoint(tmp_path / "wide", "qwen2", std=0.05, intermediate_size=192)
    for merge in ([], ["--merge", "bf16"]):
        out = tmp_path / f"wrong-base{len(merge)}"
        r = runner.invoke(
            app, ["export", "--adapter", str(trained[1]), "--out", str(out), "--model", str(wide), *merge]
        )
        assert isinstance(r.exception, QerlError) and "does not fit the base's" in str(r.exception), r.output
        assert not out.exists()


def test_export_base_only_writes_a_plain_hf_base_that_peft_loads(trained, src_dirs, written, tmp_path, monkeypatch):
    """`qerl export --base-only`: the base as a plain HF directory; an adapter pointed at it loads with
    AutoPeftModelForCausalLM offline and gives qerl's bf16 logits. A quantized base comes out dequantized."""
    import huggingface_hub.constants
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from qerl.cli import app
    from qerl.lora import load_adapter

    model, adapter = trained
    r = CliRunner().invoke(app, ["export", "--base-only", "--adapter", str(adapter), "--out", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    base = tmp_path / "b"
    assert "PeftModel.from_pretrained" in r.output and str(base.resolve()) in r.output
    cfg = json.loads((base / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == cfg["torch_dtype"] == "bfloat16"
    assert (base / "tokenizer.json").exists()
    _assert_same_tensors(_read_dir(base), _read_dir(src_dirs["qwen2"]))  # the source's bf16 tensors

    ad = tmp_path / "adapter"
    shutil.copytree(adapter, ad)
    peft_cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**peft_cfg, "base_model_name_or_path": str(base)}))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    peft = AutoPeftModelForCausalLM.from_pretrained(str(ad), dtype=torch.float32).eval()
    bf16, _ = load_model(str(src_dirs["qwen2"]), quant="bf16", lora_rank=0, device="cpu")
    load_adapter(bf16, adapter)
    with torch.no_grad():
        torch.testing.assert_close(peft(IDS).logits.float(), qerl_logits(bf16, IDS), rtol=1e-5, atol=1e-5)

    # A compressed-tensors NVFP4 base: written dequantized, the same function as qerl's NVFP4 model.
    ct = written["llama", "nvfp4"][0]
    deq = export_base(tmp_path / "deq", model=str(ct), device="cpu")
    assert detect_quantized(deq) is None
    assert all(v.dtype == torch.bfloat16 for v in _read_dir(deq).values())
    qerl_nvfp4, _ = load_model(str(ct), quant="nvfp4", lora_rank=0, device="cpu")
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(deq, dtype=torch.float32)(IDS).logits.float()
    # Only the bf16 rounding of the dequantized weights differs: measured 0.31% relative.
    assert rel_err(got, qerl_logits(qerl_nvfp4, IDS)) < 0.01
    r = CliRunner().invoke(app, ["export", "--base-only", "--merge", "bf16", "--out", str(tmp_path / "x")])
    assert isinstance(r.exception, QerlError) and "drop --merge" in str(r.exception)
    r = CliRunner().invoke(app, ["export", "--out", str(tmp_path / "x")])
    assert isinstance(r.exception, QerlError) and "--adapter is required" in str(r.exception)


def test_export_base_only_defaults_to_the_embedded_model(smollm2_dir, tmp_path):
    """With no model named: the embedded default's weights (its GGUF, converted) as a bf16 HF directory."""
    from qerl.loading import default_gguf, resolvable_base

    out = export_base(tmp_path / "smol")
    src = _read_dir(smollm2_dir)
    got = _read_dir(out)
    assert sorted(got) == sorted(src)
    for k in ("model.embed_tokens.weight", "model.layers.7.mlp.down_proj.weight", "model.norm.weight"):
        assert torch.equal(got[k], src[k].to(torch.bfloat16)), k
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert (out / "tokenizer.json").exists()
    # A GGUF file as the base is recorded as the HF directory it converts to.
    assert resolvable_base(str(default_gguf())) == str(smollm2_dir.resolve())
