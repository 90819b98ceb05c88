#!/usr/bin/env bash
# One device call on two GPUs (nvidia-h200-x2) for the evidence of issues 13, 15 and 16:
#   GPU 0: bench_dit.py's variants (fast path against bf16 torch.compile, eager and torchao);
#   GPU 1: the CUDA tests, then the float model's FID against the sampler settings (STEP_STAGES), then the
#          method tables (benchmarks/gpu_methods.sh, METHOD_STAGES) with what is left of the call.
# Everything is tarred into $OUT/session.tar.gz at the end (a call returns at most 8 files).
# Run from the repository root with OUT and COMMIT set, after benchmarks/prepare_carry.sh (carry .carry):
#     COMMIT=<hash> bash benchmarks/gpu_session.sh
# Settings (environment):
#   SESSION_SECONDS  the whole call (default 555)
#   VARIANTS         bench_dit variants, in order ("" skips bench_dit); BENCH_GPUS: see below
#   QUANT_BENCH      set: after the CUDA tests, bench_quantize.py (GPU 1), QUANT_BASELINE an older
#                    quantize.py to time beside the current one
#   GEMM_BENCH       N: then bench_gemm.py's GEMM shapes for at most N seconds (GPU 1)
#   STEP_STAGES      space-separated model:rows:samples:seconds[:seeds] of evaluate.py row sets run with one
#                    batch (default "embedded:steps:2000:95 benchmark:steps:1000:140"; "" skips them;
#                    e.g. "embedded:noise:5000:200:0,1,2" for the noise band); EVAL_FLAGS adds flags
#                    (e.g. --compile: the quantized rows on the fast path)
#   METHOD_STAGES    space-separated model:rows:samples[:seconds], run in order: a stage gets its own seconds
#                    when given, else an even share of the time left among the stages still to run
#                    (default "embedded:methods-1:2000 benchmark:methods-1:2000")
#   QUALITY=0        no quality work beside bench_dit (a quiet machine for its host-time figures; on a
#                    one-GPU machine, nvidia-h200, the only way to run it)
#   STEP_STAGES0, METHOD_STAGES0  with VARIANTS="": the same for GPU 0 (into $OUT/gpu0)
#   TEST_SECONDS, TEST_FILTER  the CUDA tests' time limit (default 200) and a pytest -k expression
#   PROTOCOL         sampler flags of the method rows (default: docs/quality.md's protocol)
set -uo pipefail
: "${OUT:?set OUT}"
TOTAL=${SESSION_SECONDS:-555}
START=$SECONDS
left() { echo $(( TOTAL - (SECONDS - START) )); }
source benchmarks/gpu_setup.sh > "$OUT/setup.log" 2>&1
tail -1 "$OUT/setup.log"
nvidia-smi --query-gpu=index,name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv >> "$OUT/setup.log"

