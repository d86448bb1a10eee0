"""The rollout engine on a CUDA GPU: same API and greedy outputs as the reference `Engine`, fast.

What differs from the reference engine (and why):
- Static state. The KV cache [L, B_cap, Hkv, S_cap, D], the token/position/key-mask
  buffers and every activation buffer are allocated once per capacity and reused by
  every call, so one decode step is a fixed sequence of launches. Scratch too (split-K
  partials, LoRA partials, a dequantized layer) is the engine's own, sized for every
  bucket at once: a graph keeps the addresses it was captured with, so no buffer it
  uses may be replaced later (the kernels' shared scratch grows by replacement).
- The decode step is CUDA-graph captured, once per batch-size bucket (the row count
  of the call and the powers of two below it). The cache slot and the key count are
  device scalars that the graph itself advances, and attention reads only the filled
  part of the cache, so one graph serves every position.
- Shared prompts. The n samples of a prompt read its keys from the one cache row the prefill wrote them to
  (`decode_attention`'s prefix rows): no copies, and since a group's programs run together, its prompt's keys
  come from DRAM about once a step instead of n times. A compaction gives every live row its own copy.
- Fused launches. q/k/v and gate/up run as one linear each (their packed weights are made adjacent rows of one
  buffer at construction, and the modules' buffers become views of it: no second copy), with bias, live LoRA
  and the SiLU gate fused (`qerl.kernels.fused_linear`); which kernel serves a layer's rows is
  `qerl.kernels.choice.choose_linear_kernel`'s answer, asked once per batch-size bucket at capture. Residual
  add + RMSNorm and RoPE + cache write are one launch each. Where `nvfp4_wgmma` serves a linear (9..128 rows),
  its input's producer (RMSNorm, the attention merge, the gate|up epilogue) writes it in that kernel's plane
  order (`qerl.kernels.common.plane_col`), so TMA copies it as it lies. About 15 launches a layer with LoRA
  (`benchmarks/profile_decode_gpu.py` lists them with their time).
- LoRA stays live: each `generate` copies the current A, B (scaling folded into B)
  into the fused buffers first, so an optimizer step is seen by the next rollout.
  AQN writes the norm weights in place, which the graph reads directly.
- Sampling runs on the GPU between graph replays, no host sync: at temperature > 0 without top-k / top-p
  by the token-draw kernel (`qerl.kernels.token_draw`: the reference's inverse-CDF draw, one read of the
  logits, two launches), else by the reference's `sample_tokens`. The host looks at the finished flags every
  `check_every` steps, and then compacts the live rows into the smallest bucket that holds them, so finished
  rows stop costing work (rows that finished between two checks keep running until the check; their extra
  tokens are masked as in the reference engine).
- Prefill runs the model's own forward with `QuantLinear.backend = "triton"`
  (dequantize one layer into a shared buffer + cuBLAS).

Not supported here (use `Engine`): Qwen3's q/k norm, weight formats without a kernel (nf4).
Under `TRITON_INTERPRET=1` the engine also runs on a CPU model (no graphs; the Triton kernels interpreted, the
linears on the dequantize + matmul path): slow, for debugging its logic and for CI
(tests/test_engine_interpreted.py).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from ..kernels import KernelUnavailable, available
from ..kernels.choice import ALL_KERNELS, LinearKernel, choose_linear_kernel
from ..kernels.common import HAS_TRITON, INTERPRET
from ..kernels.decode_attention import attention_splits, decode_attention
from ..kernels.fused_linear import fused_linear, partials_numel
from ..kernels.lora_shrink import MAX_SPLITS
from ..kernels.rmsnorm import add_rmsnorm
from ..kernels.rope_cache import rope_cache
from ..kernels.token_draw import draw_tokens
from ..modeling import CausalLM, causal_mask, positions_from_mask, rope_inv_freq
from ..quant import QuantLinear
from .engine import Engine
from .sampling import SamplingParams, left_pad, sample_tokens

_WEIGHT_BUFFERS = {
    "nvfp4": ("weight_packed", "weight_scale"),
    "mxfp4": ("weight_packed", "weight_scale"),
    "bf16": ("weight",),
}


@dataclass
class _FusedLinear:
    """One launch over the rows of several modules that share their input."""

    mods: list
    fmt: str
    weight: torch.Tensor  # [N_total, K/2] packed or [N_total, K] dense; the modules' buffers are views of it
    scale: torch.Tensor | None
    gs: torch.Tensor | None  # [n_modules] fp32 (nvfp4)
    bias: torch.Tensor | None
    A: torch.Tensor | None  # [R_total, K] fp32
    B: torch.Tensor | None  # [N_total, r] fp32, scaling folded in
    rank: int
    segments: tuple[int, int] | None
    glu: bool
    in_features: int
    dense: torch.Tensor | None = None  # bf16 weights in the activation dtype, for cuBLAS (None: use weight)

    @property
    def n_out(self) -> int:
        return self.weight.shape[0] // 2 if self.glu else self.weight.shape[0]


def _fuse(mods: list, glu: bool = False) -> _FusedLinear:
    for m in mods:
        if not isinstance(m, QuantLinear):
            raise KernelUnavailable(f"CudaEngine needs QuantLinear layers, got {type(m).__name__}")
    fmt = mods[0].format.name
    if fmt not in _WEIGHT_BUFFERS or any(m.format.name != fmt for m in mods):
        raise KernelUnavailable(
            f"CudaEngine has no kernel for the weight format(s) "
            f"{sorted({m.format.name for m in mods})}; use the reference qerl.rollout.Engine"
        )
    fused = {}
    for name in _WEIGHT_BUFFERS[fmt]:
        parts = [getattr(m, name) for m in mods]
        if len(parts) == 1:
            fused[name] = parts[0]
            continue
        cat = torch.cat(parts, 0)
        off = 0
        for m, p in zip(mods, parts):  # the modules now view the fused buffer: no second copy
            m._buffers[name] = cat[off : off + p.shape[0]]
            off += p.shape[0]
        fused[name] = cat
    sizes = [m.out_features for m in mods]
    segments = None
    if len(mods) > 1:
        bounds = [sum(sizes[: i + 1]) for i in range(len(sizes) - 1)] + [1 << 30] * (3 - len(sizes))
        segments = (bounds[0], bounds[1])
    dev = mods[0].weight_packed.device if fmt != "bf16" else mods[0].weight.device
    n_total, k = sum(sizes), mods[0].in_features
    ranks = {m.lora_rank for m in mods if m.lora_rank}
    if len(ranks) > 1:
        raise KernelUnavailable(f"CudaEngine fuses modules with one LoRA rank, got {sorted(ranks)}")
    rank = ranks.pop() if ranks else 0
    return _FusedLinear(
        mods=mods,
        fmt=fmt,
        weight=fused[_WEIGHT_BUFFERS[fmt][0]],
        scale=fused["weight_scale"].view(torch.uint8) if fmt != "bf16" else None,
        gs=torch.cat([m.weight_global_scale.float().reshape(1) for m in mods]) if fmt == "nvfp4" else None,
        bias=torch.empty(n_total, dtype=mods[0].bias.dtype, device=dev) if mods[0].bias is not None else None,
        A=torch.zeros(rank * len(mods), k, dtype=torch.float32, device=dev) if rank else None,
        B=torch.zeros(n_total, rank, dtype=torch.float32, device=dev) if rank else None,
        rank=rank,
        segments=segments,
        glu=glu,
        in_features=k,
    )


class _Clock:
    """A CUDA event on a GPU (time on the device's stream), the host's clock under Triton's interpreter."""

    def __init__(self, device: torch.device):
        self.event = torch.cuda.Event(enable_timing=True) if device.type == "cuda" else None
        self.t = 0.0

    def record(self):
        if self.event is None:
            self.t = time.perf_counter()
        else:
            self.event.record()

    def synchronize(self):
        if self.event is not None:
            self.event.synchronize()

    def elapsed_time(self, end: _Clock) -> float:
        """Milliseconds from this one to end."""
        return self.event.elapsed_time(end.event) if self.event is not None else (end.t - self.t) * 1e3


class CudaEngine(Engine):
    """`generate(prompts, params, generator) -> Rollout`, as `Engine`, with the decode step in CUDA graphs."""

    def __init__(
        self,
        model: CausalLM,
        tokenizer,
        eos_ids: list[int] | None = None,
        check_every: int = 16,
        use_graphs: bool = True,
        kernels: frozenset[LinearKernel] = ALL_KERNELS,
    ):
        """eos_ids: overrides the tokenizer's ([] for benchmarks that must run to the length limit);
        check_every: decode steps between looks at the finished flags; use_graphs: CUDA graphs (off: eager
        launches, for debugging); kernels: the linear kernels `choose_linear_kernel` may pick (tests narrow it)."""
        interpreted = INTERPRET and HAS_TRITON and model.device.type == "cpu"  # debugging and CI: see the module doc
        if not interpreted and (not available() or model.device.type != "cuda"):
            raise KernelUnavailable(
                "CudaEngine needs a CUDA device and Triton; use the reference qerl.rollout.Engine here"
            )
        a = model.args
        if a.qk_norm:
            raise KernelUnavailable(
                "CudaEngine does not support q/k-norm models (Qwen3) yet; use the reference qerl.rollout.Engine"
            )
        super().__init__(model, tokenizer, cache_weights=False)
        if eos_ids is not None:
            self.eos_ids = list(eos_ids)
        self.check_every, self.use_graphs, self.kernels = (
            check_every,
            use_graphs and not interpreted,
            frozenset(kernels),
        )
        self.layers = []
        for layer in model.model.layers:
            at, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                SimpleNamespace(
                    ln1=layer.input_layernorm.weight,
                    ln2=layer.post_attention_layernorm.weight,
                    qkv=_fuse([at.q_proj, at.k_proj, at.v_proj]),
                    o=_fuse([at.o_proj]),
                    gu=_fuse([mlp.gate_proj, mlp.up_proj], glu=True),
                    down=_fuse([mlp.down_proj]),
                )
            )
        for f in self._fused():
            if f.fmt == "bf16" and f.weight.dtype != model.dtype:  # e.g. an fp32 model with bf16 weights
                f.dense = f.weight.to(model.dtype)
        self.inv_freq = rope_inv_freq(a, model.device)
        self.cap = (0, 0)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None
        self.last_stats: dict = {}

    # --- state -----------------------------------------------------------------------
    def _fused(self):
        return [f for L in self.layers for f in (L.qkv, L.o, L.gu, L.down)]

    @torch.no_grad()
    def refresh_weights(self):
        """Copy the live LoRA adapters and biases into the fused buffers (start of every generate)."""
        for f in self._fused():
            name = _WEIGHT_BUFFERS[f.fmt][0]
            off = 0
            for m in f.mods:
                t = getattr(m, name)
                if t.data_ptr() != f.weight[off:].data_ptr():
                    raise RuntimeError(
                        "a fused module's weight was replaced after CudaEngine was built; build a new engine"
                    )
                off += t.shape[0]
            if f.bias is not None:
                torch.cat([m.bias for m in f.mods], out=f.bias)
            if f.rank:
                r, off = f.rank, 0
                for i, m in enumerate(f.mods):
                    n = m.out_features
                    if m.lora_rank and m.lora_enabled:
                        f.A[i * r : (i + 1) * r].copy_(m.lora_A)
                        torch.mul(m.lora_B, m.lora_scaling, out=f.B[off : off + n])
                    else:
                        f.A[i * r : (i + 1) * r].zero_()
                        f.B[off : off + n].zero_()
                    off += n

    def _ensure_capacity(self, rows: int, length: int):
        if rows <= self.cap[0] and length <= self.cap[1]:
            return
        a, dev, dt = self.model.args, self.model.device, self.model.dtype
        b, s = max(rows, self.cap[0]), max(length, self.cap[1])
        self.graphs.clear()
        self.pool = None
        self.k = self.v = None
        torch.cuda.empty_cache()
        shape = (a.num_layers, b, a.num_kv_heads, s, a.head_dim)
        self.k = torch.zeros(shape, dtype=dt, device=dev)
        self.v = torch.zeros(shape, dtype=dt, device=dev)
        i32 = dict(dtype=torch.int32, device=dev)
        self.tok = torch.zeros(b, dtype=torch.long, device=dev)
        self.pos = torch.zeros(b, dtype=torch.long, device=dev)
        self.slot = torch.zeros(1, **i32)
        self.nkeys = torch.ones(1, **i32)
        self.keymask = torch.ones((b, s), dtype=torch.int8, device=dev)
        self.src = torch.arange(b, **i32)  # the cache row holding row b's prompt keys (below plen)
        self.plen = torch.zeros(1, **i32)
        self.resid = torch.zeros((b, a.hidden_size), dtype=dt, device=dev)
        self.y = torch.zeros((b, a.hidden_size), dtype=dt, device=dev)
        qkv_n = max(L.qkv.n_out for L in self.layers)
        self.qkv = torch.zeros((b, qkv_n), dtype=dt, device=dev)
        self.q = torch.zeros((b, a.num_heads, a.head_dim), dtype=dt, device=dev)
        self.att = torch.zeros((b, a.num_heads * a.head_dim), dtype=dt, device=dev)
        self.o = torch.zeros((b, a.hidden_size), dtype=dt, device=dev)
        self.act = torch.zeros((b, a.intermediate_size), dtype=dt, device=dev)
        self.d = torch.zeros((b, a.hidden_size), dtype=dt, device=dev)
        self.logits = torch.zeros((b, a.vocab_size), dtype=dt, device=dev)
        fl = self._fused()
        self.y0 = torch.zeros(b * max(f.weight.shape[0] for f in fl), dtype=dt, device=dev)
        self.deq = None  # the engine's own dequantization buffer (one layer): graphs keep its address
        if any(f.fmt != "bf16" and self._kernel(f, b) is LinearKernel.CUBLAS for f in fl):
            self.deq = torch.empty(max(f.weight.shape[0] * f.in_features for f in fl), dtype=dt, device=dev)
        hmax = max([MAX_SPLITS * b * f.A.shape[0] for f in self._fused() if f.rank] or [1])  # any split count
        self.hbuf = torch.zeros(hmax, dtype=torch.float32, device=dev)
        # split-K partials of every bucket's graphs (their own: a shared buffer that grew would be freed under them)
        shapes = {(f.fmt, f.weight.shape[0], f.in_features, f.glu): f for f in fl}
        part = max(partials_numel(x, *key, self._kernel(f, x)) for key, f in shapes.items() for x in range(1, b + 1))
        self.part = torch.zeros(max(part, 1), dtype=torch.float32, device=dev)
        self.nsplit = {}
        ns_max = max(attention_splits(x, a.num_kv_heads, s, self._sms()) for x in range(1, b + 1))
        self.ws_o = torch.zeros(b * a.num_heads * ns_max * a.head_dim, dtype=torch.float32, device=dev)
        self.ws_ml = torch.zeros(b * a.num_heads * ns_max * 2, dtype=torch.float32, device=dev)
        self.cap = (b, s)

    def _sms(self) -> int:
        if self.model.device.type != "cuda":  # Triton's interpreter: few programs (attention splits) run faster
            return 2
        return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count

    # --- one decode step (captured) ------------------------------------------------------
    def _kernel(self, f: _FusedLinear, m: int) -> LinearKernel:
        return choose_linear_kernel(m, f.fmt, f.in_features, self.model.device, self.model.dtype, allow=self.kernels)

    def _planes(self, f: _FusedLinear, m: int) -> bool:
        """Whether f's input is written in plane order at m rows: what its kernel (`nvfp4_wgmma`) reads."""
        return self._kernel(f, m) is LinearKernel.WGMMA

    def _linear(self, f: _FusedLinear, x: torch.Tensor, out: torch.Tensor, out_planes: bool = False) -> torch.Tensor:
        return fused_linear(
            x,
            f.fmt,
            f.dense if f.dense is not None else f.weight,
            f.scale,
            f.gs,
            f.bias,
            None,
            f.B,
            f.rank,
            1.0,
            f.segments,
            f.glu,
            out,
            lora_A=f.A,
            kernel=self._kernel(f, x.shape[0]),
            h_out=self.hbuf,
            dense_out=self.deq,
            product_out=self.y0,
            x_planes=self._planes(f, x.shape[0]),
            out_planes=out_planes,
            partials_out=self.part,
        )

    def _decode_step(self, b: int):
        a, m = self.model.args, self.model
        ns = attention_splits(b, a.num_kv_heads, self.cap[1], self._sms())
        ws = (
            self.ws_o[: b * a.num_heads * ns * a.head_dim].view(b, a.num_heads, ns, a.head_dim),
            self.ws_ml[: b * a.num_heads * ns * 2].view(b, a.num_heads, ns, 2),
        )
        resid, y = self.resid[:b], self.y[:b]
        torch.index_select(m.model.embed_tokens.weight, 0, self.tok[:b], out=resid)
        delta = None
        for i, L in enumerate(self.layers):
            add_rmsnorm(resid, L.ln1, a.rms_norm_eps, delta=delta, out=y, planes=self._planes(L.qkv, b))
            qkv = self._linear(L.qkv, y, self.qkv[:b, : L.qkv.n_out])
            q = rope_cache(
                qkv,
                self.pos,
                self.slot,
                self.inv_freq,
                self.k[i],
                self.v[i],
                a.num_heads,
                a.num_kv_heads,
                a.head_dim,
                q_out=self.q[:b],
            )
            att = decode_attention(
                q,
                self.k[i],
                self.v[i],
                self.keymask,
                self.nkeys,
                ns,
                out=self.att[:b],
                workspace=ws,
                planes=self._planes(L.o, b),
                prefix_rows=self.src,
                prefix_len=self.plen,
            )
            o = self._linear(L.o, att, self.o[:b])
            add_rmsnorm(resid, L.ln2, a.rms_norm_eps, delta=o, out=y, planes=self._planes(L.gu, b))
            act = self._linear(L.gu, y, self.act[:b], out_planes=self._planes(L.down, b))
            delta = self._linear(L.down, act, self.d[:b])
        add_rmsnorm(resid, m.model.norm.weight, a.rms_norm_eps, delta=delta, out=y)
        torch.mm(y, m.lm_head.weight.t(), out=self.logits[:b])
        self.pos[:b] += 1
        self.slot += 1
        self.nkeys += 1

    def _run_step(self, b: int):
        if not self.use_graphs:
            return self._decode_step(b)
        g = self.graphs.get(b)
        if g is None:
            saved = [t.clone() for t in (self.pos, self.slot, self.nkeys)]
            self._decode_step(b)  # compiles the kernels; its cache write is redone by the real step
            for t, s in zip((self.pos, self.slot, self.nkeys), saved):
                t.copy_(s)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(g, pool=self.pool):
                self._decode_step(b)
            self.graphs[b] = g
        g.replay()

    # --- prefill and the loop ------------------------------------------------------------------
    @contextlib.contextmanager
    def _triton_backend(self):
        mods = [m for m in self.model.modules() if isinstance(m, QuantLinear)]
        old = [m.backend for m in mods]
        for m in mods:
            m.backend = "triton"
        try:
            yield
        finally:
            for m, o in zip(mods, old):
                m.backend = o

    def _prefill_into_cache(self, prompts: list[list[int]]):
        dev = self.model.device
        ids, attn = left_pad(prompts, self.pad_id, dev)
        p = ids.shape[1]
        view = SimpleNamespace(k=self.k[:, : len(prompts)], v=self.v[:, : len(prompts)])
        with self._triton_backend():
            hidden = self.model(ids, positions_from_mask(attn), causal_mask(attn), view, start=0)
            logits = self.model.logits(hidden[:, -1])
        return logits, attn, p

    @staticmethod
    def _buckets(rows: int) -> list[int]:
        return sorted({rows} | {1 << i for i in range(rows.bit_length()) if (1 << i) < rows})

    def _generate(self, ids, params: SamplingParams, gen):
        n_prompts, max_new = len(ids), params.max_new_tokens
        rows = n_prompts * params.n
        p = max(len(x) for x in ids)
        self._ensure_capacity(rows, p + max_new)
        self.refresh_weights()
        dev = self.model.device
        t_start = time.perf_counter()
        ev = [_Clock(dev) for _ in range(3)]
        ev[0].record()
        logits, attn, p = self._prefill_into_cache(ids)
        lengths = attn.sum(1)
        # The n samples of prompt i read its keys from cache row i, where the prefill wrote them (row i's own
        # tokens go after them, from slot p on): no copies, and a group's prompt is read about once a step.
        self.src.copy_(torch.arange(self.src.numel(), device=dev) // params.n)
        self.plen.fill_(p if params.n > 1 else 0)
        if params.n > 1:
            logits, attn, lengths = (x.repeat_interleave(params.n, 0) for x in (logits, attn, lengths))
        buckets = self._buckets(rows)
        b = buckets[-1]
        self.keymask.fill_(1)
        self.keymask[:rows, :p] = attn.to(torch.int8)
        self.pos[:rows] = lengths
        self.slot.fill_(p)
        self.nkeys.fill_(p + 1)
        slot_row = torch.arange(b, device=dev)
        done = torch.zeros(b, dtype=torch.bool, device=dev)
        out_tok = torch.full((rows + 1, max_new), self.pad_id, dtype=torch.long, device=dev)  # last row: trash
        out_lp = torch.zeros((rows + 1, max_new), dtype=torch.float32, device=dev)
        eos = torch.tensor(self.eos_ids, dtype=torch.long, device=dev)
        limit = torch.cat([params.row_limits(rows, dev), torch.tensor([max_new], device=dev)])  # + the trash row
        ev[1].record()
        steps = 0
        fast_draw = params.temperature > 0 and not params.top_k and params.top_p >= 1.0
        for t in range(max_new):
            if fast_draw:
                seed = torch.randint(2**31 - 1, (1,), device=dev, generator=gen)
                tok, lp = draw_tokens(logits, params.temperature, seed)
            else:
                tok, lp = sample_tokens(logits, params.temperature, params.top_k, params.top_p, gen)
            out_tok[:, t].index_copy_(0, slot_row, tok)
            out_lp[:, t].index_copy_(0, slot_row, lp)
            done |= torch.isin(tok, eos)
            if params.row_max_tokens is not None:  # only then: no per-step work for the common case
                done |= limit[slot_row] <= t + 1
            if t + 1 == max_new:
                break
            self.tok[:b].copy_(tok)
            if (t + 1) % self.check_every == 0:
                if params.stop:
                    tails = out_tok[slot_row, max(0, t + 1 - self.check_every - 8) : t + 1]
                    done |= self._hit_stop(tails, params.stop)
                done_h = done.cpu()
                live = (~done_h).nonzero().squeeze(-1)
                if live.numel() == 0:
                    break
                nb = next(x for x in buckets if x >= live.numel())
                if nb < b:
                    slot_row, done, b = self._compact(live.to(dev), nb, slot_row, done, rows, p, p + t + 1)
            self._run_step(b)
            steps += 1
            logits = self.logits[:b]
        ev[2].record()
        ev[2].synchronize()
        self.last_stats = dict(
            prefill_ms=ev[0].elapsed_time(ev[1]),
            decode_ms=ev[1].elapsed_time(ev[2]),
            decode_steps=steps,
            rows=rows,
            wall_s=time.perf_counter() - t_start,
        )
        out_tok, out_lp = out_tok[:rows], out_lp[:rows]
        mask = torch.zeros_like(out_tok, dtype=torch.bool)
        finish = []
        limits = limit[:rows].tolist()
        for i, row in enumerate(out_tok.tolist()):
            # The earlier of EOS and a stop string ends the row (padding may be the EOS id), else its limit.
            ends = [
                next((j + 1 for j, x in enumerate(row) if x in self.eos_ids), None),
                self._stop_len(row, params.stop),
            ]
            n = min((e for e in ends if e), default=None)
            n = n if n and n <= limits[i] else None
            finish.append("stop" if n else "length")
            mask[i, : n or limits[i]] = True
        out_tok = out_tok.masked_fill(~mask, self.pad_id)
        return out_tok.cpu(), out_lp.masked_fill(~mask, 0.0).cpu(), mask.cpu(), finish

    def _compact(self, live: torch.Tensor, nb: int, slot_row, done, rows: int, p: int, filled: int):
        """Move the live rows to the front of the static buffers and continue in bucket nb; each takes a copy
        of its prompt's keys (below p), so rows stop sharing them."""
        n = live.numel()
        src = self.src[live].long()
        for c in (self.k, self.v):  # (each right side is gathered whole before it is written)
            c[:, :n, :, p:filled] = c[:, live, :, p:filled]
            c[:, :n, :, :p] = c[:, src, :, :p]
        self.src.copy_(torch.arange(self.src.numel(), device=self.src.device))
        self.plen.zero_()
        for t in (self.tok, self.pos, self.keymask):
            t[:n] = t[live]
        new_row = torch.full((nb,), rows, dtype=slot_row.dtype, device=slot_row.device)  # fillers write to trash
        new_row[:n] = slot_row[live]
        new_done = torch.ones(nb, dtype=torch.bool, device=done.device)
        new_done[:n] = False
        return new_row, new_done, nb
