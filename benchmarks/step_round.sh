#!/bin/bash
# A GPU round for the whole RL step: the fast training pass's GPU tests, then `qerl bench step` at the issue's shapes.
# Usage (repo root, on the GPU machine): bash benchmarks/step_round.sh OUTDIR "steps"
#   steps: any of tests step7b prof7b ref7b step32b paper7b lognormal (each under its own time limit)
out=${1:?usage: step_round.sh OUTDIR steps}; steps=${2:-"tests step7b"}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
run() {  # name seconds command...
  local name=$1 secs=$2; shift 2
  echo "== $name"; timeout "$secs" "$@" > "$out/$name.txt" 2>&1; echo "rc $?"
}
B="python -m qerl.cli bench step --model-config"
for s in $steps; do case $s in
  tests) run tests 240 python -m pytest -q -x tests/test_training_gpu.py tests/test_trainer_gpu.py; tail -3 "$out/tests.txt" ;;
  step7b) run step7b 330 $B qwen2.5-7b --quant nvfp4,bf16 --prompts 8 --group-size 8 --prompt-len 256 --gen-len 2048 \
      --lengths full --out "$out/step7b.json"; tail -6 "$out/step7b.txt" ;;
  prof7b) run prof7b 300 $B qwen2.5-7b --quant nvfp4 --prompts 8 --group-size 8 --prompt-len 256 --gen-len 2048 \
      --lengths full --steps 1 --profile "$out" --out "$out/prof7b.json"; tail -3 "$out/prof7b.txt" ;;
  ref7b) run ref7b 300 $B qwen2.5-7b --quant nvfp4 --prompts 8 --group-size 8 --prompt-len 256 --gen-len 2048 \
      --lengths full --update-path reference --steps 1 --out "$out/ref7b.json"; tail -3 "$out/ref7b.txt" ;;
  step32b) run step32b 300 $B qwen2.5-32b --quant nvfp4 --prompts 1 --group-size 8 --prompt-len 256 --gen-len 2048 \
      --lengths full --gpu-mem 60 --out "$out/step32b.json"; tail -3 "$out/step32b.txt" ;;
  paper7b) run paper7b 400 $B qwen2.5-7b --quant nvfp4 --prompts 16 --group-size 8 --prompt-len 256 --gen-len 4096 \
      --lengths full --steps 1 --gpu-mem 75 --out "$out/paper7b.json"; tail -3 "$out/paper7b.txt" ;;
  lognormal) run lognormal 300 $B qwen2.5-7b --quant nvfp4,bf16 --prompts 8 --group-size 8 --prompt-len 256 \
      --gen-len 2048 --lengths lognormal:600 --out "$out/lognormal.json"; tail -4 "$out/lognormal.txt" ;;
esac; done
