"""Same as `qerl bench rollout` (kept here so benchmarks live apart from tests).

python benchmarks/bench_rollout_gpu.py --model-config qwen2.5-7b --quant nvfp4,bf16 --batch 1,8,64
"""

from qerl.cli import app

if __name__ == "__main__":
    import sys

    app(["bench", "rollout", *sys.argv[1:]])
