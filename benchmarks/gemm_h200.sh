#!/usr/bin/env bash
# The kernel evidence run on the lent H200 (one call): the GEMM benchmark with its tile sweep, then the CUDA
# tests of the Triton kernels. Run from the repo root with OUT set to a results folder and DQCOMPILE_COMMIT
# set to the commit of the tree (the device's copy has no usable .git).
set -uo pipefail
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
timeout "${BENCH_TIMEOUT:-200}" python3 benchmarks/bench_gemm.py --out "$OUT/gemm_h200.json" --sweep --small-m \
    --jobs "${JOBS:-12}" --budget-s "${BENCH_BUDGET:-150}" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/gemm_h200.log"
timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_triton_kernels.py \
    -n "${TEST_JOBS:-8}" -rfE ${TEST_ARGS:-} 2>&1 | tail -n 60 | tee "$OUT/gpu_tests_h200.log"
