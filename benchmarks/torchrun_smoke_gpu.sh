#!/bin/bash
# torchrun on GPUs, end to end: `torchrun --nproc-per-node N -m qerl train` on a tiny random Llama checkpoint
# (made here, no download) for 3 steps with NCCL, one rank per GPU; then the same from its checkpoint with
# --resume --max-steps 4. Prints each run's last step line and the adapters' files. Checks the NCCL path runs;
# the speed of data-parallel RL is measured with `qerl bench step` (issue 22).
# Usage (repo root, on the GPU machine): bash benchmarks/torchrun_smoke_gpu.sh OUTDIR [NPROC]
out=${1:?usage: torchrun_smoke_gpu.sh OUTDIR [NPROC]}; n=${2:-$(nvidia-smi -L | wc -l)}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
tmp=$(mktemp -d)
python -c "import sys; sys.path.insert(0, 'tests'); from conftest import make_tiny_checkpoint as m; m('$tmp/tiny', 'llama', seed=3, std=0.05)"
args=(--model.name "$tmp/tiny" --model.device cuda --model.lora_rank 4 --data.train_limit 64 --data.system_prompt none
      --data.suffix none --rollout.prompts_per_step $((2 * n)) --rollout.group_size 4 --rollout.max_new_tokens 8
      --optim.lr 1e-2 --train.output_dir "$tmp/run" --train.eval_limit 4 --train.save_every 1 --no-progress)
timeout 240 torchrun --standalone --nproc-per-node "$n" -m qerl train "${args[@]}" --train.max_steps 3 > "$out/torchrun.txt" 2>&1
echo "torchrun x$n rc $?"; grep -iE "step|error|nccl" "$out/torchrun.txt" | tail -5
timeout 240 torchrun --standalone --nproc-per-node "$n" -m qerl train "${args[@]}" --train.max_steps 4 --resume \
  > "$out/torchrun_resume.txt" 2>&1
echo "resume rc $?"; grep -iE "step|error|resum" "$out/torchrun_resume.txt" | tail -4
ls "$tmp/run/adapter" 2>&1 | head -3
