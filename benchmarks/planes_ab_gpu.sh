#!/bin/bash
# A/B of the decode linears before and after x in plane order by TMA (issue 17), in one call on one GPU:
# the per-kernel table (bench_linear_gpu.py) and the rollout benchmark, the old tree (BASE: a `git archive` of the
# commit before, with its benchmarks/) against this one.
# Usage (repo root, on the GPU machine): bash benchmarks/planes_ab_gpu.sh OUTDIR BASE_DIR
out=${1:?usage: planes_ab_gpu.sh OUTDIR BASE_DIR}; base=${2:?}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
R="python -m qerl.cli bench rollout --model-config qwen2.5-7b --prompt-len 256 --gen-len 512 --lora-rank 16 --no-hf --batch 16,64,128"
(cd "$base" && PYTHONPATH=. timeout 150 python benchmarks/bench_linear_gpu.py --rows 16,32,64,128 --out "$out/linear_old.json" > "$out/linear_old.txt" 2>&1); echo "linear old rc $?"
PYTHONPATH=. timeout 150 python benchmarks/bench_linear_gpu.py --rows 16,32,64,128 --out "$out/linear_new.json" > "$out/linear_new.txt" 2>&1; echo "linear new rc $?"
grep "M=" "$out/linear_old.txt" | sed 's/^/old /'; grep "M=" "$out/linear_new.txt" | sed 's/^/new /'
(cd "$base" && PYTHONPATH=. timeout 170 $R --quant nvfp4 --out "$out/rollout_old.json" > "$out/rollout_old.txt" 2>&1); echo "rollout old rc $?"
PYTHONPATH=. timeout 170 $R --quant nvfp4,bf16 --out "$out/rollout_new.json" > "$out/rollout_new.txt" 2>&1; echo "rollout new rc $?"
grep -E "^qerl|copy" "$out/rollout_old.txt" | sed 's/^/old /'; grep -E "^qerl|copy" "$out/rollout_new.txt" | sed 's/^/new /'
