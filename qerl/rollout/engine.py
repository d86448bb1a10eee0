"""The reference rollout engine: batched sampling from the live model (quantized base + LoRA + AQN noise), in
plain PyTorch on any device; the CUDA engine (`qerl.rollout.cuda`) subclasses it.

One engine and one copy of the weights serve training rollouts and evaluation. The
decode path reads top to bottom, as in gpt-fast:

    sample_tokens  - temperature / top-k / top-p, inverse-CDF sampling with no host sync
    prefill        - unique prompts once, left-padded, into a preallocated KV cache
    decode_one     - one token for every active row at a fixed cache position
    decode         - the loop: EOS / stop strings / length, finished rows compacted away
    generate       - strings or ids in, `Rollout` out

n samples per prompt share one prefill: the prompt's KV cache is copied n times
(`KVCache.repeat_interleave`) instead of being recomputed. Log-probs are those of the
distribution each token was drawn from (after temperature, top-k and top-p); at
temperature 0 (greedy) they are the plain log-softmax.
"""

from __future__ import annotations

import contextlib

import torch

from ..modeling import CausalLM, KVCache, causal_mask, positions_from_mask
from ..quant import QuantLinear
from .sampling import Rollout, SamplingParams, left_pad, sample_tokens


@contextlib.contextmanager
def dequant_cache(model: torch.nn.Module, enabled: bool = True):
    """Keep dequantized weights between forwards (CPU speed) inside the block.

    Nests: modules that were already caching (e.g. for a whole CPU training run) keep
    their cache; the others drop theirs on exit.
    """
    mods = [m for m in model.modules() if isinstance(m, QuantLinear)]
    before = [m.cache_dequantized for m in mods]
    for m in mods:
        m.cache_dequantized = m.cache_dequantized or enabled
    try:
        yield
    finally:
        for m, was in zip(mods, before):
            m.cache_dequantized = was
            if not was:
                m.clear_cache()


@contextlib.contextmanager
def folded_weights(model: torch.nn.Module, dtype: torch.dtype, enabled: bool = True):
    """For one rollout (weights fixed while it runs) every QuantLinear computes with one dense
    weight, deq(W) + (alpha/r) B A, instead of base + two small LoRA GEMMs (CPU speed).

    Folded afresh on entry, so the adapter as it is now is always the one sampled from, and
    dropped on exit. Memory: one dense copy of the base, as a per-call `dequant_cache` holds
    (plus the run-wide cache, if one is held). Forwards with autograd on ignore it.
    """
    mods = [m for m in model.modules() if isinstance(m, QuantLinear)] if enabled else []
    try:
        for m in mods:
            m.fold_lora(dtype)
        yield
    finally:
        for m in mods:
            m.unfold_lora()


