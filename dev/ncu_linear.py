"""A linear kernel under Nsight Compute: `ncu ... python -m dev.ncu_linear --kernel wgmma --rows 64,128`.

Runs `fused_linear` with the named kernel on one random NVFP4 layer of a known model's decode shapes (default:
Qwen2.5-7B gate|up) at each row count, three launches each (the first warms up: profile with
`--launch-skip 1 --launch-count 2` per row count, or filter by kernel name).
"""

import argparse

import torch

from qerl.bench import random_nvfp4_layers
from qerl.kernels.choice import LinearKernel
from qerl.kernels.fused_linear import fused_linear


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-7b")
    ap.add_argument("--layer", default="gate|up")
    ap.add_argument("--kernel", default="wgmma")
    ap.add_argument("--rows", default="64,128")
    a = ap.parse_args()
    layer = next(random_nvfp4_layers(a.model, only=a.layer))
    q = layer.q
    for m in map(int, a.rows.split(",")):
        x = torch.randn(m, layer.k, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            fused_linear(x, "nvfp4", q["weight_packed"], q["weight_scale"], layer.gs[:1], kernel=LinearKernel(a.kernel))
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
