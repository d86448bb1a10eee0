"""The rollout engine against plain full-recompute references (no KV cache, one prompt at a time).

The model is a tiny random Llama (weights N(0, 0.2^2): peaked next-token distributions, so greedy
decoding has clear argmax margins) in NVFP4 with a live LoRA adapter whose B is random, and a
character tokenizer: every token is one character, which makes stop strings easy to place.
"""

from __future__ import annotations

import pytest
import torch
from conftest import char_tokenizer, make_tiny_checkpoint, qerl_logits

from qerl.loading import load_model
from qerl.lora import adapter_disabled, lora_parameters
from qerl.rollout import Engine, SamplingParams, sample_tokens

PROMPTS = ["Hello", "What is 2+2? Answer:", "x", "The quick brown fox"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("eng") / "llama", "llama", seed=5, std=0.2)
    model, tok = load_model(str(path), quant="nvfp4", lora_rank=4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return Engine(model, tok)


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def reference_greedy(model, prompt: list[int], max_new: int, eos: list[int], min_margin: float = 1e-3):
    """Plain greedy decoding: recompute the whole sequence each step, argmax of the last logits."""
    seq, toks, lps = list(prompt), [], []
    for _ in range(max_new):
        logits = qerl_logits(model, torch.tensor([seq]))[0, -1]
        top2 = logits.topk(2).values
        assert top2[0] - top2[1] > min_margin, "argmax too close to call: pick another seed"
        t = int(logits.argmax())
        toks.append(t)
        lps.append(float(logits.log_softmax(-1)[t]))
        if t in eos:
            break
        seq.append(t)
    return toks, lps


def fresh_logits(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """Logits [L, V] predicting each completion token, from one forward pass over prompt + completion."""
    full = torch.tensor([prompt + completion])
    return qerl_logits(model, full)[0, len(prompt) - 1 : len(prompt) - 1 + len(completion)]


def _rows(r):
    """Per row: (tokens, log-probs) of the generated part."""
    return [(r.completion_ids[i][r.mask[i]].tolist(), r.logprobs[i][r.mask[i]]) for i in range(len(r.mask))]


# --- greedy ------------------------------------------------------------------------------------
def test_temperature_zero_equals_full_recompute_greedy(engine):
    tok = engine.tokenizer
    r = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=24))
    assert r.completion_ids.shape == (4, 24) and r.n == 1
    assert r.prompt_ids == [_ids(tok, p) for p in PROMPTS]
    finished = []
    for i, (toks, lps) in enumerate(_rows(r)):
        ref_toks, ref_lps = reference_greedy(engine.model, _ids(tok, PROMPTS[i]), 24, engine.eos_ids)
        assert toks == ref_toks, i
        torch.testing.assert_close(lps, torch.tensor(ref_lps), rtol=0, atol=1e-4)
        finished.append(r.finish_reasons[i])
        assert r.finish_reasons[i] == ("stop" if ref_toks[-1] in engine.eos_ids else "length")
        assert r.texts[i] == tok.decode(toks, skip_special_tokens=True)
    assert "stop" in finished and "length" in finished  # both endings occur with this seed


def test_mixed_lengths_batch_equals_one_by_one(engine):
    params = SamplingParams(temperature=0, max_new_tokens=16)
    batch = engine.generate(PROMPTS, params)
    for i, p in enumerate(PROMPTS):
        one = engine.generate([p], params)
        assert _rows(one)[0][0] == _rows(batch)[i][0]
        torch.testing.assert_close(_rows(one)[0][1], _rows(batch)[i][1], rtol=0, atol=1e-5)
        assert one.finish_reasons[0] == batch.finish_reasons[i]


