"""Which part of the gate|up epilogue launch costs its time at 1-128 rows: the same launch with parts taken away
(LoRA, the second partial, GLU) or the LoRA product done otherwise (fp32 or tf32 dot, FMAs, tiles, absent
modules skipped), over the same partials (Qwen2.5-7B gate|up, version 8's split of 2). "full" is the default
(tf32 dot for the bf16 output since the eighth round, the fp32 dot before; absent modules skipped, and a
16-row block for 5-16 rows, since the ninth).
Usage: python benchmarks/probe_epilogue_gpu.py [--rows 1,8,64,128]
"""

import argparse

import torch

from qerl.bench import graph_time_us
from qerl.kernels.fused_linear import linear_epilogue


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="64,128")
    a = ap.parse_args()
    n = 18944
    for m in map(int, a.rows.split(",")):
        p = torch.randn(2, m, 2 * n, device="cuda")
        h = torch.randn(2, m, 32, device="cuda")
        B = torch.randn(2 * n, 16, device="cuda") * 0.01
        y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        y2 = torch.empty(m, 2 * n, device="cuda", dtype=torch.bfloat16)
        pb = p[0].bfloat16()
        cases = {
            "full (2 partials, LoRA, GLU)": lambda: linear_epilogue(p, None, h, B, 16, 1.0, None, True, out=y),
            "no LoRA": lambda: linear_epilogue(p, None, None, None, 0, 1.0, None, True, out=y),
            "1 partial": lambda: linear_epilogue(p[:1], None, h[:1], B, 16, 1.0, None, True, out=y),
            "no GLU (2N outputs)": lambda: linear_epilogue(p, None, h, B, 16, 1.0, (n, 1 << 30), False, out=y2),
            "bf16 product, LoRA, GLU": lambda: linear_epilogue(pb, None, h, B, 16, 1.0, None, True, out=y),
            "sum of the partials (torch)": lambda: torch.add(p[0], p[1]),
            "LoRA by fp32 (ieee) dot": lambda: linear_epilogue(
                p, None, h, B, 16, 1.0, None, True, out=y, lora_prec="ieee"
            ),
            "LoRA by FMAs, 16 rows": lambda: linear_epilogue(
                p, None, h, B, 16, 1.0, None, True, out=y, block_m=16, lora_dot=False
            ),
            "LoRA by FMAs, 8 rows": lambda: linear_epilogue(
                p, None, h, B, 16, 1.0, None, True, out=y, block_m=8, lora_dot=False
            ),
            "LoRA by tf32 dot, 64x64, 8 warps": lambda: linear_epilogue(
                p, None, h, B, 16, 1.0, None, True, out=y, lora_prec="tf32", block_m=64, block_n=64, num_warps=8
            ),
            "LoRA of absent modules added (no seg_skip)": lambda: linear_epilogue(
                p, None, h, B, 16, 1.0, None, True, out=y, seg_skip=False
            ),
        }
        if m < 16:  # the decode rows (version 7)
            cases.update(
                {
                    "LoRA by FMAs, 8-row block, 32 columns": lambda: linear_epilogue(
                        p, None, h, B, 16, 1.0, None, True, out=y, block_m=8, block_n=32, lora_dot=False, seg_skip=False
                    ),
                    "LoRA by tf32 dot, 16-row block, 32 columns": lambda: linear_epilogue(
                        p, None, h, B, 16, 1.0, None, True, out=y, block_m=16, block_n=32, lora_dot=True
                    ),
                    "LoRA by FMAs, 64 columns": lambda: linear_epilogue(
                        p, None, h, B, 16, 1.0, None, True, out=y, lora_dot=False, block_n=64
                    ),
                }
            )
        ref = linear_epilogue(p, None, h, B, 16, 1.0, None, True, out=torch.empty_like(y)).float()
        for name, f in cases.items():
            if name.startswith("LoRA"):
                f()
                print(f"   {name}: max |diff| to the default (bf16 output) {(y.float() - ref).abs().max().item():.3g}")
            print(
                f"M={m:<3d} {name:40s} {graph_time_us(f):7.1f} us  ({p.numel() * 4 / 1e6:.1f} MB of partials)",
                flush=True,
            )


if __name__ == "__main__":
    main()
