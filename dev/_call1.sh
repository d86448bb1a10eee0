export PYTHONUNBUFFERED=1 PYTHONPATH=.
nvidia-smi --query-gpu=name --format=csv,noheader
echo "== update probe"; timeout 220 python dev/ragged_update_probe.py lognormal:600 auto 2>&1 | grep -v Warning | tee $OUT/update_probe.txt | tail -14
if grep -q "non-finite rollout [1-9]" $OUT/update_probe.txt; then
  echo "== rollout probe"; timeout 150 python dev/ragged_nan_probe.py new 2>&1 | tee $OUT/rollout_probe.txt | tail -6
fi
echo "== tests"; timeout 150 python -m pytest -q -x -m gpu tests/test_engine_cuda.py -k "ragged or sampled" 2>&1 | tee $OUT/tests.txt | tail -5
