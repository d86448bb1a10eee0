#!/bin/bash
# Before/after on one GPU in one call: this tree against BASE (a `git archive <commit> qerl benchmarks` of the
# code before, unpacked), each step under its own time limit; everything lands in OUTDIR (the device's $OUT).
# Usage (repo root, on the GPU machine): bash benchmarks/ab_gpu.sh OUTDIR BASE_DIR "steps"
#   steps: any of tests (the decode path's GPU tests, this tree), sampling (token draw, this tree), attention
#   (shared prompt keys or not, this tree), rollout
#   (7B decode at temperature 0.7, batch 1-128, both trees; bf16 this tree), step (7B 8x8x(256+2048) full, both trees; bf16 this
#   tree), full (the same, this tree only, both formats), lognormal (the same with lognormal:600 lengths, this
#   tree, both formats), probe (`dev/ragged_step_probe.py 4`: NVFP4 lognormal steps, any non-finite model
#   tensor named after each), big (32B 1x8x(256+2048) at a 60 GiB cap, this tree, one measured step)
#   BASE_DIR is read only by rollout and step (give . otherwise)
out=$(realpath "${1:?usage: ab_gpu.sh OUTDIR BASE_DIR steps}"); base=$(realpath "${2:?}"); steps=${3:-"tests sampling rollout"}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
run() {  # name seconds dir command...: run in dir with PYTHONPATH there, output to OUTDIR/name.txt
  local name=$1 secs=$2 dir=$3; shift 3
  echo "== $name"; (cd "$dir" && PYTHONPATH=. timeout "$secs" "$@") > "$out/$name.txt" 2>&1; echo "rc $?"
}
R="python -m qerl.cli bench rollout --model-config qwen2.5-7b --prompt-len 256 --gen-len 512 --lora-rank 16 --no-hf --temperature 0.7"
S="python -m qerl.cli bench step --model-config qwen2.5-7b --prompts 8 --group-size 8 --prompt-len 256 --gen-len 2048"
for s in $steps; do case $s in
  tests)
    xd=$(python -c "import xdist" 2>/dev/null && echo "-n 8")
    run tests 200 . python -m pytest -q $xd -m gpu tests/test_token_draw.py tests/test_engine_cuda.py \
      tests/test_nvfp4_wgmma.py tests/test_kernels.py; tail -3 "$out/tests.txt" ;;
  attention) run attention 90 . python benchmarks/bench_attention_gpu.py --out "$out/attention.json"; grep rows "$out/attention.txt" ;;
  sampling) run sampling 60 . python benchmarks/bench_sampling_gpu.py --out "$out/sampling.json"; cat "$out/sampling.txt" ;;
  rollout)
    run rollout_old 170 "$base" $R --quant nvfp4 --batch 1,8,16,64,128 --out "$out/rollout_old.json"
    run rollout_new 200 . $R --quant nvfp4,bf16 --batch 1,8,16,64,128 --out "$out/rollout_new.json"
    grep -E "^qerl|copy" "$out/rollout_old.txt" | sed 's/^/old /'; grep -E "^qerl|copy" "$out/rollout_new.txt" | sed 's/^/new /' ;;
  step)
    run step_old 200 "$base" $S --quant nvfp4 --lengths full --out "$out/step_old.json"
    run step_new 330 . $S --quant nvfp4,bf16 --lengths full --out "$out/step_new.json"
    tail -4 "$out/step_old.txt" | sed 's/^/old /'; tail -6 "$out/step_new.txt" | sed 's/^/new /' ;;
  lognormal) run lognormal 330 . $S --quant nvfp4,bf16 --lengths lognormal:600 --out "$out/lognormal.json"
    tail -6 "$out/lognormal.txt" ;;
  full) run full 330 . $S --quant nvfp4,bf16 --lengths full --out "$out/full.json"; tail -6 "$out/full.txt" ;;
  probe) run probe 200 . python dev/ragged_step_probe.py 4; cat "$out/probe.txt" ;;
  big) run big 300 . ${S/qwen2.5-7b --prompts 8/qwen2.5-32b --prompts 1} --quant nvfp4 --lengths full --gpu-mem 60 \
      --steps 1 --out "$out/big.json"; tail -4 "$out/big.txt" ;;
  *) echo "unknown step $s" ;;
esac; done
