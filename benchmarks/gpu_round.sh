#!/bin/bash
# A GPU round (one or two device calls) that checks and measures the decode path: the kernel GPU tests, the issue's
# headline command, batch 128 (versions 8 vs cuBLAS, and bf16), the epilogue launch's tiles after version 8
# (tf32 LoRA dot), version 8's 64/128-row tiles and the 32B model, each under its own time limit so that a
# slow step cannot take the others' output with it. Everything lands in OUTDIR (the device's $OUT).
# Usage (from the repo root, on the GPU machine): bash benchmarks/gpu_round.sh "$OUT" [steps]
#   steps: any of tests issue profile b128 probe epilogue kernels big (default: all eight, in that order;
#   up to 30 minutes, so run it as three device calls: "tests issue profile", "b128 probe", then
#   "epilogue kernels big")
out=${1:?usage: gpu_round.sh OUTDIR [steps]}; steps=${2:-"tests issue profile b128 probe epilogue kernels big"}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
run() {  # name seconds command...
  local name=$1 secs=$2; shift 2
  echo "== $name"; timeout "$secs" "$@" > "$out/$name.txt" 2>&1; echo "rc $?"
}
for s in $steps; do case $s in
  tests)
    # pytest-xdist (in the GPU image) spreads the tests over 8 processes: their time is mostly Triton compiling
    xd=$(python -c "import xdist" 2>/dev/null && echo "-n 8")
    run tests 400 python -m pytest -q $xd tests/test_kernels.py tests/test_nvfp4_wgmma.py tests/test_engine_cuda.py \
      tests/test_nvfp4_mma.py -k "fused or epilogue or wgmma or engine or pdl or attention or (matches_reference and 768)"
    tail -2 "$out/tests.txt" ;;
  issue)
    run issue7b 240 python -m qerl.cli bench rollout --model-config qwen2.5-7b --quant nvfp4,bf16 --batch 1,8,64 \
      --prompt-len 256 --gen-len 512 --lora-rank 16 --out "$out/issue7b.json"
    grep -E "^(qerl|transformers)|copy" "$out/issue7b.txt" ;;
  profile)  # per-kernel time of one decode step (eager launches) beside its graph replay, engine defaults
    run profile 200 python benchmarks/profile_decode_gpu.py --quant nvfp4 --batch 1,8,64 --out "$out/profile.json"
    grep -E "^==|graph" "$out/profile.txt" | head -20 ;;
  b128)
    run b128 150 python -m qerl.cli bench rollout --model-config qwen2.5-7b --quant nvfp4,bf16 --batch 128 \
      --prompt-len 256 --gen-len 512 --lora-rank 16 --no-hf --variants no_wgmma --out "$out/b128.json"
    grep -E "^qerl" "$out/b128.txt" ;;
  epilogue)
    run epilogue 200 python benchmarks/bench_epilogue_gpu.py --v8 --rows 16,64,128 --out "$out/epilogue.json"
    grep "M=" "$out/epilogue.txt" ;;
  probe)
    run probe 150 python benchmarks/probe_epilogue_gpu.py --rows 1,8,64,128  # parts and variants of the epilogue
    grep "M=" "$out/probe.txt" ;;
  kernels)
    run kernels 200 python benchmarks/bench_mma_gpu.py --rows 64,128 --v8-only --out "$out/kernels.json"
    grep "M=" "$out/kernels.txt" | sed 's/ *{.*//' ;;
  big)
    run big32b 120 python -m qerl.cli bench rollout --model-config qwen2.5-32b --quant nvfp4 --batch 8,64 \
      --prompt-len 256 --gen-len 512 --lora-rank 16 --no-hf --out "$out/big32b.json"
    grep -E "^qerl|copy" "$out/big32b.txt" ;;
  *) echo "unknown step $s" ;;
esac; done
