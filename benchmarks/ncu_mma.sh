#!/bin/bash
# Nsight Compute over benchmarks/ncu_mma_gpu.py's cases: speed of light, occupancy and the stall reasons per
# issued instruction. Usage: bash benchmarks/ncu_mma.sh OUTDIR "v7:8 v7:1 ldg:8"
out=${1:-.}; cases=${2:-"v7:8 v7:1 ldg:8"}
for c in $cases; do
  PYTHONPATH=.:benchmarks ncu --clock-control none -k 'regex:_mma_kernel|_ldg' --launch-skip 2 --launch-count 1 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section SchedulerStats \
    --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
    python benchmarks/ncu_mma_gpu.py --case ${c%%:*} --rows ${c##*:} > "$out/ncu_${c%%:*}_${c##*:}.txt" 2>&1
  echo "== $c"
  grep -E "Duration|DRAM Throughput|Memory Throughput|Registers Per Thread|Achieved Occupancy|Theoretical Occupancy|Eligible Warps|Issued Warp|No Eligible|Block Limit Reg|Grid Size|Block Size" "$out/ncu_${c%%:*}_${c##*:}.txt" | sed 's/  */ /g'
  grep -E "issue_stalled" "$out/ncu_${c%%:*}_${c##*:}.txt" | awk '$NF+0 > 0.05' | sed 's/smsp__average_warps_issue_stalled_//; s/_per_issue_active.ratio//; s/  */ /g'
done
