#!/bin/bash
# A GPU round that checks and measures the decode path: every GPU-marked test, the rollout benchmark at batch
# 1/8/64 and 128 (7B) and 8/64 (32B), a per-kernel profile of one decode step, and every linear kernel side by
# side; each under its own time limit so that a slow step cannot take the others' output with it. Everything
# lands in OUTDIR (the device's $OUT).
# Usage (repo root, on the GPU machine): bash benchmarks/gpu_round.sh OUTDIR [steps]
#   steps: any of tests rollout b128 profile linear big (default: all, in that order; about 20 minutes)
out=${1:?usage: gpu_round.sh OUTDIR [steps]}; steps=${2:-"tests rollout b128 profile linear big"}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
run() {  # name seconds command...
  local name=$1 secs=$2; shift 2
  echo "== $name"; timeout "$secs" "$@" > "$out/$name.txt" 2>&1; echo "rc $?"
}
R="python -m qerl.cli bench rollout --prompt-len 256 --gen-len 512 --lora-rank 16"
for s in $steps; do case $s in
  tests)  # pytest-xdist (in the GPU image) spreads the tests over 8 processes: their time is mostly Triton compiling
    xd=$(python -c "import xdist" 2>/dev/null && echo "-n 8")
    run tests 480 python -m pytest -q $xd -m gpu tests; tail -2 "$out/tests.txt" ;;
  rollout)
    run rollout7b 240 $R --model-config qwen2.5-7b --quant nvfp4,bf16 --batch 1,8,64 --out "$out/rollout7b.json"
    grep -E "^(qerl|transformers)|copy" "$out/rollout7b.txt" ;;
  b128)
    run b128 150 $R --model-config qwen2.5-7b --quant nvfp4,bf16 --batch 128 --no-hf --without wgmma --out "$out/b128.json"
    grep -E "^qerl" "$out/b128.txt" ;;
  profile)  # per-kernel time of one decode step (eager launches) beside its graph replay, engine defaults
    run profile 200 python benchmarks/profile_decode_gpu.py --quant nvfp4 --batch 1,8,64 --out "$out/profile.json"
    grep -E "^==|graph" "$out/profile.txt" | head -20 ;;
  linear)
    run linear 200 python benchmarks/bench_linear_gpu.py --rows 1,8,16,64,128 --out "$out/linear.json"
    grep "M=" "$out/linear.txt" ;;
  big)
    run big32b 150 $R --model-config qwen2.5-32b --quant nvfp4 --batch 8,64 --no-hf --out "$out/big32b.json"
    grep -E "^qerl|copy" "$out/big32b.txt" ;;
  *) echo "unknown step $s" ;;
esac; done
