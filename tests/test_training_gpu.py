"""The fast training pass on a GPU, each piece against its plain-PyTorch reference on fresh random
data (never zeros), forward and backward, at the Qwen2.5-7B/14B/32B layer shapes."""

import pytest
import torch
from conftest import make_tiny_checkpoint

from qerl.modeling import _elementwise, rms_norm, rope_rotate, silu_mul
from qerl.packing import _varlen, pack, packed_attention, packed_attention_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# (q heads, kv heads, head_dim, hidden, intermediate) of Qwen2.5-7B, 14B, 32B
SHAPES = {"7b": (28, 4, 128, 3584, 18944), "14b": (40, 8, 128, 5120, 13824), "32b": (40, 8, 128, 5120, 27648)}


def _close(a, b, tol):
    err = float((a.float() - b.float()).norm() / b.float().norm())
    assert err < tol, f"relative error {err:.2e} >= {tol}"


@pytest.mark.parametrize("model", list(SHAPES))
def test_varlen_attention_matches_segment_reference(model):
    heads, kv, d, _, _ = SHAPES[model]
    assert _varlen() is not None, "torch.nn.attention.varlen is missing: the packed path would run the slow loop"
    g = torch.Generator("cuda").manual_seed(0)
    # two groups, ragged completions (one empty), prompts of different lengths
    lens = [[1, 130, 0, 77], [256, 3, 64, 200]]
    prompts = [[5] * 37, [6] * 100]
    comps = [[7] * n for grp in lens for n in grp]
    p = pack(prompts, comps, group=4, length=256, device="cuda")
    t = p.tokens
    q = torch.randn(t, heads, d, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(t, kv, d, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(t, kv, d, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(t, heads, d, device="cuda", generator=g)
    out = packed_attention(q, k, v, p)
    gq, gk, gv = torch.autograd.grad((out.float() * w).sum(), (q, k, v))
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = packed_attention_reference(q32, k32[p.key_index], v32[p.key_index], p)
    rq, rk, rv = torch.autograd.grad((ref * w).sum(), (q32, k32, v32))
    _close(out, ref, 1e-2)
    for a, b in ((gq, rq), (gk, rk), (gv, rv)):
        _close(a, b, 2e-2)


@pytest.mark.parametrize("model", list(SHAPES))
def test_compiled_elementwise_matches_eager(model):
    heads, kv, d, hidden, inter = SHAPES[model]
    g = torch.Generator("cuda").manual_seed(1)
    t = 1000

    def rnd(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, device="cuda", generator=g, dtype=dtype)

    cos, sin = rnd(t, 1, d), rnd(t, 1, d)
    cases = [
        (rms_norm, (rnd(t, hidden), 1 + 0.1 * rnd(hidden, dtype=torch.float32), 1e-6)),
        (rope_rotate, (rnd(t, heads, d), cos, sin)),
        (silu_mul, (rnd(t, inter), rnd(t, inter))),
    ]
    for fn, inputs in cases:
        leaves = [x.clone().requires_grad_() if isinstance(x, torch.Tensor) else x for x in inputs]
        fast = _elementwise(fn, leaves[0])
        assert fast is not fn  # a CUDA training forward gets the compiled version
        out = fast(*leaves)
        w = rnd(*out.shape, dtype=torch.float32)
        grads = torch.autograd.grad((out.float() * w).sum(), [x for x in leaves if isinstance(x, torch.Tensor)])
        ref_leaves = [x.detach().clone().requires_grad_() if isinstance(x, torch.Tensor) else x for x in inputs]
        ref = fn(*ref_leaves)
        ref_grads = torch.autograd.grad((ref.float() * w).sum(), [x for x in ref_leaves if isinstance(x, torch.Tensor)])
        _close(out, ref, 5e-3)
        for a, b in zip(grads, ref_grads):
            _close(a, b, 5e-3)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_update_matches_the_padded_reference_on_gpu(tmp_path, arch):
    """The whole fast pass (training kernels, packed layout, bf16 LoRA) against the padded
    reference path on the same GPU model: log-probs, entropies and LoRA gradients."""
    from test_packing import _ragged_batch

    from qerl.loading import load_model
    from qerl.lora import lora_parameters
    from qerl.trainer import use_training_kernels
    from qerl.update import packed_logprobs, sequence_logprobs

    path = make_tiny_checkpoint(tmp_path / arch, arch, seed=7, std=0.05)
    model, tok = load_model(path, quant="nvfp4", lora_rank=4, device="cuda")
    params = lora_parameters(model)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    b = _ragged_batch(tok, 3)
    b = type(b)(
        *(
            x.cuda() if isinstance(x, torch.Tensor) else x
            for x in (b.input_ids, b.attn, b.completion, b.mask, b.rollout_logp, b.advantages, b.prompt_len)
        )
    )
    w1 = torch.randn(b.mask.shape, device="cuda")
    model.train()
    out = {}
    for name in ("ref", "fast"):
        if name == "fast":
            use_training_kernels(model)
            model.gradient_checkpointing = 1
        model.zero_grad()
        fn, grp = (sequence_logprobs, 1) if name == "ref" else (packed_logprobs, 3)
        logp, ent = fn(model, b, 1.0, group=grp)
        ((logp * w1 + ent) * b.mask).sum().backward()
        out[name] = (logp.detach()[b.mask], ent.detach()[b.mask], [p.grad.clone() for p in params])
    torch.testing.assert_close(out["fast"][0], out["ref"][0], rtol=0.05, atol=0.05)  # bf16 model, bf16 LoRA
    torch.testing.assert_close(out["fast"][1], out["ref"][1], rtol=0.05, atol=0.05)
    for a, c in zip(out["fast"][2], out["ref"][2]):
        _close(a, c, 0.05)


def test_cuda_engine_stops_rows_at_their_limits(tmp_path):
    from qerl.loading import load_model
    from qerl.rollout import SamplingParams, make_engine

    path = make_tiny_checkpoint(tmp_path / "qwen2", "qwen2", seed=2, std=0.05)
    model, tok = load_model(path, quant="nvfp4", lora_rank=4, device="cuda")
    eng = make_engine(model, tok, backend="cuda", eos_ids=[])
    limits = (5, 40, 1, 17, 40, 33)
    out = eng.generate([[5, 6, 7], [8, 9]], SamplingParams(n=3, max_new_tokens=40, row_max_tokens=limits, seed=0))
    assert out.lengths == list(limits)
    assert out.finish_reasons == ["length"] * 6
