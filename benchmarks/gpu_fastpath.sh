#!/usr/bin/env bash
# The fast-path evidence in one device call (issue 13), for a machine of two GPUs (nvidia-h200-x2; with one
# GPU the variants run one after the other): bench_dit.py's variants side by side on both GPUs, then the
# CUDA tests. Run from the repository root with OUT set and COMMIT set to the tree's commit, after
# benchmarks/prepare_carry.sh here (carry .carry/common):
#     COMMIT=<hash> BENCH_BUDGET=430 bash benchmarks/gpu_fastpath.sh
set -uo pipefail
source benchmarks/gpu_setup.sh 2>&1 | tee "$OUT/setup.log"
START=$SECONDS
GPUS=$(python3 -c "import torch; print(','.join(str(i) for i in range(torch.cuda.device_count())))")
nvidia-smi --query-gpu=index,name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv | tee -a "$OUT/setup.log"
# The order balances the queue: the slow compiles (torchao) go first on one GPU each.
VARIANTS=${VARIANTS:-torchao_fp8,dqcompile_w8a8,compile,dqcompile_w8a8_ro,compile_ro,dqcompile_w4a8,eager,torchao_int8}
python3 benchmarks/bench_dit.py --out "$OUT/dit_h200.json" --variants "$VARIANTS" --gpus "$GPUS" \
    --budget-s "${BENCH_BUDGET:-430}" --variant-timeout-s "${VARIANT_TIMEOUT:-300}" 2>&1 | tee "$OUT/dit_h200.log"
LEFT=$(( ${TOTAL_BUDGET:-560} - (SECONDS - START) ))
if [ "$LEFT" -gt 40 ]; then
    timeout "$LEFT" python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_triton_kernels.py \
        tests/test_compile_backend.py tests/test_reference_ops.py -rfE 2>&1 | tail -n 40 | tee "$OUT/gpu_tests_h200.log"
fi