# --- sampling and log-probs --------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_fresh_forward(engine, temperature):
    tok = engine.tokenizer
    r = engine.generate(PROMPTS[:2], SamplingParams(temperature=temperature, max_new_tokens=20, n=3, seed=3))
    assert len(r.finish_reasons) == 6
    for i, (toks, lps) in enumerate(_rows(r)):
        prompt = _ids(tok, PROMPTS[i // 3])  # samples are grouped by prompt
        ref = (fresh_logits(engine.model, prompt, toks) / temperature).log_softmax(-1)
        torch.testing.assert_close(lps, ref.gather(-1, torch.tensor(toks)[:, None]).squeeze(-1), rtol=0, atol=1e-4)


def truncated_logprobs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """log p of every token under temperature, then top-k, then top-p (renormalized each time).

    top-p keeps the smallest set of most likely tokens whose mass reaches p (the token that crosses
    p is kept). Written with an explicit loop over the sorted tokens of each row.
    """
    out = torch.full_like(logits, float("-inf"))
    for row in range(logits.shape[0]):
        p = (logits[row].double() / temperature).softmax(-1)
        order = p.argsort(descending=True).tolist()
        keep = order[:top_k] if top_k else order
        mass = sum(p[j] for j in keep)
        kept, acc = [], 0.0
        for j in keep:
            kept.append(j)
            acc += float(p[j] / mass)
            if acc >= top_p:
                break
        total = sum(p[j] for j in kept)
        for j in kept:
            out[row, j] = float(torch.log(p[j] / total))
    return out


@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (0, 0.8), (10, 0.6)])
def test_top_k_top_p_logprobs_are_under_the_truncated_distribution(engine, top_k, top_p):
    tok = engine.tokenizer
    temperature = 0.9
    r = engine.generate(
        PROMPTS[:2], SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=12, n=2, seed=4)
    )
    truncated_somewhere = False
    for i, (toks, lps) in enumerate(_rows(r)):
        logits = fresh_logits(engine.model, _ids(tok, PROMPTS[i // 2]), toks)
        ref = truncated_logprobs(logits, temperature, top_k, top_p)
        picked = ref.gather(-1, torch.tensor(toks)[:, None]).squeeze(-1)
        assert torch.isfinite(picked).all()  # every sampled token is inside the truncated support
        torch.testing.assert_close(lps, picked.float(), rtol=0, atol=1e-4)
        full = (logits / temperature).log_softmax(-1).gather(-1, torch.tensor(toks)[:, None]).squeeze(-1)
        truncated_somewhere |= bool((lps - full).abs().max() > 1e-3)
    assert truncated_somewhere  # the truncation did change log-probs


def test_sample_tokens_draws_from_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]]).repeat(40000, 1)
    g = torch.Generator().manual_seed(0)
    tok, lp = sample_tokens(logits, 1.0, generator=g)
    freq = torch.bincount(tok, minlength=5).float() / len(tok)
    probs = logits[0].softmax(-1)
    assert (freq - probs).abs().max() < 0.01  # 40k draws: standard error < 0.0025
    torch.testing.assert_close(lp, probs.log()[tok])
    tok, lp = sample_tokens(logits[:3], 1.0, top_k=2, generator=g)
    assert set(tok.tolist()) <= {0, 1}
    tok, lp = sample_tokens(logits[:2], 0.0)
    assert tok.tolist() == [0, 0]


# --- ending sequences ---------------------------------------------------------------------------
def test_eos_ends_sequences_and_length_otherwise(engine):
    r = engine.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=24, n=6, seed=7))
    eos = engine.eos_ids
    assert eos == [1]
    reasons = set()
    for i in range(len(r.mask)):
        row = r.completion_ids[i].tolist()
        n = int(r.mask[i].sum())
        assert r.mask[i, :n].all() and not r.mask[i, n:].any()  # the mask is a prefix
        first_eos = next((j for j, t in enumerate(row) if t in eos), None)
        if first_eos is not None and first_eos < n:
            assert n == first_eos + 1 and r.finish_reasons[i] == "stop"
        else:
            assert n == 24 and r.finish_reasons[i] == "length"
        assert all(t == engine.pad_id for t in row[n:]) and (r.logprobs[i, n:] == 0).all()
        reasons.add(r.finish_reasons[i])
    assert reasons == {"stop", "length"}


def _stop_case(engine, width: int = 2):
    """-> (greedy rollout, row, stop string, its end in characters): a `width`-character stop string
    that first appears mid-way through one row's greedy completion and in no other row."""
    full = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=24))
    for row in sorted(range(len(PROMPTS)), key=lambda j: -len(full.texts[j])):
        text = full.texts[row]
        for start in range(4, 12):
            stop = text[start : start + width]
            if (
                len(stop) == width
                and text.find(stop) == start
                and all(stop not in t for j, t in enumerate(full.texts) if j != row)
            ):
                return full, row, stop, start + width
    raise AssertionError(f"no usable stop string in {full.texts}")


@pytest.mark.parametrize("width", [2, 10])  # 10 characters = 10 tokens here: longer than a fixed tail
def test_stop_string_ends_only_its_sequence(engine, width):
    full, row, stop, end = _stop_case(engine, width)
    r = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=24, stop=(stop,)))
    assert r.finish_reasons[row] == "stop"
    assert r.texts[row] == full.texts[row][:end] and r.lengths[row] == end  # one token per character
    for j in set(range(len(PROMPTS))) - {row}:  # other rows continue exactly as without the stop string
        assert _rows(r)[j][0] == _rows(full)[j][0] and r.finish_reasons[j] == full.finish_reasons[j]