# Bench and quality work side by side get half the physical CPU cores each: a compile or a test run beside a timed
# step otherwise inflates its host time (see bench_dit.cpu_share). BENCH_GPUS=0,1 gives bench_dit both GPUs
# (its variants side by side, each on its GPU's half of the cores) and skips the quality work.
read -r LOWER UPPER < <(python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from bench_common import cpu_groups; print(*(','.join(map(str, g)) for g in cpu_groups(2)))")
BENCH_GPUS=${BENCH_GPUS:-0}

bench() {
    [ -n "${VARIANTS-x}" ] || return 0
    local pin=(taskset -c "$LOWER")  # half the cores only when quality work runs beside it
    { [ "$BENCH_GPUS" = "0" ] && [ "${QUALITY:-1}" = 1 ]; } || pin=()
    timeout $(( $(left) - 10 )) "${pin[@]}" python3 benchmarks/bench_dit.py --out "$OUT/dit_h200.json" --gpus "$BENCH_GPUS" \
        --variants "${VARIANTS:-compile,dqcompile_w8a8,compile_ro,dqcompile_w8a8_ro,dqcompile_w4a8,eager,torchao_fp8,torchao_int8}" \
        --budget-s $(( $(left) - 60 )) --variant-timeout-s "${VARIANT_TIMEOUT:-220}" > "$OUT/dit_h200.log" 2>&1
}

# quality GPU CORES FOLDER STEP_STAGES METHOD_STAGES TESTS: the CUDA tests (TESTS=1) and the fused-quantizer
# timings, then evaluate.py's step stages, then the method stages, on one GPU and its cores, into FOLDER.
quality() {
    local gpu=$1 cores=$2 folder=$3 step_stages=$4 method_stages=$5 tests=$6
    export CUDA_VISIBLE_DEVICES=$gpu OUT=$folder
    mkdir -p "$folder"
    if [ "$tests" = 1 ]; then
        timeout "${TEST_SECONDS:-200}" taskset -c "$cores" python3 -m pytest -q -p no:cacheprovider -m cuda \
            tests/test_triton_kernels.py tests/test_compile_backend.py tests/test_reference_ops.py -rfE \
            ${TEST_FILTER:+-k "$TEST_FILTER"} > "$folder/gpu_tests_h200.log" 2>&1
        if [ -n "${QUANT_BENCH:-}" ]; then  # the quantizers' tile sweep against a baseline quantize.py (about 60 s)
            timeout 150 taskset -c "$cores" python3 benchmarks/bench_quantize.py --out "$folder/quantize_h200.json" \
                ${QUANT_BASELINE:+--baseline "$QUANT_BASELINE"} > "$folder/quantize_h200.log" 2>&1
        fi
        if [ -n "${GEMM_BENCH:-}" ]; then  # the GEMMs per shape against cuBLAS (GEMM_BENCH seconds), no fused cases
            timeout $(( GEMM_BENCH + 60 )) taskset -c "$cores" python3 benchmarks/bench_gemm.py --no-fused \
                --budget-s "$GEMM_BENCH" --out "$folder/gemm_h200.json" > "$folder/gemm_h200.log" 2>&1
        fi
    fi
    for entry in $step_stages; do
        IFS=: read -r model rows samples seconds seeds <<< "$entry"
        timeout $(( seconds + 15 )) taskset -c "$cores" python3 benchmarks/evaluate.py --model "$model" --rows "$rows" \
            --samples "$samples" --seeds "${seeds:-0}" --dtype bfloat16 --batch-size "$samples" \
            --metrics fid,kid,prc,accuracy,psnr ${EVAL_FLAGS:-} --budget-seconds "$seconds" \
            --out "$folder/${rows}_${model}_$samples.json" > "$folder/${rows}_${model}_$samples.log" 2>&1
    done
    read -r -a stages <<< "$method_stages"
    remaining=${#stages[@]}
    for entry in "${stages[@]}"; do
        IFS=: read -r model rows samples seconds <<< "$entry"
        share=$(( ($(left) - 15) / remaining ))
        # A stage's own seconds, when given, replace its even share (never past the time left).
        [ -n "$seconds" ] && share=$(( seconds < $(left) - 15 ? seconds : $(left) - 15 ))
        remaining=$(( remaining - 1 ))
        METHODS_BUDGET_SECONDS=$share METHODS_STAGES="$model:$rows:$samples:$share" \
            METHODS_PROTOCOL="${PROTOCOL:---steps 20 --clip-sample false --timestep-spacing leading}" \
            taskset -c "$cores" bash benchmarks/gpu_methods.sh > /dev/null 2>&1
        mv "$folder/methods.log" "$folder/methods_${model}_$rows.log" 2>/dev/null
    done
}

STEPS=${STEP_STAGES-"embedded:steps:2000:95 benchmark:steps:1000:140"}
METHODS=${METHOD_STAGES-"embedded:methods-1:2000 benchmark:methods-1:2000"}
if [ -n "${VARIANTS-x}" ]; then
    bench &
    [ "$BENCH_GPUS" = "0" ] && [ "${QUALITY:-1}" = 1 ] && quality 1 "$UPPER" "$OUT" "$STEPS" "$METHODS" 1 &
else  # no bench: both GPUs evaluate (GPU 0: STEP_STAGES0 and METHOD_STAGES0, into $OUT/gpu0)
    quality 1 "$UPPER" "$OUT" "$STEPS" "$METHODS" 1 &
    quality 0 "$LOWER" "$OUT/gpu0" "${STEP_STAGES0-}" "${METHOD_STAGES0-}" 0 &
fi
wait
# Everything in one tarball; the main figures also as they are (a call brings back at most 8 files).
tar czf /tmp/session.tar.gz -C "$OUT" .
find "$OUT" -mindepth 1 -maxdepth 1 ! -name dit_h200.json ! -name dit_h200.log ! -name gpu_tests_h200.log \
    ! -name setup.log -exec rm -rf {} +
mv /tmp/session.tar.gz "$OUT/"
ls -la "$OUT"; tail -n 25 "$OUT/dit_h200.log"; tail -n 5 "$OUT/gpu_tests_h200.log"
