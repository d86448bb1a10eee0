"""Tile sweep of two decode-step kernels on one GPU: the split-KV decode attention and the `nvfp4_wgmma` linear,
each config checked against a reference before it is timed, today's default beside the best.

attention (`qerl.kernels.decode_attention`, model shapes of `--model`: Qwen2.5-7B has 28 q heads, 4 kv heads,
head dim 128, bf16): for each batch in `--rows` and context in `--ctx`, a random KV cache [B, Hkv, S_cap, D]
(S_cap = the largest context + 64, one cache per batch as in the engine, whose split count also reads S_cap),
left padding on every 16th row, n_keys an int32 device scalar as the engine's. Phase 1: split counts from
`attention_splits(waves=w)` for w in `--waves` (waves giving the same split count are timed once), x
`--blocks` keys a loop step x `--warps`, at Triton's default num_stages (3 on CUDA, so 3 is not swept again);
phase 2: the `--stage-top` fastest of phase 1 again at each of `--stages` (the pruning that keeps this part
near 90 s: <= 162 timings instead of 378 for the full grid). Each config's output is first
compared with fp32 softmax attention in PyTorch (max |err| / max |ref| < 2e-2, else WRONG, not timed); the time
is the whole `decode_attention` call (split + merge launch).
Byte model: the cache's K and V rows up to the context, B * ctx * Hkv * D * 2 tensors * 2 bytes (pad slots are
read too); GB/s = those bytes / time, and "% of copy" divides that by the device-to-device copy rate measured
in the same run, counted as bytes read + written per second (as bench_linear_gpu.py does).

wgmma (`qerl.kernels.nvfp4_wgmma`, the fused layers q|k|v, o, gate|up, down of `--model`): for each row count
in `--rows` (16..128), the call the engine makes (`CudaEngine._linear`): x already in plane order, bias on
q|k|v, LoRA rank `--rank` live with its shrink fused into the product (A [rank * modules, K], B
[N, rank]), segments and one global scale per fused module, gate|up with the SiLU gate and its output in
plane order; the whole `fused_linear` call (product + epilogue) is timed. Configs: `wgmma_config(m, n, k,
num_warps, programs)` for `--wg-warps` x `--programs`, with NS in `--ns` and PF in {False, True} (True only up
to 64 rows; at 128 the registers run out); configs that come out the same tile (same SPLIT) are timed once.
n is what `fused_linear` passes: the output columns, half the weight rows for gate|up, whose launch then has
about twice `programs` programs (each line shows the launch's real grid, LoRA shrink programs included).
Each is checked against today's default tile (relative error < 1e-3, else WRONG). GB/s: packed weight +
scales (0.5625 bytes a weight) / time, "% of copy" as above. At the end: per shape class and rows, the config
with the least time summed over the class's layers, as a `WG_TILES` dict.

Every timing is `qerl.bench.graph_time_us` (median of CUDA-graph replays, L2 not flushed). Configs that fail to
compile or run print one FAIL line and are skipped; past `--budget-s` the rest print SKIPPED. `--out` is
written after the attention part and at exit (SIGTERM included); the summary lines are printed again at the
end. `--dry-run` (no GPU needed) prints the grids' sizes and a rough time (defaults: ~230 s on an H100).
Usage: python benchmarks/sweep_decode_gpu.py [--what attention,wgmma] [--rows 64,128] [--ctx 512,1280,2304]
       [--budget-s 240] [--out FILE.json] [--dry-run]
"""

import argparse
import inspect
import json
import math
import signal
import sys
import time

import torch

from qerl.bench import copy_bandwidth, graph_time_us, random_nvfp4_layers
from qerl.kernels.choice import LinearKernel, choose_linear_kernel
from qerl.kernels.common import to_planes
from qerl.kernels.decode_attention import attention_splits, decode_attention
from qerl.kernels.fused_linear import fused_linear
from qerl.kernels.lora_shrink import MAX_SPLITS
from qerl.kernels.nvfp4_wgmma import WG_TILES, wg_tile_key, wgmma_config
from qerl.modeling import ModelArgs

ATT_TOL = 2e-2  # max |out - ref| / max |ref|
WG_TOL = 1e-3  # ||y - y_default|| / ||y_default||
DEV, DTYPE = "cuda", torch.bfloat16  # (a CPU test of the script's own logic swaps these)


def ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


SUMMARY: list[str] = []  # the "==" lines, printed again at the end (a long log's tail keeps them)
DEADLINE = [math.inf]  # --budget-s: past it, configs not yet measured are skipped


def summary_line(text: str):
    SUMMARY.append(text)
    print(text, flush=True)


def out_of_time(what: str) -> bool:
    if time.perf_counter() < DEADLINE[0]:
        return False
    print(f"  SKIPPED (--budget-s spent) {what}", flush=True)
    return True


def fail_line(what: str, e: Exception) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"  FAIL {what}: {type(e).__name__}: {first[:160]}"


# ---- attention ---------------------------------------------------------------------------------------------------
def att_key(c: dict) -> tuple:
    return (c["nsplit"], c["block_keys"], c["num_warps"], c["num_stages"])


def att_label(c: dict) -> str:
    st = "default" if c["num_stages"] is None else c["num_stages"]
    return f"splits {c['nsplit']} (waves {c['waves']}) keys {c['block_keys']} warps {c['num_warps']} stages {st}"


def attention_phase1(batch: int, hkv: int, s_cap: int, sms: int, waves, blocks, warps) -> tuple[list[dict], dict]:
    """Phase-1 configs (one per distinct split count x block_keys x num_warps, Triton's default num_stages) and
    today's default config (`attention_splits`' waves, 32 keys, 4 warps), which is always among them."""
    by_ns: dict[int, list[int]] = {}
    default_waves = inspect.signature(attention_splits).parameters["waves"].default
    for w in sorted(set(waves) | {default_waves}):
        by_ns.setdefault(attention_splits(batch, hkv, s_cap, sms, waves=w), []).append(w)
    lab = {ns: ",".join(map(str, ws)) for ns, ws in by_ns.items()}
    cfgs = [
        dict(nsplit=ns, waves=lab[ns], block_keys=bk, num_warps=nw, num_stages=None)
        for ns in by_ns
        for bk in blocks
        for nw in warps
    ]
    ns0 = attention_splits(batch, hkv, s_cap, sms)
    default = dict(nsplit=ns0, waves=lab[ns0], block_keys=32, num_warps=4, num_stages=None)
    if att_key(default) not in {att_key(c) for c in cfgs}:
        cfgs.insert(0, default)
    return cfgs, default


