"""CudaEngine against the reference Engine, token for token at temperature 0, on a small random model; sampled
log-probs against the model's own forward."""

import pytest
import torch
from conftest import qerl_logits

from qerl.bench import build_random_model
from qerl.kernels.choice import LinearKernel
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


PORTABLE = frozenset({LinearKernel.GEMV, LinearKernel.TC, LinearKernel.CUBLAS})  # no Hopper-only kernels


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4", "bf16"])
def test_greedy_matches_reference(fmt):
    from qerl.rollout.cuda import CudaEngine

    model = build_random_model(ARGS, fmt, lora_rank=16, dtype=torch.float32, seed=1)
    params = SamplingParams(temperature=0.0, max_new_tokens=40, n=2)
    ref = Engine(model, Tok()).generate(_prompts(), params)
    # an EOS that ends some rows early exercises the compaction into smaller buckets
    eos = int(ref.completion_ids[0, 6])
    ref = Engine(model, Tok(eos)).generate(_prompts(), params)
    for opts in (dict(), dict(use_graphs=False), dict(kernels=PORTABLE)):
        fast = CudaEngine(model, Tok(eos), check_every=4, **opts).generate(_prompts(), params)
        assert torch.equal(fast.completion_ids, ref.completion_ids)
        assert torch.equal(fast.mask, ref.mask)
        assert fast.finish_reasons == ref.finish_reasons
        assert torch.allclose(fast.logprobs, ref.logprobs, atol=1e-4)
    assert ref.lengths != [40] * 6  # some rows did stop early


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_greedy_matches_reference_cublas_path(fmt):
    """Dequantize + cuBLAS + the epilogue kernel (what serves rows past the one-pass kernels), for every bucket."""
    from qerl.rollout.cuda import CudaEngine

    model = build_random_model(ARGS, fmt, lora_rank=16, dtype=torch.float32, seed=4)
    params = SamplingParams(temperature=0.0, max_new_tokens=24, n=2)
    ref = Engine(model, Tok()).generate(_prompts(), params)
    fast = CudaEngine(model, Tok(), check_every=4, kernels={LinearKernel.CUBLAS}).generate(_prompts(), params)
    assert torch.equal(fast.completion_ids, ref.completion_ids)
    assert torch.allclose(fast.logprobs, ref.logprobs, atol=1e-4)


def test_lora_update_is_seen_and_bf16_close():
    from qerl.rollout.cuda import CudaEngine

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


