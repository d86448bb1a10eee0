import math

import pytest
import torch

from qerl.rl import (
    LossConfig,
    chunked_logprobs_and_entropy,
    dynamic_sampling_keep,
    fill_batch,
    group_advantages,
    importance_weights,
    k3_kl,
    overlong_mask,
    policy_loss,
)

LN = math.log

# --- advantages -----------------------------------------------------------------


def test_group_advantages_grpo_drgrpo_batch_scale():
    rewards = torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 0])
    # Group 0: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.5773503 -> +-0.5 / (0.5773503 + 1e-6) = +-0.8660239.
    # Group 1: all equal -> 0.
    a = 0.8660239
    assert group_advantages(rewards, 4).tolist() == pytest.approx([a, -a, -a, a, 0, 0, 0, 0], abs=1e-6)
    # Dr.GRPO: only the group mean is removed.
    drgrpo = [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]
    assert group_advantages(rewards, 4, normalize_std=False).tolist() == drgrpo
    # Batch scale: batch std of drgrpo = sqrt(4 * 0.25 / 7) = 0.3779645 -> 0.5 / 0.3779645 = 1.3228757.
    b = 1.3228757
    assert group_advantages(rewards, 4, normalize_std=False, batch_scale=True).tolist() == pytest.approx(
        [b, -b, -b, b, 0, 0, 0, 0], abs=1e-5
    )
    # G = 2, QeRL's GSM8K rewards: (2.2, 0.2) -> mean 1.2, unbiased std sqrt(2) -> +-1 / 1.4142136 = +-0.7071068.
    assert group_advantages(torch.tensor([2.2, 0.2]), 2).tolist() == pytest.approx([0.7071068, -0.7071068], abs=1e-6)
    with pytest.raises(ValueError):
        group_advantages(rewards, 3)
    with pytest.raises(ValueError):
        group_advantages(rewards, 1)


# --- policy loss ------------------------------------------------------------------

# A 2 x 3 case, DAPO clip range [0.8, 1.28], advantages (+1, -1), last token of row 1 padded.
#   row 0 (A = +1): ratios 1.5, 0.5, 1.1
#     1.5: min(1.5, clip 1.28) = 1.28 -> loss -1.28, clipped (high)
#     0.5: min(0.5, clip 0.8)  = 0.5  -> loss -0.5
#     1.1: 1.1                        -> loss -1.1
#   row 1 (A = -1): ratios 0.5, 1.3, pad
#     0.5: min(-0.5, -0.8) = -0.8     -> loss 0.8, clipped (low)
#     1.3: min(-1.3, -1.28) = -1.3    -> loss 1.3
# Sum -0.78 over 5 tokens. d loss_tok / d logp = -A * ratio where unclipped, 0 where clipped.
_OLD = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.7, 0.0]], dtype=torch.float64)
_LOG_RATIO = torch.tensor([[LN(1.5), LN(0.5), LN(1.1)], [LN(0.5), LN(1.3), math.nan]], dtype=torch.float64)
_MASK = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
_ADV = torch.tensor([1.0, -1.0], dtype=torch.float64)


@pytest.mark.parametrize(
    "aggregation, expected, grad",
    [
        # -0.78 / 5 tokens
        ("token_mean", -0.156, [[0, -0.5 / 5, -1.1 / 5], [0, 1.3 / 5, 0]]),
        # row means -2.88 / 3 = -0.96 and 2.1 / 2 = 1.05, averaged: 0.045
        ("seq_mean", 0.045, [[0, -0.5 / 6, -1.1 / 6], [0, 1.3 / 4, 0]]),
        # -0.78 / (2 sequences * max_completion_len 4) = -0.0975
        ("constant", -0.0975, [[0, -0.5 / 8, -1.1 / 8], [0, 1.3 / 8, 0]]),
    ],
)
def test_policy_loss_hand_case(aggregation, expected, grad):
    cfg = LossConfig(eps_low=0.2, eps_high=0.28, aggregation=aggregation, max_completion_len=4)
    logp = (_OLD + _LOG_RATIO).requires_grad_()  # the padded token's log-prob is NaN: must not leak
    loss, metrics = policy_loss(logp, _OLD, _ADV, _MASK, cfg)
    loss.backward()
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert torch.allclose(logp.grad, torch.tensor(grad, dtype=torch.float64), atol=1e-12, rtol=0)
    assert metrics["clip_frac"] == pytest.approx(2 / 5)
    assert metrics["ratio_mean"] == pytest.approx((1.5 + 0.5 + 1.1 + 0.5 + 1.3) / 5)  # 0.98
    assert metrics["loss"] == pytest.approx(expected)
    assert "kl" not in metrics