def attention_reference(q, kc, vc, mask, ctx: int) -> torch.Tensor:
    """fp32 softmax attention of q [B, Hq, D] over the first ctx keys with mask != 0, GQA: -> [B, Hq * D]."""
    b, hq, d = q.shape
    hkv = kc.shape[1]
    qf = q.float().view(b, hkv, hq // hkv, d)
    k, v = kc[:b, :, :ctx].float(), vc[:b, :, :ctx].float()
    s = torch.einsum("bhgd,bhsd->bhgs", qf, k) / math.sqrt(d)
    s = s.masked_fill(mask[:b, None, None, :ctx] == 0, float("-inf"))
    return torch.einsum("bhgs,bhsd->bhgd", torch.softmax(s, -1), v).reshape(b, hq * d)


def sweep_attention(a, args: ModelArgs, bw: float, rows: list[dict]) -> list[dict]:
    best_rows = []
    for b in ints(a.rows):
        best_rows += attention_batch(a, args, b, bw, rows)
        torch.cuda.empty_cache()
    return best_rows


def attention_batch(a, args: ModelArgs, b: int, bw: float, rows: list[dict]) -> list[dict]:
    """One batch size: one cache, every context of `--ctx`; appends each measurement to rows, returns the
    per-context summaries."""
    hq, hkv, d = args.num_heads, args.num_kv_heads, args.head_dim
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    ctxs, waves, blocks, warps, stages = ints(a.ctx), ints(a.waves), ints(a.blocks), ints(a.warps), ints(a.stages)
    s_cap = max(ctxs) + 64
    best_rows = []
    gen = torch.Generator(DEV)
    gen.manual_seed(b)
    kc = torch.randn(b, hkv, s_cap, d, device=DEV, dtype=DTYPE, generator=gen)
    vc = torch.randn(b, hkv, s_cap, d, device=DEV, dtype=DTYPE, generator=gen)
    q = torch.randn(b, hq, d, device=DEV, dtype=DTYPE, generator=gen)
    out = torch.empty(b, hq * d, device=DEV, dtype=DTYPE)
    phase1, default = attention_phase1(b, hkv, s_cap, sms, waves, blocks, warps)
    ns_max = max(c["nsplit"] for c in phase1)
    ws_o = torch.empty(b * hq * ns_max * d, device=DEV, dtype=torch.float32)
    ws_ml = torch.empty(b * hq * ns_max * 2, device=DEV, dtype=torch.float32)
    for ctx in ctxs:
        t0 = time.perf_counter()
        mask = torch.ones(b, s_cap, device=DEV, dtype=torch.int8)  # the engine's key mask dtype
        for i in range(0, b, 16):  # left padding on a few rows
            mask[i, : (ctx // 8) * (1 + (i // 16) % 4)] = 0
        n_keys = torch.tensor([ctx], device=DEV, dtype=torch.int32)
        ref = attention_reference(q, kc, vc, mask, ctx)
        ref_max = ref.abs().max().item()
        nbytes = b * ctx * hkv * d * 2 * 2
        res: dict[tuple, dict] = {}

        def measure(c):
            ns = c["nsplit"]
            ws = (ws_o[: b * hq * ns * d].view(b, hq, ns, d), ws_ml[: b * hq * ns * 2].view(b, hq, ns, 2))
            kw = dict(block_keys=c["block_keys"], num_warps=c["num_warps"], num_stages=c["num_stages"])

            def fn():
                decode_attention(q, kc, vc, mask, n_keys, ns, out=out, workspace=ws, **kw)

            row = dict(part="attention", batch=b, ctx=ctx, **c)
            res[att_key(c)] = row
            if out_of_time(f"B={b} ctx={ctx} {att_label(c)}"):
                row["status"] = "SKIPPED"
                return
            rows.append(row)
            try:
                out.fill_(float("nan"))
                fn()
                torch.cuda.synchronize()
                row["err"] = (out.float() - ref).abs().max().item() / ref_max
                if not row["err"] < ATT_TOL:  # (NaN included)
                    row["status"] = "WRONG"
                    print(f"  WRONG B={b} ctx={ctx} {att_label(c)}: err {row['err']:.3g}", flush=True)
                else:
                    us = graph_time_us(fn)
                    gbs = nbytes / us / 1e3
                    row.update(status="ok", us=us, GBs=gbs, pct_copy=100 * gbs * 1e9 / bw)
                    print(
                        f"  B={b:<4d} ctx={ctx:<5d} {att_label(c):58s} {us:8.1f} us {gbs:6.0f} GB/s "
                        f"{row['pct_copy']:4.0f}% of copy  err {row['err']:.1e}",
                        flush=True,
                    )
            except Exception as e:  # does not compile (shared memory, registers) or cannot run: say so, go on
                row.update(status="FAIL", error=f"{type(e).__name__}: {str(e)[:300]}")
                print(fail_line(f"B={b} ctx={ctx} {att_label(c)}", e), flush=True)

        for c in phase1:
            measure(c)
        ok = sorted((r for r in res.values() if r["status"] == "ok"), key=lambda r: r["us"])
        for top in ok[: a.stage_top]:
            for st in stages:
                c = {k: top[k] for k in ("nsplit", "waves", "block_keys", "num_warps")} | dict(num_stages=st)
                if att_key(c) not in res:
                    measure(c)
        ok = sorted((r for r in res.values() if r["status"] == "ok"), key=lambda r: r["us"])
        d0 = res[att_key(default)]
        summary = dict(part="attention_best", batch=b, ctx=ctx, default_us=d0.get("us", float("nan")))
        if ok:
            best = ok[0]
            summary.update(
                best={k: best[k] for k in ("nsplit", "waves", "block_keys", "num_warps", "num_stages")},
                best_us=best["us"],
                speedup=summary["default_us"] / best["us"],
                default_GBs=d0.get("GBs", float("nan")),
                best_GBs=best["GBs"],
                best_pct_copy=best["pct_copy"],
                timed=len(ok),
                seconds=time.perf_counter() - t0,
            )
            summary_line(
                f"== attention B={b} ctx={ctx}: default {summary['default_us']:.1f} us "
                f"({summary['default_GBs']:.0f} GB/s) | best {att_label(best)}: {best['us']:.1f} us "
                f"({best['GBs']:.0f} GB/s, {best['pct_copy']:.0f}% of copy) | {summary['speedup']:.2f}x "
                f"| {len(ok)} timed in {summary['seconds']:.0f} s"
            )
        else:
            summary_line(f"== attention B={b} ctx={ctx}: no config ran")
        best_rows.append(summary)
    return best_rows


# ---- wgmma -------------------------------------------------------------------------------------------------------
def wg_label(lab: tuple) -> str:
    nw, p, ns, pf = lab
    return f"warps {nw} programs {p} NS {ns} PF {int(pf)}"


def wgmma_grid(m: int, n_out: int, k: int, warps, programs, nss) -> tuple[dict, tuple]:
    """{config (as a sorted item tuple): [labels (num_warps, programs, NS, PF) giving it]} and today's default
    config's key (always in the grid). n_out: the product's output columns (gate|up: half the weight rows),
    what `fused_linear` passes `wgmma_config`."""
    grid: dict[tuple, list] = {}
    for nw in warps:
        for p in programs:
            for ns in nss:
                for pf in (False, True) if m <= 64 else (False,):
                    cfg = wgmma_config(m, n_out, k, num_warps=nw, programs=p) | dict(NS=ns, PF=pf)
                    grid.setdefault(tuple(sorted(cfg.items())), []).append((nw, p, ns, pf))
    d = tuple(sorted(wgmma_config(m, n_out, k).items()))
    if d not in grid:
        grid[d] = []
    return grid, d


def engine_operands(layer, args: ModelArgs, m: int, rank: int, gen) -> dict:
    """What `CudaEngine._linear` passes `fused_linear` for this fused layer at m rows, x in plane order."""
    dev, bf = DEV, DTYPE
    qd, kvd = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    n_out = layer.n // 2 if layer.glu else layer.n
    if layer.name == "qkv":
        mods, segments = 3, (qd, qd + kvd)
    elif layer.glu:  # gate|up: two modules, the engine's bounds (i, 1 << 30)
        mods, segments = 2, (n_out, 1 << 30)
    else:
        mods, segments = 1, None
    bias = None
    if layer.name == "qkv" and args.attention_bias:
        bias = torch.randn(layer.n, device=dev, dtype=bf, generator=gen) * 0.02
    x = torch.randn(m, layer.k, device=dev, dtype=bf, generator=gen)
    lora_a = torch.randn(rank * mods, layer.k, device=dev, generator=gen) * 0.01 if rank else None
    lora_b = torch.randn(layer.n, rank, device=dev, generator=gen) * 0.01 if rank else None
    return dict(
        x=x,
        xp=to_planes(x),
        n_out=n_out,
        weight=layer.q["weight_packed"],
        scale=layer.q["weight_scale"].view(torch.uint8),
        gs=layer.gs[:1].repeat(mods).contiguous(),  # one global scale per fused module (equal: quantized as one)
        bias=bias,
        lora_A=lora_a,
        lora_B=lora_b,
        rank=rank,
        r_sh=rank * mods,  # the kernel's LoRA shrink programs a split
        segments=segments,
        glu=layer.glu,
        h_out=torch.empty(MAX_SPLITS * m * max(1, rank * mods), device=dev, dtype=torch.float32),
        out=torch.empty(m, n_out, device=dev, dtype=bf),
    )


def engine_linear(o: dict, x_planes: bool = True, **kw) -> torch.Tensor:
    """`fused_linear` as `CudaEngine._linear` calls it (gate|up writes plane order: down reads it by wgmma)."""
    return fused_linear(
        o["xp"] if x_planes else o["x"],
        "nvfp4",
        o["weight"],
        o["scale"],
        o["gs"],
        o["bias"],
        None,
        o["lora_B"],
        o["rank"],
        1.0,
        o["segments"],
        o["glu"],
        o["out"],
        lora_A=o["lora_A"],
        h_out=o["h_out"],
        x_planes=x_planes,
        out_planes=o["glu"],
        **kw,
    )


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def sweep_wgmma(a, args: ModelArgs, bw: float, rows: list[dict]) -> tuple[list[dict], dict]:
    warps, programs, nss, ms = ints(a.wg_warps), ints(a.programs), ints(a.ns), ints(a.rows)
    W = LinearKernel.WGMMA
    gen = torch.Generator(DEV)
    gen.manual_seed(0)
    best_rows = []
    by_label: dict[tuple, dict[tuple, float]] = {}  # (class, rows bucket, layer) -> {label: us}
    for layer in random_nvfp4_layers(a.model, device=DEV):
        for m in ms:
            t0 = time.perf_counter()
            if out_of_time(f"wgmma {layer.name} M={m}"):
                continue
            o = engine_operands(layer, args, m, a.rank, gen)
            n_out = o["n_out"]
            cls, bucket = wg_tile_key(m, n_out, layer.k)
            pick = choose_linear_kernel(m, "nvfp4", layer.k, o["x"].device, o["x"].dtype)
            if pick is not W:
                print(f"  note: at {m} rows the engine picks {pick.value} for {layer.name}, not wgmma", flush=True)
            grid, dkey = wgmma_grid(m, n_out, layer.k, warps, programs, nss)
            ref = engine_linear(o, kernel=W).clone()  # today's tile (config None: `wgmma_config(m, n_out, k)`)
            o["out"].fill_(float("nan"))
            cub = engine_linear(o, x_planes=False, kernel=LinearKernel.CUBLAS)  # the call itself, another path
            print(f"  {layer.name} M={m}: default tile vs cuBLAS path, rel err {rel(cub, ref):.1e}", flush=True)
            times = by_label.setdefault((cls, bucket, layer.name), {})
            res = {}
            for key, labels in sorted(grid.items(), key=lambda kv: kv[0] != dkey):  # today's tile first
                cfg = dict(key)
                lab = labels[0] if labels else (cfg["num_warps"], "default", cfg["NS"], cfg["PF"])
                # the launch's grid: (weight tiles of all n rows + LoRA shrink programs) x SPLIT
                progs = (-(-layer.n // cfg["BLOCK_N"]) + o["r_sh"]) * cfg["SPLIT"]
                desc = f"{wg_label(lab)} (SPLIT {cfg['SPLIT']}, grid {progs}{', default' if key == dkey else ''})"
                row = dict(part="wgmma", layer=layer.name, cls=cls, m=m, n=layer.n, k=layer.k, config=cfg)
                row.update(labels=[list(x) for x in labels], default=key == dkey, grid_programs=progs)
                res[key] = row
                if out_of_time(f"{layer.name} M={m} {desc}"):
                    row["status"] = "SKIPPED"
                    continue
                rows.append(row)

                def fn(cfg=cfg):
                    engine_linear(o, kernel=W, config=cfg)

                try:
                    o["out"].fill_(float("nan"))
                    fn()
                    torch.cuda.synchronize()
                    row["err"] = rel(o["out"], ref)
                    if not row["err"] < WG_TOL:
                        row["status"] = "WRONG"
                        print(f"  WRONG {layer.name} M={m} {desc}: rel err {row['err']:.3g}", flush=True)
                    else:
                        us = graph_time_us(fn)
                        gbs = layer.nbytes / us / 1e3
                        row.update(status="ok", us=us, GBs=gbs, pct_copy=100 * gbs * 1e9 / bw)
                        for x in labels:
                            times[x] = us
                        print(
                            f"  {layer.name:8s} M={m:<4d} {desc:58s} {us:8.1f} us {gbs:6.0f} GB/s "
                            f"{row['pct_copy']:4.0f}% of copy",
                            flush=True,
                        )
                except Exception as e:
                    row.update(status="FAIL", error=f"{type(e).__name__}: {str(e)[:300]}")
                    print(fail_line(f"{layer.name} M={m} {desc}", e), flush=True)
            ok = sorted((r for r in res.values() if r["status"] == "ok"), key=lambda r: r["us"])
            d0 = res[dkey]
            summary = dict(part="wgmma_best", layer=layer.name, cls=cls, m=m, default=dict(dkey))
            summary["default_us"] = d0.get("us", float("nan"))
            if ok:
                best = ok[0]
                summary.update(
                    best=best["config"],
                    best_labels=best["labels"],
                    best_us=best["us"],
                    speedup=summary["default_us"] / best["us"],
                    best_GBs=best["GBs"],
                    best_pct_copy=best["pct_copy"],
                    seconds=time.perf_counter() - t0,
                )
                bc = best["config"]
                bl = best["labels"][0] if best["labels"] else (bc["num_warps"], "default", bc["NS"], bc["PF"])
                summary_line(
                    f"== wgmma {layer.name} M={m}: default {summary['default_us']:.1f} us | best {wg_label(bl)} "
                    f"(SPLIT {best['config']['SPLIT']}, grid {best['grid_programs']}): {best['us']:.1f} us "
                    f"({best['GBs']:.0f} GB/s, "
                    f"{best['pct_copy']:.0f}% of copy) | {summary['speedup']:.2f}x | {len(ok)} timed in "
                    f"{summary['seconds']:.0f} s"
                )
            else:
                summary_line(f"== wgmma {layer.name} M={m}: no config ran")
            best_rows.append(summary)
        torch.cuda.empty_cache()
    return best_rows, wg_tiles_summary(by_label)


def wg_tiles_summary(by_label: dict) -> dict:
    """Per class and rows bucket, the label with the least time summed over the class's layers (labels timed on
    all of them): any NS/PF, and with NS 1 as (num_warps, programs, PF) (pasteable into `WG_TILES` as is)."""
    groups: dict[tuple, list[dict]] = {}
    for (cls, bkt, _), times in by_label.items():
        groups.setdefault((cls, bkt), []).append(times)
    any_ns, today = {}, {}
    for (cls, bkt), ts in sorted(groups.items()):
        common = set.intersection(*(set(t) for t in ts))
        tot = {lab: sum(t[lab] for t in ts) for lab in common}
        if not tot:
            continue
        best = min(tot, key=tot.get)
        any_ns.setdefault(cls, {})[bkt] = dict(tile=best[:2], NS=best[2], PF=best[3], us_sum=round(tot[best], 2))
        cur = {lab: v for lab, v in tot.items() if lab[2] == 1}
        if cur:
            nw, p, _, pf = min(cur, key=cur.get)
            today.setdefault(cls, {})[bkt] = (nw, p, pf)
    return dict(any_ns_pf=any_ns, wg_tiles=today)


# ---- dry run -----------------------------------------------------------------------------------------------------
def dry_run(a, args: ModelArgs):
    """The grids' sizes without a GPU (132 SMs, as the H100 SXM and H200), and a rough time from ~0.4 s a timing
    (graph_time_us: 10 replays of ~30 ms + capture) and a compile per distinct kernel (~1 s Triton, ~3 s Gluon)."""
    what = a.what.split(",")
    total = 0.0
    if "attention" in what:
        hkv, ctxs = args.num_kv_heads, ints(a.ctx)
        s_cap = max(ctxs) + 64
        n1 = n2 = 0
        kernels = set()
        for b in ints(a.rows):
            cfgs, default = attention_phase1(b, hkv, s_cap, a.sms, ints(a.waves), ints(a.blocks), ints(a.warps))
            p2 = min(a.stage_top, len(cfgs)) * len(ints(a.stages))
            kernels |= {att_key(c) for c in cfgs}
            print(
                f"attention B={b}: splits {sorted({c['nsplit'] for c in cfgs})} (default {default['nsplit']}); "
                f"{len(cfgs)} phase-1 + <= {p2} phase-2 configs, x {len(ctxs)} contexts",
                flush=True,
            )
            n1 += len(cfgs) * len(ctxs)
            n2 += p2 * len(ctxs)
        # phase 2 compiles at most one kernel per (top config, stages) of each shape
        sec = 0.4 * (n1 + n2) + 1.0 * (len(kernels) + n2)
        print(f"attention: {n1} + <= {n2} timings, {len(kernels)} + <= {n2} compiles, ~{sec:.0f} s", flush=True)
        total += sec
    if "wgmma" in what:
        n, kernels, epilogues = 0, set(), set()
        for name, (nr, k, glu) in args.fused_linear_shapes().items():
            n_out = nr // 2 if glu else nr
            for m in ints(a.rows):
                grid, dkey = wgmma_grid(m, n_out, k, ints(a.wg_warps), ints(a.programs), ints(a.ns))
                d = dict(dkey)
                bm = max(16, 1 << (m - 1).bit_length())
                kernels |= {(bm, dict(c)["num_warps"], dict(c)["NS"], dict(c)["PF"]) for c in grid}
                epilogues |= {(name, m, dict(c)["SPLIT"]) for c in grid}
                n += len(grid)
                splits = sorted({dict(c)["SPLIT"] for c in grid})
                print(
                    f"wgmma {name} M={m} ({wg_tile_key(m, n_out, k)[0]}): {len(grid)} distinct configs, SPLITs {splits}; "
                    f"default warps {d['num_warps']} SPLIT {d['SPLIT']} NS {d['NS']} PF {int(d['PF'])}",
                    flush=True,
                )
        sec = 0.4 * n + 3.0 * len(kernels) + 1.0 * len(epilogues)
        print(
            f"wgmma: {n} timings, {len(kernels)} Gluon kernels, <= {len(epilogues)} epilogue kernels, ~{sec:.0f} s",
            flush=True,
        )
        total += sec
    print(f"total ~{total:.0f} s (+ startup, copy bandwidth, random weights)", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--what", default="attention,wgmma")
    ap.add_argument("--model", default="qwen2.5-7b")
    ap.add_argument("--rows", default="64,128", help="attention batch and wgmma rows")
    ap.add_argument("--ctx", default="512,1280,2304")
    ap.add_argument("--waves", default="2,4,8,16", help="attention_splits(waves=...) values")
    ap.add_argument("--blocks", default="32,64,128", help="block_keys values")
    ap.add_argument("--warps", default="4,8", help="attention num_warps values")
    ap.add_argument("--stages", default="2,4", help="num_stages of phase 2 (Triton's default, 3, is phase 1's)")
    ap.add_argument("--stage-top", type=int, default=3, help="phase-1 configs tried again at each --stages")
    ap.add_argument("--wg-warps", default="4,8")
    ap.add_argument("--programs", default="264,528,1056,2112")
    ap.add_argument("--ns", default="1,2")
    ap.add_argument("--rank", type=int, default=16, help="live LoRA rank (the engine's default run: 16)")
    ap.add_argument("--sms", type=int, default=132, help="SM count for --dry-run (the GPU's own otherwise)")
    ap.add_argument("--budget-s", type=float, default=0, help="skip configs not started by then (0: no limit)")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    args = ModelArgs.from_name(a.model)
    if a.dry_run:
        return dry_run(a, args)
    t0 = time.perf_counter()
    if a.budget_s:
        DEADLINE[0] = t0 + a.budget_s
    bw = copy_bandwidth()
    dev = torch.cuda.get_device_name()
    print(f"{dev}; copy {bw / 1e9:.0f} GB/s (read + write); {a.model}; today's WG_TILES {WG_TILES}", flush=True)
    rows: list[dict] = []
    res = dict(device=dev, copy_Bps=bw, model=a.model, args=vars(a), rows=rows)
    what = a.what.split(",")
    # a wall-clock limit's SIGTERM ends the run through `finally`, so the rows measured so far are written
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        if "attention" in what:
            t = time.perf_counter()
            res["attention_best"] = sweep_attention(a, args, bw, rows)
            print(f"attention part: {time.perf_counter() - t:.0f} s", flush=True)
            save(a.out, res, t0)
        if "wgmma" in what:
            t = time.perf_counter()
            res["wgmma_best"], res["wg_tiles_summary"] = sweep_wgmma(a, args, bw, rows)
            print(f"wgmma part: {time.perf_counter() - t:.0f} s", flush=True)
            s = res["wg_tiles_summary"]
            summary_line("least summed time a class and rows bucket at NS 1 (paste into WG_TILES):")
            summary_line(f"WG_TILES = {s['wg_tiles']!r}")
            summary_line(f"the same over any NS / PF: {s['any_ns_pf']!r}")
    finally:  # what was measured is written even if a part stops
        save(a.out, res, t0)
        print("\n".join(["", "summary:"] + SUMMARY), flush=True)
        print(f"total {res['seconds']:.0f} s", flush=True)


def save(path: str | None, res: dict, t0: float):
    res["seconds"] = time.perf_counter() - t0
    if path:
        with open(path, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
