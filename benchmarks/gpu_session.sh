#!/usr/bin/env bash
# One device call on two GPUs (nvidia-h200-x2) for the evidence of issues 13, 15 and 16:
#   GPU 0: bench_dit.py's variants (fast path against bf16 and torchao), then the CUDA tests;
#   GPU 1: the float model's FID against the sampler settings for both models (row set "steps"), then the
#          method tables (benchmarks/gpu_methods.sh) on both models.
# Everything is tarred into $OUT/session.tar.gz at the end (a call returns at most 8 files).
# Run from the repository root with OUT and COMMIT set, after benchmarks/prepare_carry.sh (carry .carry):
#     COMMIT=<hash> bash benchmarks/gpu_session.sh
# Settings: SESSION_SECONDS (default 555), EMBEDDED_PROTOCOL / BENCHMARK_PROTOCOL (sampler flags of each
# model's method rows), STEP_SAMPLES (default 2000 embedded, 1000 benchmark).
set -uo pipefail
: "${OUT:?set OUT}"
TOTAL=${SESSION_SECONDS:-555}
START=$SECONDS
left() { echo $(( TOTAL - (SECONDS - START) )); }
source benchmarks/gpu_setup.sh > "$OUT/setup.log" 2>&1
tail -1 "$OUT/setup.log"
nvidia-smi --query-gpu=index,name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv >> "$OUT/setup.log"

bench() {
    export CUDA_VISIBLE_DEVICES=0
    timeout $(( $(left) - 110 )) python3 benchmarks/bench_dit.py --out "$OUT/dit_h200.json" \
        --variants "${VARIANTS:-compile,dqcompile_w8a8,compile_ro,dqcompile_w8a8_ro,dqcompile_w4a8,eager,torchao_fp8,torchao_int8}" \
        --budget-s $(( $(left) - 150 )) --variant-timeout-s 200 > "$OUT/dit_h200.log" 2>&1
    timeout $(( $(left) - 15 )) python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_triton_kernels.py \
        tests/test_compile_backend.py tests/test_reference_ops.py -rfE > "$OUT/gpu_tests_h200.log" 2>&1
}

quality() {
    export CUDA_VISIBLE_DEVICES=1
    for entry in "embedded:${STEP_SAMPLES_EMBEDDED:-2000}:95" "benchmark:${STEP_SAMPLES_BENCHMARK:-1000}:140"; do
        IFS=: read -r model samples seconds <<< "$entry"
        timeout $(( seconds + 15 )) python3 benchmarks/evaluate.py --model "$model" --rows steps --samples "$samples" \
            --seeds 0 --dtype bfloat16 --batch-size "$samples" --metrics fid,kid,prc,accuracy \
            --budget-seconds "$seconds" --out "$OUT/steps_$model.json" > "$OUT/steps_$model.log" 2>&1
    done
    share=$(( ($(left) - 20) / 2 ))
    METHODS_BUDGET_SECONDS=$share METHODS_STAGES="embedded:methods-1:2000:$share" \
        METHODS_PROTOCOL="${EMBEDDED_PROTOCOL:---steps 20}" bash benchmarks/gpu_methods.sh > /dev/null 2>&1
    mv "$OUT/methods.log" "$OUT/methods_embedded.log" 2>/dev/null
    share=$(( $(left) - 15 ))
    METHODS_BUDGET_SECONDS=$share METHODS_STAGES="benchmark:methods-1:2000:$share" \
        METHODS_PROTOCOL="${BENCHMARK_PROTOCOL:---steps 20 --clip-sample false}" bash benchmarks/gpu_methods.sh > /dev/null 2>&1
}

bench &
quality &
wait
# Everything in one tarball; the main figures also as they are (a call brings back at most 8 files).
tar czf /tmp/session.tar.gz -C "$OUT" .
find "$OUT" -mindepth 1 -maxdepth 1 ! -name dit_h200.json ! -name dit_h200.log ! -name gpu_tests_h200.log \
    ! -name setup.log -exec rm -rf {} +
mv /tmp/session.tar.gz "$OUT/"
ls -la "$OUT"; tail -n 25 "$OUT/dit_h200.log"; tail -n 5 "$OUT/gpu_tests_h200.log"