def test_stop_string_when_pad_is_eos(engine):
    """Many tokenizers have no pad token and qerl pads with EOS: padding must not count as output."""
    tok = char_tokenizer()
    tok.pad_token = tok.eos_token
    eng = Engine(engine.model, tok)
    assert eng.pad_id == 1 and eng.eos_ids == [1]
    full, row, stop, end = _stop_case(eng)
    r = eng.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=24, stop=(stop,)))
    assert r.finish_reasons[row] == "stop"
    assert r.lengths[row] == end and r.texts[row] == full.texts[row][:end]
    assert r.completion_ids[row, end:].tolist() == [1] * (24 - end) and (r.logprobs[row, end:] == 0).all()


# --- n samples, seeds, live weights -------------------------------------------------------------
def test_n_samples_share_the_prompt_and_seeds_reproduce(engine):
    params = SamplingParams(temperature=1.0, max_new_tokens=16, n=4, seed=11)
    a = engine.generate(PROMPTS[:2], params)
    b = engine.generate(PROMPTS[:2], params)
    assert a.completion_ids.shape == (8, 16) and len(a.prompt_ids) == 2
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.logprobs, b.logprobs)
    c = engine.generate(PROMPTS[:2], SamplingParams(temperature=1.0, max_new_tokens=16, n=4, seed=12))
    assert not torch.equal(a.completion_ids, c.completion_ids)
    assert len({tuple(t) for t in a.completion_ids[:4].tolist()}) > 1  # the 4 samples differ
    g = torch.Generator().manual_seed(11)  # an explicit generator is the same as the seed
    d = engine.generate(PROMPTS[:2], SamplingParams(temperature=1.0, max_new_tokens=16, n=4), generator=g)
    assert torch.equal(a.completion_ids, d.completion_ids)
    # at temperature 0 the n copies of the shared prefill all equal the n = 1 result
    g1 = engine.generate(PROMPTS[:2], SamplingParams(temperature=0, max_new_tokens=16))
    g4 = engine.generate(PROMPTS[:2], SamplingParams(temperature=0, max_new_tokens=16, n=4))
    assert torch.equal(g4.completion_ids, g1.completion_ids.repeat_interleave(4, 0))


def test_engine_samples_from_the_live_adapter(engine):
    params = SamplingParams(temperature=0, max_new_tokens=12)
    before = engine.generate(PROMPTS[:1], params)
    layer = engine.model.model.layers[0].self_attn.o_proj
    saved = layer.lora_B.detach().clone()
    try:
        with torch.no_grad():
            layer.lora_B.mul_(-3.0)  # an optimizer step, in effect
        after = engine.generate(PROMPTS[:1], params)
        ref, _ = reference_greedy(engine.model, _ids(engine.tokenizer, PROMPTS[0]), 12, engine.eos_ids, 0.0)
        assert _rows(after)[0][0] == ref and _rows(after)[0][0] != _rows(before)[0][0]
    finally:
        with torch.no_grad():
            layer.lora_B.copy_(saved)
    with adapter_disabled(engine.model):
        base = engine.generate(PROMPTS[:1], params)
    assert _rows(base)[0][0] != _rows(before)[0][0]
    assert engine.model.training is False


# --- the real default model ---------------------------------------------------------------------
def test_smollm2_greedy_equals_transformers_generate(smollm2_dir):
    """SmolLM2-135M-Instruct, qerl bf16 vs `transformers` generate on the same weights (fp32 compute)."""
    from conftest import chat_prompt, hf_model, hf_with_bf16_linears

    model, tok = load_model(str(smollm2_dir), quant="bf16", lora_rank=0)
    hf = hf_with_bf16_linears(hf_model(smollm2_dir))
    questions = ["What is 2 + 3? Answer with a number.", "Name a color of the sky."]
    prompts = [chat_prompt(tok, q) for q in questions]
    r = Engine(model, tok).generate(prompts, SamplingParams(temperature=0, max_new_tokens=20))
    for i, p in enumerate(prompts):
        ids = torch.tensor([_ids(tok, p)])
        with torch.no_grad():
            out = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=20,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        assert _rows(r)[i][0] == out[0, ids.shape[1] :].tolist()
        torch.testing.assert_close(qerl_logits(model, ids), hf(ids).logits.float().detach(), rtol=1e-4, atol=1e-4)
    assert "5" in r.texts[0] and r.finish_reasons == ["stop", "stop"]


def test_generate_leaves_no_folded_or_cached_weights(engine):
    engine.generate(PROMPTS[:1], SamplingParams(temperature=0, max_new_tokens=4))
    mods = [m for m in engine.model.modules() if hasattr(m, "_folded")]
    assert mods and all(m._folded is None and m._cache is None for m in mods)