@pytest.mark.parametrize("n", [2, 5, 40])
def test_hopper_kernels_in_the_engine_agree_with_the_portable_ones(n):
    """bf16 activations, 6, 15 or 120 rows (3 prompts x n): the NVFP4 layers with K % 256 == 0 run `mma_sync`
    (6 rows) or `wgmma` (15, 120), down_proj (K = 704) `tc` or cuBLAS; the first token of every row and its
    logprob match the engine on the portable kernels (`tc` / cuBLAS on a dequantized copy)."""
    from qerl.rollout.cuda import CudaEngine

    model = build_random_model(ARGS, "nvfp4", lora_rank=16, dtype=torch.bfloat16, seed=6)
    params = SamplingParams(temperature=0.0, max_new_tokens=12, n=n)
    a = CudaEngine(model, Tok()).generate(_prompts(), params)
    b = CudaEngine(model, Tok(), kernels=PORTABLE).generate(_prompts(), params)
    assert torch.equal(a.completion_ids[:, :1], b.completion_ids[:, :1])
    assert torch.allclose(a.logprobs[:, 0], b.logprobs[:, 0], atol=0.05)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_cuda_engine_sampled_logprobs_are_the_models(temperature):
    """CudaEngine draws with the kernel; each sampled token's log-prob is the model's fresh forward's
    log_softmax(logits / T) at that token; the same seed gives the same completions."""
    from qerl.rollout.cuda import CudaEngine

    model = build_random_model(ARGS, "nvfp4", lora_rank=16, dtype=torch.float32, seed=5)
    eng = CudaEngine(model, Tok(), check_every=4)
    params = SamplingParams(temperature=temperature, max_new_tokens=16, n=3, seed=9)
    r = eng.generate(_prompts(), params)
    assert torch.equal(eng.generate(_prompts(), params).completion_ids, r.completion_ids)
    for i in range(len(r.mask)):
        prompt, toks = _prompts()[i // 3], r.completion_ids[i][r.mask[i]].tolist()
        with torch.no_grad():
            logits = qerl_logits(model, torch.tensor([prompt + toks], device="cuda"))[0, len(prompt) - 1 : -1]
        ref = (logits.float() / temperature).log_softmax(-1).gather(-1, torch.tensor(toks, device="cuda")[:, None])
        torch.testing.assert_close(r.logprobs[i][r.mask[i]], ref.squeeze(-1).cpu(), rtol=0, atol=1e-3)


def test_ragged_groups_through_every_bucket():
    """32 rows (4 prompts x 8 samples, the groups sharing their prompt's keys), each stopped at its own length
    (1-40), so compactions take the step through buckets 32, 16, 8, ... (the 9-32-row linear kernels included):
    every row ends at its limit, every sampled log-prob is finite and is the model's fresh forward's."""
    from qerl.rollout.cuda import CudaEngine

    model = build_random_model(ARGS, "nvfp4", lora_rank=16, dtype=torch.bfloat16, seed=7)
    g = torch.Generator().manual_seed(1)
    limits = tuple(torch.randint(1, 41, (32,), generator=g).tolist())
    prompts = [torch.randint(1, 512, (n,), generator=g).tolist() for n in (9, 30, 17, 24)]
    params = SamplingParams(temperature=1.0, max_new_tokens=40, n=8, seed=3, row_max_tokens=limits)
    r = CudaEngine(model, Tok(), check_every=2).generate(prompts, params)
    assert r.lengths == list(limits)
    assert torch.isfinite(r.logprobs).all()
    for i in range(32):
        prompt, toks = prompts[i // 8], r.completion_ids[i][r.mask[i]].tolist()
        logits = qerl_logits(model, torch.tensor([prompt + toks], device="cuda"))[0, len(prompt) - 1 : -1]
        ref = logits.float().log_softmax(-1).gather(-1, torch.tensor(toks, device="cuda")[:, None]).squeeze(-1)
        torch.testing.assert_close(r.logprobs[i][r.mask[i]], ref.cpu(), rtol=0, atol=0.2)  # bf16 both ways


def test_decode_graphs_bring_their_own_split_k_partials():
    """The split-K kernels' shared partials buffer grows by replacement (the old one freed); a graph captured
    before would go on writing there, into whatever memory the allocator hands out next (the 7B lognormal step
    lost its AdamW state that way: the 32-row bucket needs twice the 64-row partials). So the decode graphs
    use the engine's own buffer: after ragged rollouts through every bucket, twice (the second replays the
    first's graphs), the shared buffer was never made, and greedy rows are the same both times."""
    from qerl.kernels import common
    from qerl.kernels.fused_linear import partials_numel
    from qerl.rollout.cuda import CudaEngine

    model = build_random_model(ARGS, "nvfp4", lora_rank=16, dtype=torch.bfloat16, seed=7)
    g = torch.Generator().manual_seed(2)
    limits = tuple(torch.randint(1, 41, (64,), generator=g).tolist())
    prompts = [torch.randint(1, 512, (n,), generator=g).tolist() for n in (9, 30, 17, 24, 5, 12, 20, 16)]
    params = SamplingParams(temperature=0.0, max_new_tokens=40, n=8, row_max_tokens=limits)
    common._SHARED.clear()
    eng = CudaEngine(model, Tok(), check_every=2)
    first = eng.generate(prompts, params)
    second = eng.generate(prompts, params)
    assert not any(k[0].startswith("split-K") for k in common._SHARED), "a decode step used the shared partials"
    assert first.lengths == list(limits) and torch.equal(first.completion_ids, second.completion_ids)
    fl = eng._fused()
    need = max(
        partials_numel(b, f.fmt, f.weight.shape[0], f.in_features, f.glu, eng._kernel(f, b))
        for f in fl
        for b in CudaEngine._buckets(64)
    )
    assert 0 < need <= eng.part.numel()


def test_outgrown_shared_scratch_stays_with_the_graphs_that_captured_it():
    """A graph captured with the shared partials keeps them when a later call outgrows the buffer: its replay
    still writes the old address, which stays allocated (retired), so no other tensor gets it."""
    from qerl.kernels import common

    common._SHARED.clear()
    first = common.partials_workspace(1 << 20, torch.device("cuda"))  # made outside any capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        small = common.partials_workspace(1 << 20, torch.device("cuda"))  # the same buffer, taken by a capture
        small.fill_(3.0)
    assert small.data_ptr() == first.data_ptr()
    big = common.partials_workspace(1 << 22, torch.device("cuda"))
    assert big.data_ptr() != small.data_ptr()
    assert any(t.data_ptr() == small.data_ptr() for t in common._RETIRED)
    graph.replay()
    torch.cuda.synchronize()
    assert bool((small == 3.0).all())
