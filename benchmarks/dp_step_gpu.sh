#!/bin/bash
# Data-parallel RL on N GPUs against one, in one call (issue 22): `qerl bench step` on GPU 0 alone, then the same
# command under torchrun with one rank per GPU (NCCL); prints both and the step throughput ratio. Defaults: the
# issue's shape, Qwen2.5-7B NVFP4, 16 prompts x 8 x (256 + 2048), full lengths; more bench-step options after N.
# Usage (repo root, on the GPU machine): bash benchmarks/dp_step_gpu.sh OUTDIR [N] [--steps 1 ...]
out=${1:?usage: dp_step_gpu.sh OUTDIR [N] [bench step options]}; n=${2:-$(nvidia-smi -L | wc -l)}; shift; shift
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # NVLink multicast stays off
args=(--model-config qwen2.5-7b --quant nvfp4 --prompts 16 --group-size 8 --prompt-len 256 --gen-len 2048
      --lengths full "$@")
CUDA_VISIBLE_DEVICES=0 python -m qerl bench step "${args[@]}" --out "$out/dp1.json" 2>&1 | tee "$out/dp1.txt"
torchrun --standalone --nproc-per-node "$n" -m qerl bench step "${args[@]}" --out "$out/dp$n.json" 2>&1 \
  | tee "$out/dp$n.txt"
python - "$out/dp1.json" "$out/dp$n.json" <<'PY'
import json, sys
one, many = (json.load(open(p))["rows"][0] for p in sys.argv[1:])
print(f"\n{many['ranks']} ranks vs 1: step {one['step_s']:.2f} -> {many['step_s']:.2f} s, "
      f"{one['step_tok_s']:.0f} -> {many['step_tok_s']:.0f} tok/s a step ({many['step_tok_s'] / one['step_tok_s']:.2f}x), "
      f"all-reduce {many['allreduce_s']:.3f} s a step, peak per rank "
      + " / ".join(f"{p:.1f}" for p in many["peak_gib_ranks"]) + " GiB allocated")
PY