def test_policy_loss_importance_weights():
    cfg = LossConfig(eps_low=0.2, eps_high=0.28)
    is_w = torch.tensor([[2.0, 1.0, 0.5], [1.0, 0.5, 7.0]], dtype=torch.float64)
    # token losses (-1.28 * 2, -0.5, -1.1 * 0.5; 0.8, 1.3 * 0.5) = (-2.56, -0.5, -0.55; 0.8, 0.65): sum -2.16 / 5
    loss, _ = policy_loss(_OLD + _LOG_RATIO, _OLD, _ADV, _MASK, cfg, is_weights=is_w)
    assert loss.item() == pytest.approx(-0.432, abs=1e-12)


def test_k3_kl_hand_values():
    logp = torch.zeros(1, 3, dtype=torch.float64)
    ref = torch.tensor([[LN(2.0), -LN(2.0), 0.0]], dtype=torch.float64)
    # d = ref - logp: exp(d) - d - 1 = (2 - ln2 - 1, 0.5 + ln2 - 1, 0) = (0.3068528, 0.1931472, 0); sum exactly 0.5
    assert k3_kl(logp, ref)[0].tolist() == pytest.approx([0.3068528, 0.1931472, 0.0], abs=1e-7)
    # In the loss, with zero advantages only beta * mean KL remains: 0.1 * 0.5 / 3
    cfg = LossConfig(kl_beta=0.1)
    loss, metrics = policy_loss(
        logp, logp, torch.zeros(1, dtype=torch.float64), torch.ones(1, 3, dtype=torch.bool), cfg, ref_logp=ref
    )
    assert loss.item() == pytest.approx(0.1 * 0.5 / 3, abs=1e-12)
    assert metrics["kl"] == pytest.approx(0.5 / 3)
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, logp, torch.zeros(1), torch.ones(1, 3, dtype=torch.bool), cfg)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean", "constant"])
def test_micro_batches_sum_to_full_batch_loss_and_grad(aggregation):
    gen = torch.Generator().manual_seed(0)
    b, l = 6, 7
    logp0 = -torch.rand(b, l, generator=gen, dtype=torch.float64) * 3  # [B, L]
    old = logp0 + 0.3 * torch.randn(b, l, generator=gen, dtype=torch.float64)
    ref = logp0 + 0.2 * torch.randn(b, l, generator=gen, dtype=torch.float64)
    is_w = torch.rand(b, l, generator=gen, dtype=torch.float64) * 2
    adv = torch.randn(b, generator=gen, dtype=torch.float64)
    lengths = torch.tensor([7, 1, 4, 0, 6, 3])  # includes an empty (e.g. overlong-filtered) sequence
    mask = torch.arange(l) < lengths[:, None]  # [B, L]
    cfg = LossConfig(eps_low=0.2, eps_high=0.28, aggregation=aggregation, kl_beta=0.05, max_completion_len=l)

    full_logp = logp0.clone().requires_grad_()
    full, _ = policy_loss(full_logp, old, adv, mask, cfg, ref_logp=ref, is_weights=is_w)
    full.backward()

    mb_logp = logp0.clone().requires_grad_()
    total, naive = 0.0, []
    for s, e in [(0, 1), (1, 3), (3, 6)]:  # uneven micro-batches
        part, _ = policy_loss(
            mb_logp[s:e],
            old[s:e],
            adv[s:e],
            mask[s:e],
            cfg,
            ref_logp=ref[s:e],
            is_weights=is_w[s:e],
            global_tokens=int(mask.sum()),
            global_seqs=b,
        )
        part.backward()
        total = total + part.detach()
        naive.append(
            policy_loss(logp0[s:e], old[s:e], adv[s:e], mask[s:e], cfg, ref_logp=ref[s:e], is_weights=is_w[s:e])[0]
        )
    assert total.item() == pytest.approx(full.item(), abs=1e-12)
    assert torch.allclose(mb_logp.grad, full_logp.grad, atol=1e-12)
    # Averaging per-micro-batch losses instead is NOT the full-batch loss.
    assert abs(sum(naive).item() / 3 - full.item()) > 1e-3


