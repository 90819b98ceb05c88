#!/usr/bin/env bash
# Issue 16's method tables in one GPU call (at most 8 minutes): benchmarks/evaluate.py's tiers of rows
# (benchmarks/method_tables.py) on the embedded model, then on the benchmark model when its checkpoint is in
# the tree (benchmarks/models/fmnist_dit_b), each row with per-layer attribution (--attribution) in the JSON.
# The time left is checked before each stage; a stage stops starting rows at its share of the time, and a
# row that would overrun is cut by `timeout` (the JSON is written after every finished row). Everything is
# logged with tee into $OUT/methods.log.
#
# Run from the repository root on the GPU machine with OUT set, the wheels in .whl/ (diffusers,
# torch-fidelity, as benchmarks/gpu_testbed.sh installs them; torchao too if a wheel is there) and the four
# Fashion-MNIST .gz files in .data/fashion-mnist/, e.g. through the device tool with carry [".whl", ".data"]
# and timeout 600:
#     DQCOMPILE_COMMIT=<commit> bash benchmarks/gpu_methods.sh
#
# What comes back in $OUT: methods.log, and per stage methods_<model>_<rows>.json + .md (rows, FID, KID,
# precision/recall, class accuracy, PSNR vs float, quantize time and peak memory, the plan summary with the
# reconstruction's per-block errors, time and memory, and the per-layer attribution).
#
# Settings (environment):
#   METHODS_STAGES      space-separated model:rows:samples:seconds, run in order (default
#                       "embedded:methods-1:2000:200 benchmark:methods-1:2000:250"; rows: a row set of
#                       evaluate.py, e.g. methods-1, methods-2, methods-3, auto-final, methods)
#   METHODS_BUDGET_SECONDS  the whole script (default 470)
#   METHODS_PROTOCOL    sampler flags for every row (default "--steps 20 --clip-sample false"; set it to the
#                       protocol docs/quality.md settles on)
#   METHODS_DTYPE       float32 or bfloat16 (default bfloat16)
#   METHODS_ATTRIBUTION calibration calls for the per-layer attribution (default 4; 0: off)
#   METHODS_EXTRA       more flags for evaluate.py
# CPU dry run (every kind of row, tiny counts; the row set methods-smoke runs 5 reconstruction iterations):
#     OUT=/tmp/methods METHODS_STAGES="embedded:methods-smoke:8:900" METHODS_ATTRIBUTION=2 \
#     METHODS_EXTRA="--device cpu --steps 2 --reference-size 100 --calib-timesteps 2 --calib-per-timestep 2" \
#     bash benchmarks/gpu_methods.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
: "${OUT:?set OUT to the results folder}"
BUDGET=${METHODS_BUDGET_SECONDS:-470}
STAGES=${METHODS_STAGES:-"embedded:methods-1:2000:200 benchmark:methods-1:2000:250"}
PROTOCOL=${METHODS_PROTOCOL:-"--steps 20 --clip-sample false"}
DTYPE=${METHODS_DTYPE:-bfloat16}
ATTRIBUTION=${METHODS_ATTRIBUTION:-4}
LOG="$OUT/methods.log"
START=$SECONDS
mkdir -p "$OUT"

left() { echo $(( BUDGET - (SECONDS - START) )); }
log() { echo "[methods +$(( SECONDS - START ))s, $(left)s left] $*" | tee -a "$LOG"; }

log "start: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo no GPU)"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        2>&1 | tee -a "$LOG"
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export DQCOMPILE_COMMIT=${DQCOMPILE_COMMIT:-unknown}
DATA_FLAG=$([ -d .data/fashion-mnist ] && echo "--data .data/fashion-mnist")
python3 -c "import torch, diffusers, torch_fidelity; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'torch-fidelity', torch_fidelity.__version__)" 2>&1 | tee -a "$LOG"
python3 -c "import torchao; print('torchao', torchao.__version__)" 2>&1 | tail -1 | tee -a "$LOG"

for stage in $STAGES; do
    IFS=: read -r model rows samples seconds <<< "$stage"
    if [ "$model" = "benchmark" ] && [ ! -f benchmarks/models/fmnist_dit_b/config.json ]; then
        log "skipping $stage: no benchmark checkpoint in benchmarks/models/fmnist_dit_b"
        continue
    fi
    available=$(( $(left) - 25 ))
    if [ "$available" -lt 60 ]; then
        log "skipping $stage: ${available}s left"
        continue
    fi
    [ "$seconds" -gt "$available" ] && seconds=$available
    # Start no row in the last 45 s of the stage; cut a row still running 20 s after the stage's end.
    log "stage $model / $rows / $samples samples: ${seconds}s"
    timeout $(( seconds + 20 )) python3 benchmarks/evaluate.py --model "$model" --rows "$rows" --samples "$samples" \
        --seeds 0 --dtype "$DTYPE" --batch-size "$samples" --metrics fid,kid,prc,accuracy,psnr \
        --attribution "$ATTRIBUTION" --budget-seconds $(( seconds - 45 )) $DATA_FLAG $PROTOCOL \
        --out "$OUT/methods_${model}_${rows}.json" ${METHODS_EXTRA:-} 2>&1 | grep -v "it/s]" | tee -a "$LOG"
    log "stage $model / $rows done (exit ${PIPESTATUS[0]})"
done
log "done"
