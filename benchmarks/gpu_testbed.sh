#!/usr/bin/env bash
# The quality testbed in one GPU call (issue 15): train the benchmark DiT (about 4.5 minutes), then the
# float model's FID against the sampler settings (DDIM 20/50/100 and DDPM 250, clip_sample off, then on;
# benchmarks/evaluate.py's row set "steps") for the embedded model and for the new benchmark model,
# 2,000 samples per cell. Each stage checks the time left first; everything is logged with tee into
# $OUT/testbed.log.
#
# Run from the repository root on the GPU machine with OUT set, the wheels in .whl/ (diffusers,
# torch-fidelity) and the four Fashion-MNIST .gz files in .data/fashion-mnist/, e.g. through the device
# tool with carry [".whl", ".data"] and timeout 600:
#     DQCOMPILE_COMMIT=<commit> bash benchmarks/gpu_testbed.sh
#
# What comes back in $OUT (at most 8 files): fmnist_dit_b/model-0000K-of-0000N.safetensors (the bf16
# shards), testbed_results.tar.gz (the model folder's small files: config.json, the shard index,
# training.json with the FID per sampler setting, reference_output.safetensors, samples.png; the two
# step tables as JSON + markdown) and testbed.log. To commit the model: copy the shards and the
# tarball's fmnist_dit_b/ files into benchmarks/models/fmnist_dit_b/.
#
# Settings (environment): TESTBED_BUDGET_SECONDS (whole script, default 535), TRAIN_SECONDS (this call's
# training, default 270), TOTAL_TRAIN_SECONDS (the run's whole budget for the learning-rate schedule,
# default TRAIN_SECONDS; a later call with the same value resumes from runs/fmnist_dit_b while the machine
# is warm), STEP_SAMPLES (default 2000), STEP_ROWS (evaluate.py row sets, default steps), SKIP_TRAINING=1
# (evaluate the checkpoint already in the tree), TRAIN_COMPILE=0 (eager training), TRAIN_EXTRA (more flags
# for the training script, after the defaults: e.g. "--batch-size 8 --grid-steps 1" for a CPU dry run),
# EVAL_EXTRA (more flags for evaluate.py, e.g. "--steps 2 --device cpu").
set -uo pipefail
export PYTHONUNBUFFERED=1
: "${OUT:?set OUT to the results folder}"
BUDGET=${TESTBED_BUDGET_SECONDS:-535}
TRAIN_SECONDS=${TRAIN_SECONDS:-270}
TOTAL_TRAIN_SECONDS=${TOTAL_TRAIN_SECONDS:-$TRAIN_SECONDS}
SAMPLES=${STEP_SAMPLES:-2000}
ROWS=${STEP_ROWS:-steps}
COMPILE_FLAG=$([ "${TRAIN_COMPILE:-1}" = "1" ] && echo --compile)
MODEL_DIR=benchmarks/models/fmnist_dit_b
WORK=/tmp/testbed
LOG="$OUT/testbed.log"
START=$SECONDS
mkdir -p "$WORK/fmnist_dit_b" "$OUT"

left() { echo $(( BUDGET - (SECONDS - START) )); }
log() { echo "[testbed +$(( SECONDS - START ))s, $(left)s left] $*" | tee -a "$LOG"; }
minutes() { python3 -c "print($1 / 60)"; }
bundle() {  # the small files into one tarball (the shards travel as they are); safe to call repeatedly
    if [ -f "$MODEL_DIR/config.json" ]; then
        find "$MODEL_DIR" -maxdepth 1 -type f ! -name 'model-*-of-*.safetensors' -exec cp {} "$WORK/fmnist_dit_b/" \;
        mkdir -p "$OUT/fmnist_dit_b"
        cp "$MODEL_DIR"/model-*-of-*.safetensors "$OUT/fmnist_dit_b/" 2>/dev/null
    fi
    tar czf "$OUT/testbed_results.tar.gz" -C "$WORK" .
}
trap bundle EXIT