def test_loss_config_validation():
    with pytest.raises(ValueError):
        LossConfig(aggregation="sum")
    with pytest.raises(ValueError):
        LossConfig(aggregation="constant")  # needs max_completion_len


# --- chunked log-probs and entropy ----------------------------------------------------


def _reference_logp_entropy(hidden, weight, bias, targets, temperature):
    logits = hidden @ weight.T + bias  # [B, L, V], all at once
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    logp_all = logits.log_softmax(-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [B, L]
    entropy = -(logp_all.exp() * logp_all).sum(-1)  # [B, L]
    return logp, entropy


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_chunked_matches_full_logits_values_and_grads(dtype, tol):
    gen = torch.Generator().manual_seed(0)
    b, l, h, v = 2, 5, 8, 13  # 10 tokens in chunks of 3, 3, 3, 1
    hidden = torch.randn(b, l, h, generator=gen, dtype=dtype)
    weight = torch.randn(v, h, generator=gen, dtype=dtype)
    bias = torch.randn(v, generator=gen, dtype=dtype)
    targets = torch.randint(0, v, (b, l), generator=gen)
    g_logp, g_ent = torch.randn(b, l, generator=gen, dtype=dtype), torch.randn(b, l, generator=gen, dtype=dtype)

    results = []
    for fn in ("chunked", "full"):
        hd, wt, bs = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        if fn == "chunked":
            logp, ent = chunked_logprobs_and_entropy(hd, wt, targets, chunk_tokens=3, temperature=0.7, lm_head_bias=bs)
        else:
            logp, ent = _reference_logp_entropy(hd, wt, bs, targets, 0.7)
        ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
        results.append((logp, ent, hd.grad, wt.grad, bs.grad))
    for got, want in zip(*results):
        assert got.dtype == want.dtype
        assert torch.allclose(got, want, atol=tol, rtol=tol)


def test_chunked_gradcheck_and_partial_grads():
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, 4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 5, (1, 4), generator=gen)

    def fn(hd, wt):
        logp, ent = chunked_logprobs_and_entropy(hd, wt, targets, chunk_tokens=3, temperature=1.3)
        return logp, ent

    assert torch.autograd.gradcheck(fn, (hidden, weight))
    frozen = weight.detach()  # the usual case: lm_head frozen, only hidden needs a gradient
    logp, ent = chunked_logprobs_and_entropy(hidden, frozen, targets, chunk_tokens=2)
    (logp.sum() + ent.sum()).backward()
    assert hidden.grad is not None and frozen.grad is None


def test_chunked_saves_no_logits_and_handles_bf16():
    gen = torch.Generator().manual_seed(2)
    b, l, h, v = 2, 8, 16, 64
    hidden = torch.randn(b, l, h, generator=gen).to(torch.bfloat16).requires_grad_()
    weight = torch.randn(v, h, generator=gen).to(torch.bfloat16)
    targets = torch.randint(0, v, (b, l), generator=gen)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        logp, ent = chunked_logprobs_and_entropy(hidden, weight, targets, chunk_tokens=4)
    # Only the inputs are kept for backward: no [tokens, V] (or [chunk, V]) logits.
    assert sorted(saved) == sorted([(b * l, h), (v, h), (b * l,)])
    assert logp.dtype == ent.dtype == torch.float32
    # Reference: the model's own bf16 lm_head, upcast for the softmax.
    ref_logp, ref_ent = _reference_logp_entropy(
        hidden.detach(), weight, torch.zeros(v, dtype=torch.bfloat16), targets, 1.0
    )
    assert torch.allclose(logp, ref_logp, atol=2e-2) and torch.allclose(ent, ref_ent, atol=2e-2)
    (logp.sum() + ent.sum()).backward()
    assert hidden.grad.dtype == torch.bfloat16 and torch.isfinite(hidden.grad.float()).all()


# --- importance weights -----------------------------------------------------------------

# train - rollout log-ratios: row 0 (ln 3, ln 0.25, 0), row 1 (ln 4, ln 1.25, pad). threshold 2.
_ROLLOUT = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.7, -3.0]])
_IS_LOG_RATIO = torch.tensor([[LN(3.0), LN(0.25), 0.0], [LN(4.0), LN(1.25), 50.0]])
_IS_MASK = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)


