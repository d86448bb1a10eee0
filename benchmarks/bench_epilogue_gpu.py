"""LoRA shrink + split-K epilogue launches at decode row counts (Qwen2.5 layer shapes): what each costs with
the shrink's K chunk (the number of h partials the epilogue sums) and the epilogue's column tile.

Per shape and rows: medians of CUDA-graph replays of `lora_shrink` + `linear_epilogue` over fp32 partials
laid out as `nvfp4_mma_sync` writes them (its default split), rank 16 per module, bias where Qwen2.5 has one.
Usage: python benchmarks/bench_epilogue_gpu.py [--model qwen2.5-7b] [--rows 8,16] [--wgmma] [--out results.json]
(--wgmma: the epilogue after `nvfp4_wgmma`, 9..128 rows, its tile swept)
"""

import argparse
import itertools

import torch

from qerl.bench import graph_time_us, write_rows
from qerl.kernels.linear_epilogue import linear_epilogue
from qerl.kernels.lora_shrink import lora_shrink, shrink_chunk
from qerl.kernels.nvfp4_mma_sync import mma_config
from qerl.kernels.nvfp4_wgmma import wgmma_config
from qerl.modeling import ModelArgs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-7b")
    ap.add_argument("--rows", default="8,16")
    ap.add_argument(
        "--wgmma",
        action="store_true",
        help="rows served by nvfp4_wgmma (9..128): its splits, h from its "
        "shrink programs (one partial a split); sweep the epilogue's rows x columns a program and warps",
    )
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.wgmma:
        return sweep_wgmma(a)
    torch.manual_seed(0)
    results = []
    for name, (n_rows, k, glu) in ModelArgs.from_name(a.model).fused_linear_shapes().items():
        nmod = 3 if name == "qkv" else (2 if glu else 1)
        n = n_rows // 2 if glu else n_rows
        seg = (n_rows * 7 // 9, n_rows * 8 // 9) if name == "qkv" else None
        A = torch.randn(16 * nmod, k, device="cuda") * 0.01
        B = torch.randn(n_rows, 16, device="cuda") * 0.01
        bias = torch.randn(n_rows, device="cuda", dtype=torch.bfloat16) if name == "qkv" else None
        for m in map(int, a.rows.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            split = mma_config(m, n, k)["SPLIT"]
            p = torch.randn(split, m, n_rows, device="cuda")
            y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            base = shrink_chunk(k)
            for chunk in (base, 2 * base, 4 * base):
                if chunk > 2 * k:
                    continue
                h = lora_shrink(x, A, chunk=chunk)
                t_s = graph_time_us(lambda: lora_shrink(x, A, out=h, chunk=chunk))
                if m > 8:  # one row per program (the FMA form) instead of the tf32 dot on 16-row blocks
                    t1 = graph_time_us(lambda: lora_shrink(x, A, out=h, chunk=chunk, block_m=1))
                    print(
                        f"{name:8s} M={m:<3d} shrink chunk {chunk:5d}: 16-row dot {t_s:6.1f} us, one row a program "
                        f"{t1:6.1f} us",
                        flush=True,
                    )
                    results.append(dict(shape=name, m=m, chunk=chunk, shrink_us=t_s, shrink_one_row_us=t1))
                for bn in (16, 32, 64):
                    t_e = graph_time_us(lambda: linear_epilogue(p, bias, h, B, 16, 1.0, seg, glu, out=y, block_n=bn))
                    row = dict(
                        shape=name,
                        m=m,
                        split=split,
                        chunk=chunk,
                        h_splits=h.shape[0],
                        block_n=bn,
                        shrink_us=t_s,
                        epilogue_us=t_e,
                        total_us=t_s + t_e,
                    )
                    results.append(row)
                    print(
                        f"{name:8s} M={m:<3d} split {split:2d} | shrink chunk {chunk:5d} ({h.shape[0]:2d} partials) "
                        f"{t_s:6.1f} us | epilogue BN {bn:3d} {t_e:6.1f} us | total {t_s + t_e:6.1f} us",
                        flush=True,
                    )
    write_rows(a.out, results)


def _exact(p, bias, h, B, seg, glu):
    """The epilogue's sums in fp32 without its bf16 roundings: sum of the partials + bias + each fused module's
    LoRA (rank 16, h's columns 16 s .. 16 s + 15 for module s), then SiLU(gate) * up with glu."""
    y = p.sum(0) + (bias.float() if bias is not None else 0.0)
    n_rows, hs = y.shape[1], h.sum(0)
    bounds = [0, *(seg or ((n_rows // 2,) if glu else ())), n_rows]
    bounds = [b for b in bounds if b <= n_rows]
    for s_, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        y[:, lo:hi] += hs[:, 16 * s_ : 16 * s_ + 16] @ B[lo:hi].T
    return torch.nn.functional.silu(y[:, : n_rows // 2]) * y[:, n_rows // 2 :] if glu else y


def sweep_wgmma(a):
    """The epilogue launch after `nvfp4_wgmma` (h partials: one a split), tiles (rows, columns, warps) a program."""
    results = []
    for name, (n_rows, k, glu) in ModelArgs.from_name(a.model).fused_linear_shapes().items():
        nmod = 3 if name == "qkv" else (2 if glu else 1)
        n = n_rows // 2 if glu else n_rows
        seg = (n_rows * 7 // 9, n_rows * 8 // 9) if name == "qkv" else None
        B = torch.randn(n_rows, 16, device="cuda") * 0.01
        bias = torch.randn(n_rows, device="cuda", dtype=torch.bfloat16) if name == "qkv" else None
        for m in map(int, a.rows.split(",")):
            split = wgmma_config(m, n, k)["SPLIT"]
            p = torch.randn(split, m, n_rows, device="cuda")
            h = torch.randn(split, m, 16 * nmod, device="cuda")
            y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            exact = _exact(p, bias, h, B, seg, glu)

            def err():
                return ((y.float() - exact).norm() / exact.norm()).item()

            default = graph_time_us(lambda: linear_epilogue(p, bias, h, B, 16, 1.0, seg, glu, out=y))
            linear_epilogue(p, bias, h, B, 16, 1.0, seg, glu, out=y)
            e_default = err()
            times, errs = {}, {}
            for bm, bn, nw in itertools.product((16, 32, 64), (16, 32, 64, 128), (4, 8)):
                if bm > max(16, m) or bm * bn > 64 * 128:
                    continue

                def f():
                    return linear_epilogue(
                        p,
                        bias,
                        h,
                        B,
                        16,
                        1.0,
                        seg,
                        glu,
                        out=y,
                        block_n=bn,
                        block_m=bm,
                        num_warps=nw,
                    )

                y.fill_(float("nan"))
                f()
                errs[(bm, bn, nw)] = err()  # against the fp32 sums: the bf16 roundings, as for the default
                times[(bm, bn, nw)] = graph_time_us(f)
            bad = {c: e for c, e in errs.items() if not e <= 1.5 * e_default + 1e-6}
            if bad:
                print(
                    f"{name:8s} M={m:<3d} tiles off the fp32 sums by more than the default ({e_default:.2e}): "
                    + ", ".join(f"{c}: {e:.2e}" for c, e in bad.items()),
                    flush=True,
                )
            best = min((c for c in times if c not in bad), key=times.get)
            mb = (p.numel() * 4 + B.numel() * 4 + y.numel() * 2) / 1e6
            results.append(
                dict(
                    shape=name,
                    m=m,
                    split=split,
                    default_us=default,
                    best=best,
                    best_us=times[best],
                    sweep={f"{x}x{z}w{w}": t for (x, z, w), t in times.items()},
                    mbytes=mb,
                    error_default=e_default,
                    errors={f"{x}x{z}w{w}": e for (x, z, w), e in errs.items()},
                )
            )
            print(
                f"{name:8s} M={m:<3d} split {split:2d} ({mb:6.1f} MB) | default {default:7.1f} us (error "
                f"{e_default:.1e}) | best {times[best]:7.1f} us (rows {best[0]}, columns {best[1]}, warps {best[2]})",
                flush=True,
            )
    write_rows(a.out, results)


if __name__ == "__main__":
    main()