log "start: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null)"
export DQCOMPILE_FMNIST="${DQCOMPILE_FMNIST:-$PWD/.data/fashion-mnist}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | tee -a "$LOG" || exit 1
export PYTHONPATH="/tmp/site:$PWD"
export DQCOMPILE_COMMIT=${DQCOMPILE_COMMIT:-unknown}
python3 -c "import torch, diffusers, torch_fidelity; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'torch-fidelity', torch_fidelity.__version__)" 2>&1 | tee -a "$LOG"

# 1. Train the benchmark model (bf16 autocast, EMA, torch.compile; resumable state in runs/fmnist_dit_b).
if [ "${SKIP_TRAINING:-0}" != "1" ]; then
    train() {  # $1: extra flags; $2: training seconds
        timeout $(( $2 + 150 )) python3 examples/train_fmnist_dit.py --arch benchmark --data .data/fashion-mnist \
            --out "$MODEL_DIR" --state runs/fmnist_dit_b --minutes "$(minutes "$2")" \
            --total-minutes "$(minutes "$TOTAL_TRAIN_SECONDS")" --batch-size 256 --log-every 1000 \
            --classifier dqcompile/fmnist/checkpoints --grid-clip-sample false $1 ${TRAIN_EXTRA:-} 2>&1 | tee -a "$LOG"
    }
    log "training the benchmark model for ${TRAIN_SECONDS}s (run budget ${TOTAL_TRAIN_SECONDS}s)"
    train "$COMPILE_FLAG" "$TRAIN_SECONDS"
    status=$?
    if [ "$status" != "0" ] && [ -n "$COMPILE_FLAG" ] && [ ! -f "$MODEL_DIR/config.json" ] && [ "$(left)" -gt 300 ]; then
        # torch.compile failed early: train eagerly in what is left of the training slot.
        spent=$(( SECONDS - START ))
        retry=$(( TRAIN_SECONDS - spent + 15 ))
        log "compiled training failed (exit $status); training eagerly for ${retry}s"
        rm -rf runs/fmnist_dit_b
        train "" "$retry"
    fi
    bundle
    log "training done: $(ls "$MODEL_DIR" 2>/dev/null | tr '\n' ' ')"
fi

# 2. and 3. The float model's FID against the sampler settings, for each model.
steps_table() {  # $1: model, $2: name, $3: seconds for this stage
    log "step table of the $1 model: ${3}s"
    timeout "$3" python3 benchmarks/evaluate.py --model "$1" --rows "$ROWS" --samples "$SAMPLES" --seeds 0 \
        --dtype bfloat16 --batch-size "$SAMPLES" --metrics fid,kid,isc,prc,accuracy \
        --budget-seconds $(( $3 - 45 )) --out "$WORK/steps_$2.json" ${EVAL_EXTRA:-} 2>&1 | grep -v "it/s]" | tee -a "$LOG"
    bundle
}
if [ "$(left)" -gt 60 ]; then
    steps_table embedded embedded $(( $(left) > 300 ? 110 : $(left) / 3 ))
fi
if [ "$(left)" -gt 60 ] && [ -f "$MODEL_DIR/config.json" ]; then
    steps_table benchmark benchmark $(( $(left) - 15 ))
fi

# 4. The benchmark model's record gets its FID per sampler setting.
python3 - "$WORK/steps_benchmark.json" "$MODEL_DIR/training.json" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path
table, record_path = Path(sys.argv[1]), Path(sys.argv[2])
if table.is_file() and record_path.is_file():
    result, record = json.loads(table.read_text()), json.loads(record_path.read_text())
    record["fid_by_sampler"] = [
        {**row["sampler_settings"], "samples": result["protocol"]["samples"], "dtype": result["protocol"]["dtype"],
         **{key: row["stats"][key]["mean"] for key in ("fid", "kid_mean", "accuracy", "precision", "recall")
            if key in row["stats"]}}
        for row in result["rows"] if "stats" in row]
    record["fid_by_sampler_source"] = f"benchmarks/evaluate.py --rows steps, {result['date']}, {result['device']}"
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"recorded {len(record['fid_by_sampler'])} FIDs in {record_path}")
EOF
log "done"
