"""The packed training layout: a hand-checked packing, segment attention against a dense
masked reference, and the packed update against the padded reference path."""

import pytest
import torch
from conftest import make_tiny_checkpoint

from qerl.loading import load_model
from qerl.lora import lora_parameters
from qerl.packing import pack, packed_attention, packed_attention_reference
from qerl.update import build_batch, packed_logprobs, sequence_logprobs


def test_pack_hand_case():
    # group 2: prompt [5, 6] with completions [7, 8, 9] and [10]; prompt [11] with [] and [12, 13]
    p = pack([[5, 6], [11]], [[7, 8, 9], [10], [], [12, 13]], group=2, length=3, device="cpu")
    assert p.ids.tolist() == [5, 6, 7, 8, 9, 10, 11, 12, 13]
    assert p.positions.tolist() == [0, 1, 2, 3, 4, 2, 0, 1, 2]
    # segments: prompt 1, completion 1.1, completion 1.2, prompt 2, completion 2.2
    assert p.cu_q.tolist() == [0, 2, 5, 6, 7, 9]
    assert p.key_index.tolist() == [0, 1, 0, 1, 2, 3, 4, 0, 1, 5, 6, 6, 7, 8]
    assert p.cu_k.tolist() == [0, 2, 7, 10, 11, 14]
    assert (p.max_q, p.max_k) == (3, 5)
    # token 0 of a completion is predicted by its prompt's last token, token t by token t-1
    assert p.pred_index.tolist() == [1, 2, 3, 1, 6, 7]
    assert p.targets.tolist() == [7, 8, 9, 10, 12, 13]
    assert p.out_index.tolist() == [0, 1, 2, 3, 9, 10]  # rows 0, 1, 3 of a [4, 3] batch


def test_pack_skips_groups_without_loss_tokens():
    p = pack([[5], [6, 7]], [[], [], [8], []], group=2, length=2, device="cpu")
    assert p.ids.tolist() == [6, 7, 8] and p.cu_q.tolist() == [0, 2, 3] and p.out_index.tolist() == [4]


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
def test_segment_attention_matches_dense_masked_attention(heads, kv_heads):
    """Each segment's output equals attention over an explicit [T, Tk]-style mask built per query."""
    g = torch.Generator().manual_seed(0)
    p = pack([[1, 2, 3], [4, 5]], [[6, 7], [8, 9, 10, 11], [12], [13, 14]], group=2, length=4, device="cpu")
    t, d = p.tokens, 8
    q = torch.randn(t, heads, d, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(t, kv_heads, d, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(t, kv_heads, d, generator=g, dtype=torch.float64, requires_grad=True)
    out = packed_attention(q, k, v, p)
    # dense reference: token i attends to token j iff j is i's prompt or j <= i in i's own sequence
    seq = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 4, 5, 5])  # 0/3: prompts, others: completions
    prompt_of = {0: 0, 1: 0, 2: 0, 3: 3, 4: 3, 5: 3}
    allowed = torch.zeros(t, t, dtype=torch.bool)
    for i in range(t):
        for j in range(i + 1):
            si, sj = int(seq[i]), int(seq[j])
            allowed[i, j] = sj == si or (sj == prompt_of[si] and si != sj)
    rep = heads // kv_heads
    kd, vd = k.repeat_interleave(rep, 1).transpose(0, 1), v.repeat_interleave(rep, 1).transpose(0, 1)
    s = (q.transpose(0, 1) @ kd.transpose(1, 2)) / d**0.5
    ref = (s.masked_fill(~allowed, float("-inf")).softmax(-1) @ vd).transpose(0, 1)
    torch.testing.assert_close(out, ref)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    grads_ref = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)
    assert packed_attention_reference(q, k[p.key_index], v[p.key_index], p).shape == out.shape


def _ragged_batch(tok, group, seed=1):
    g = torch.Generator().manual_seed(seed)
    length = 6
    prompts = [torch.randint(3, 90, (k,), generator=g).tolist() for k in (4, 7, 2)]
    rows = [prompts[i // group] for i in range(group * len(prompts))]
    comps = [torch.randint(3, 90, (length,), generator=g) for _ in rows]
    lens = [6, 3, 0, 5, 2, 1, 4, 6, 3][: len(rows)]  # ragged, one row without loss tokens
    masks = [torch.arange(length) < k for k in lens]
    adv = torch.randn(len(rows), generator=g)
    return build_batch(rows, comps, masks, [torch.zeros(length)] * len(rows), adv, tok.pad_token_id, "cpu")


@pytest.mark.parametrize("arch,ckpt", [("llama", False), ("qwen2", 1)])
def test_packed_logprobs_equal_the_padded_reference(tmp_path, arch, ckpt):
    """Same log-probs, entropies and LoRA gradients as `sequence_logprobs` (fp32 CPU: 1e-5 / 1e-4)."""
    path = make_tiny_checkpoint(tmp_path / arch, arch, seed=7, std=0.05)
    model, tok = load_model(path, quant="nvfp4", lora_rank=4, device="cpu", dtype="float32")
    model.gradient_checkpointing = ckpt
    params = lora_parameters(model)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    group = 3
    b = _ragged_batch(tok, group)
    g = torch.Generator().manual_seed(2)
    w1, w2 = torch.randn(b.mask.shape, generator=g), torch.randn(b.mask.shape, generator=g)
    model.train()
    out = {}
    for name, fn, grp in (
        ("ref", sequence_logprobs, 1),
        ("packed", packed_logprobs, group),
        ("packed1", packed_logprobs, 1),
    ):
        model.zero_grad()
        logp, ent = fn(model, b, 0.7, group=grp)
        ((logp * w1 + ent * w2) * b.mask).sum().backward()
        out[name] = (logp.detach(), ent.detach(), [p.grad.clone() for p in params])
    m = b.mask
    for name in ("packed", "packed1"):
        torch.testing.assert_close(out[name][0][m], out["ref"][0][m], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[name][1][m], out["ref"][1][m], rtol=1e-5, atol=1e-5)
        assert float(out[name][0][~m].abs().sum()) == 0.0  # nothing outside the loss mask
        for a, c in zip(out[name][2], out["ref"][2]):
            torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6)


def test_packed_rejects_a_mask_with_holes(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "llama", "llama", seed=7, std=0.05)
    model, tok = load_model(path, quant="nvfp4", lora_rank=4, device="cpu", dtype="float32")
    b = _ragged_batch(tok, 3)
    b.mask[0, 1] = False
    with pytest.raises(ValueError, match="prefix"):
        packed_logprobs(model, b, 1.0, group=3)