class Engine:
    def __init__(self, model: CausalLM, tokenizer, cache_weights: bool | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.eos_ids = self._eos_ids(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        # On CPU the dequantization costs as much as the matmul: cache during a rollout.
        self.cache_weights = model.device.type == "cpu" if cache_weights is None else cache_weights

    @staticmethod
    def _eos_ids(tok) -> list[int]:
        ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
            i = tok.convert_tokens_to_ids(t) if t in tok.get_vocab() else None
            if i is not None:
                ids.add(i)
        return sorted(ids)

    # --- the decode path ------------------------------------------------------------
    def prefill(self, prompts: list[list[int]], max_new: int):
        """Left-pad, run all prompt tokens once, return (last logits [B, V], cache, key mask, lengths)."""
        dev = self.model.device
        ids, attn = left_pad(prompts, self.pad_id, dev)
        p = ids.shape[1]
        a = self.model.args
        cache = KVCache(a.num_layers, len(prompts), a.num_kv_heads, p + max_new, a.head_dim, self.model.dtype, dev)
        hidden = self.model(ids, positions_from_mask(attn), causal_mask(attn), cache, start=0)
        logits = self.model.logits(hidden[:, -1])
        keys = torch.ones((len(prompts), p + max_new), dtype=torch.bool, device=dev)
        keys[:, :p] = attn.bool()
        return logits, cache, keys, attn.sum(1)

    def decode_one(self, tok: torch.Tensor, pos: torch.Tensor, cache: KVCache, keys: torch.Tensor, start: int):
        """tok [B], pos [B] rotary positions; writes cache slot `start`; -> logits [B, V]."""
        mask = keys[:, None, None, : start + 1]
        hidden = self.model(tok[:, None], pos[:, None], mask, cache, start=start)
        return self.model.logits(hidden[:, -1])

    def decode(self, logits, cache, keys, lengths, params: SamplingParams, gen):
        b, p = logits.shape[0], keys.shape[1] - params.max_new_tokens
        dev = logits.device
        out_tok = torch.full((b, params.max_new_tokens), self.pad_id, dtype=torch.long, device=dev)
        out_lp = torch.zeros((b, params.max_new_tokens), dtype=torch.float32, device=dev)
        finish = ["length"] * b
        ends = [params.max_new_tokens] * b  # tokens each row generated, its EOS or stop string included
        eos = torch.tensor(self.eos_ids, device=dev)
        limit = params.row_limits(b, dev)
        rows = torch.arange(b, device=dev)  # original row of each slot in the running batch
        alive = torch.ones(b, dtype=torch.bool, device=dev)
        for t in range(params.max_new_tokens):
            tok, lp = sample_tokens(logits, params.temperature, params.top_k, params.top_p, gen)
            live = rows[alive]
            out_tok[live, t], out_lp[live, t] = tok[alive], lp[alive]
            done = torch.isin(tok, eos) & alive
            if params.stop:
                done |= self._hit_stop(out_tok[rows, : t + 1], params.stop) & alive
            if t + 1 == params.max_new_tokens:
                for r in rows[done].tolist():
                    finish[r] = "stop"
                break
            full = (limit[rows] <= t + 1) & alive & ~done
            if bool((done | full).any()):
                for r in rows[done].tolist():
                    finish[r], ends[r] = "stop", t + 1
                for r in rows[full].tolist():
                    ends[r] = t + 1
                alive &= ~(done | full)
                n_alive = int(alive.sum())
                if n_alive == 0:
                    break
                # Finished rows stop costing work, but copying the KV cache is not free:
                # compact only once a quarter of the running batch has finished.
                if n_alive <= 0.75 * len(rows):
                    keep = alive.nonzero().squeeze(-1)
                    rows, tok, alive = rows[keep], tok[keep], alive[keep]
                    cache, keys, lengths = self._compact(cache, keys, lengths, keep)
            logits = self.decode_one(tok, lengths + t, cache, keys, p + t)
        # Lengths come from the loop, not from scanning the output: padding may be the EOS id.
        mask = torch.arange(params.max_new_tokens, device=dev) < torch.tensor(ends, device=dev)[:, None]
        out_tok = out_tok.masked_fill(~mask, self.pad_id)
        return out_tok, out_lp.masked_fill(~mask, 0.0), mask, finish

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str] | list[list[int]],
        params: SamplingParams | None = None,
        generator: torch.Generator | None = None,
    ) -> Rollout:
        """Strings or token ids in, `Rollout` out: the template both engines share (they differ in `_generate`)."""
        params = params or SamplingParams()
        ids = [
            self.tokenizer(p, add_special_tokens=False).input_ids if isinstance(p, str) else list(p) for p in prompts
        ]
        if generator is None:
            generator = torch.Generator(self.model.device)
            generator.manual_seed(params.seed if params.seed is not None else torch.seed())
        was_training = self.model.training
        self.model.eval()
        try:
            tok, lp, mask, finish = self._generate(ids, params, generator)
        finally:
            self.model.train(was_training)
        tok, lp, mask = tok.cpu(), lp.cpu(), mask.cpu()
        texts = [self.tokenizer.decode(r[m].tolist(), skip_special_tokens=True) for r, m in zip(tok, mask)]
        return Rollout(ids, tok, mask, lp, finish, texts, params.n)

    def _generate(self, ids: list[list[int]], params: SamplingParams, gen: torch.Generator):
        """-> (tokens [N, L], log-probs [N, L], mask [N, L], finish reasons), N = prompts * params.n."""
        with folded_weights(self.model, self.model.dtype, self.cache_weights):
            logits, cache, keys, lengths = self.prefill(ids, params.max_new_tokens)
            if params.n > 1:
                cache = cache.repeat_interleave(params.n, keys.shape[1] - params.max_new_tokens)
                logits, keys, lengths = (x.repeat_interleave(params.n, 0) for x in (logits, keys, lengths))
            return self.decode(logits, cache, keys, lengths, params, gen)

    # --- helpers -------------------------------------------------------------------
    @staticmethod
    def _compact(cache: KVCache, keys, lengths, keep):
        cache.k, cache.v = cache.k[:, keep], cache.v[:, keep]
        return cache, keys[keep], lengths[keep]

    @staticmethod
    def _stop_window(stop) -> int:
        # Tokens to decode when looking for a stop string: a token is at least one character
        # (char- and byte-level tokenizers), so a stop string spans at most len(s) tokens; +8 slack.
        return 8 + max((len(s) for s in stop), default=0)

    def _hit_stop(self, toks: torch.Tensor, stop) -> torch.Tensor:
        # Decode a short tail only: a stop string spans few tokens.
        tails = self.tokenizer.batch_decode(toks[:, -self._stop_window(stop) :].tolist())
        return torch.tensor([any(s in x for s in stop) for x in tails], device=toks.device)

    def _stop_len(self, row: list[int], stop) -> int | None:
        if not stop:
            return None
        w = self._stop_window(stop)
        for j in range(len(row)):
            if any(s in self.tokenizer.decode(row[max(0, j + 1 - w) : j + 1]) for s in stop):
                return j + 1
        return None