@pytest.mark.parametrize(
    "level, mode, weights, frac",
    [
        # per token: 3 -> 2, 4 -> 2
        ("token", "truncate", [[2, 0.25, 1], [2, 1.25, 0]], 2 / 5),
        # keep 0.5 <= w <= 2: 3, 0.25 and 4 dropped
        ("token", "mask", [[0, 0, 1], [0, 1.25, 0]], 3 / 5),
        # products: row 0 3 * 0.25 * 1 = 0.75, row 1 4 * 1.25 = 5 -> 2 (its 2 tokens count as truncated)
        ("sequence", "truncate", [[0.75, 0.75, 0.75], [2, 2, 0]], 2 / 5),
        ("sequence", "mask", [[0.75, 0.75, 0.75], [0, 0, 0]], 2 / 5),
        # geometric means: 0.75 ** (1/3) = 0.9085603, 5 ** (1/2) = 2.2360680 -> 2
        ("geometric", "truncate", [[0.9085603] * 3, [2, 2, 0]], 2 / 5),
        ("geometric", "mask", [[0.9085603] * 3, [0, 0, 0]], 2 / 5),
    ],
)
def test_importance_weights(level, mode, weights, frac):
    train = (_ROLLOUT + _IS_LOG_RATIO).requires_grad_()
    w, metrics = importance_weights(train, _ROLLOUT, _IS_MASK, level=level, mode=mode, threshold=2.0)
    assert not w.requires_grad
    assert w.tolist() == [pytest.approx(row, abs=1e-6) for row in weights]
    assert metrics["frac_truncated" if mode == "truncate" else "frac_masked"] == pytest.approx(frac)
    # |log-ratio| over the 5 real tokens: (1.0986123 + 1.3862944 + 0 + 1.3862944 + 0.2231436) / 5
    assert metrics["mismatch_abs"] == pytest.approx(0.8188689, abs=1e-6)
    # k3 = exp(x) - x - 1: 0.9013877 + 0.6362944 + 0 + 1.6137056 + 0.0268564 = 3.1782441, / 5
    assert metrics["mismatch_kl"] == pytest.approx(0.6356488, abs=1e-6)
    assert metrics["is_weight_mean"] == pytest.approx(sum(sum(r) for r in weights) / 5, abs=1e-6)


# --- dynamic sampling and overlong filtering ------------------------------------------------


def test_dynamic_sampling_keep():
    rewards = torch.tensor([1.0, 1, 1, 0, 1, 0, 0, 0, 0, 2.0, 2.0, 2.2])
    assert dynamic_sampling_keep(rewards, 3).tolist() == [False, True, False, True]


def test_fill_batch_refills_and_truncates():
    asked = []
    rounds = iter(
        [
            (["a0", "a1", "a2", "a3"], torch.tensor([True, False, True, False])),  # 2 kept
            (["b0", "b1", "b2"], [True, True, True]),  # asked for 2, returns 3: one extra dropped
        ]
    )

    def sample_round(n):
        asked.append(n)
        return next(rounds)

    kept, stats = fill_batch(sample_round, target_groups=4, max_rounds=5)
    assert asked == [4, 2]
    assert kept == ["a0", "a2", "b0", "b1"]
    assert stats == {"rounds": 2.0, "groups_sampled": 7.0, "groups_kept": 5.0, "keep_frac": 5 / 7, "filled": 1.0}


def test_fill_batch_round_cap():
    asked = []

    def all_equal_rewards(n):  # every group solved (or failed) by all its samples
        asked.append(n)
        rewards = torch.ones(n * 4)
        return list(range(n)), dynamic_sampling_keep(rewards, 4)

    kept, stats = fill_batch(all_equal_rewards, target_groups=3, max_rounds=2)
    assert kept == [] and asked == [3, 3]
    assert stats["rounds"] == 2.0 and stats["filled"] == 0.0 and stats["keep_frac"] == 0.0

    def one_per_round(n):
        return ["g"] * n, [True] + [False] * (n - 1)

    kept, stats = fill_batch(one_per_round, target_groups=5, max_rounds=3)
    assert kept == ["g"] * 3 and stats["filled"] == 0.0 and stats["groups_sampled"] == 5 + 4 + 3


def test_overlong_mask():
    assert overlong_mask(["stop", "length", "stop", "length"]).tolist() == [False, True, False, True]
    assert overlong_mask([]).shape == (0,)
