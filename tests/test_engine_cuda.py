"""CudaEngine against the reference Engine, token for token at temperature 0, on a small random model."""

import pytest
import torch

from qerl.bench import build_random_model
from qerl.modeling import ModelArgs
from qerl.rollout import Engine, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


class Tok:
    pad_token_id = 0

    def __init__(self, eos=None):
        self.eos_token_id = eos

    def get_vocab(self):
        return {}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))

    def batch_decode(self, rows):
        return [self.decode(r) for r in rows]


ARGS = ModelArgs(
    model_type="qwen2",
    vocab_size=512,
    hidden_size=256,
    intermediate_size=704,
    num_layers=3,
    num_heads=8,
    num_kv_heads=2,
    head_dim=32,
    rope_theta=1e6,
    attention_bias=True,
)


def _prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(1, 512, (n,), generator=g).tolist() for n in (9, 30, 17)]


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4", "bf16"])
def test_greedy_matches_reference(fmt):
    from qerl.engine_cuda import CudaEngine

    model = build_random_model(ARGS, fmt, lora_rank=16, dtype=torch.float32, seed=1)
    params = SamplingParams(temperature=0.0, max_new_tokens=40, n=2)
    ref = Engine(model, Tok()).generate(_prompts(), params)
    # an EOS that ends some rows early exercises the compaction into smaller buckets
    eos = int(ref.completion_ids[0, 6])
    ref = Engine(model, Tok(eos)).generate(_prompts(), params)
    variants = (
        dict(),
        dict(use_graphs=False),
        dict(pdl=True),
        dict(fuse_shrink=False),
        dict(pdl=True, fuse_shrink=False),
        dict(mma=False),
    )
    for opts in variants:  # pdl: programmatic dependent launch; fuse_shrink: h from the split-K decode kernels
        fast = CudaEngine(model, Tok(eos), check_every=4, **opts).generate(_prompts(), params)
        assert torch.equal(fast.completion_ids, ref.completion_ids)
        assert torch.equal(fast.mask, ref.mask)
        assert fast.finish_reasons == ref.finish_reasons
        assert torch.allclose(fast.logprobs, ref.logprobs, atol=1e-4)
    assert ref.lengths != [40] * 6  # some rows did stop early


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_greedy_matches_reference_cublas_path(fmt, monkeypatch):
    """Rows above DECODE_MAX_M run dequantize + cuBLAS + the epilogue kernel: force it for every bucket."""
    from qerl import engine_cuda

    monkeypatch.setattr(engine_cuda, "DECODE_MAX_M", 0)
    model = build_random_model(ARGS, fmt, lora_rank=16, dtype=torch.float32, seed=4)
    params = SamplingParams(temperature=0.0, max_new_tokens=24, n=2)
    ref = Engine(model, Tok()).generate(_prompts(), params)
    fast = engine_cuda.CudaEngine(model, Tok(), check_every=4).generate(_prompts(), params)
    assert torch.equal(fast.completion_ids, ref.completion_ids)
    assert torch.allclose(fast.logprobs, ref.logprobs, atol=1e-4)


def test_lora_update_is_seen_and_bf16_close():
    from qerl.engine_cuda import CudaEngine

    model = build_random_model(ARGS, "nvfp4", lora_rank=16, dtype=torch.bfloat16, seed=2)
    eng = CudaEngine(model, Tok())
    params = SamplingParams(temperature=0.0, max_new_tokens=24)
    a = eng.generate(_prompts(), params)
    ref = Engine(model, Tok()).generate(_prompts(), params)
    # bf16: roundings differ (summation order, the decode kernel's unrounded weight); greedy
    # paths may part after a near-tie, so only the first token must agree
    assert torch.equal(a.completion_ids[:, :1], ref.completion_ids[:, :1])
    for m in model.modules():
        if getattr(m, "lora_rank", 0):
            m.lora_B.data.mul_(50.0)
    b = eng.generate(_prompts(), params)
    assert not torch.equal(a.completion_ids, b.completion_ids)


def test_mma_decode_in_the_engine_agrees_with_version_5():
    """bf16 activations, 6 rows: NVFP4 layers with K % 256 == 0 run version 7 (register-fed tensor cores),
    down_proj (K = 704) version 5; the first token of every row and its logprob match mma=False; PDL gives
    identical rollouts."""
    from qerl.engine_cuda import CudaEngine

    model = build_random_model(ARGS, "nvfp4", lora_rank=16, dtype=torch.bfloat16, seed=5)
    params = SamplingParams(temperature=0.0, max_new_tokens=12, n=2)
    a = CudaEngine(model, Tok()).generate(_prompts(), params)
    b = CudaEngine(model, Tok(), mma=False).generate(_prompts(), params)
    f = CudaEngine(model, Tok(), pdl=True).generate(_prompts(), params)  # programmatic dependent launch
    assert torch.equal(a.completion_ids[:, :1], b.completion_ids[:, :1])
    assert torch.allclose(a.logprobs[:, 0], b.logprobs[:, 0], atol=0.05)
    assert torch.equal(a.completion_ids, f.completion_ids) and torch.equal(a.logprobs, f.logprobs)


@pytest.mark.parametrize("n", [5, 40])
def test_wgmma_decode_in_the_engine_agrees_with_version_5(n):
    """bf16 activations, 15 or 120 rows (3 prompts x n): the NVFP4 layers with K % 256 == 0 run version 8
    (warpgroup MMA; down_proj, K = 704, version 5 at 15 rows, cuBLAS at 120); the first token of every row and
    its logprob match the engine without versions 7 and 8 (version 5 at 15 rows; cuBLAS on a dequantized
    copy at 120)."""
    from qerl.engine_cuda import CudaEngine

    model = build_random_model(ARGS, "nvfp4", lora_rank=16, dtype=torch.bfloat16, seed=6)
    params = SamplingParams(temperature=0.0, max_new_tokens=12, n=n)
    a = CudaEngine(model, Tok()).generate(_prompts(), params)
    b = CudaEngine(model, Tok(), mma=False, wgmma=False).generate(_prompts(), params)
    c = CudaEngine(model, Tok(), pdl=True).generate(_prompts(), params)  # same sums: identical
    assert torch.equal(a.completion_ids, c.completion_ids) and torch.equal(a.logprobs, c.logprobs)
    assert torch.equal(a.completion_ids[:, :1], b.completion_ids[:, :1])
    assert torch.allclose(a.logprobs[:, 0], b.logprobs[:, 0], atol=0.05)
