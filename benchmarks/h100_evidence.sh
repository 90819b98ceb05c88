#!/usr/bin/env bash
# The quality evidence run on the lent H100, in priority order; each part writes its JSON as it goes,
# so a part cut short by the time limit keeps the rows it finished (flags: benchmarks/evaluate.py's; the
# 2026-11-21 run used its predecessor, whose --configs named the same rows). Run from the repo root with
# diffusers and torch-fidelity importable and OUT set to a results folder.
set -uo pipefail
export PYTHONUNBUFFERED=1
E="python3 benchmarks/evaluate.py --samples 5000 --steps 50 --batch-size 1000"
# Issue 3: the float model's FID with and without guidance, and RTN w8a8 / w4a8 beside it.
timeout 220 $E --guidance 1.5 --rows float --row w8a8 --row w4a8 --out "$OUT/quality_rtn.json" 2>&1 | grep -v "it/s]" | tee "$OUT/evidence.log"
timeout 45 $E --guidance 0 --rows float --out "$OUT/quality_fp_unguided.json" 2>&1 | grep -v "it/s]" | tee -a "$OUT/evidence.log"
# Issue 4: PTQ4DiT, CSB only and CSB + SSC (static per-tensor activations, as in the paper).
timeout 280 $E --guidance 1.5 --out "$OUT/quality_ptq4dit.json" --rows ptq4dit \
    2>&1 | grep -v "it/s]" | tee -a "$OUT/evidence.log"
# Issue 5: the Triton kernels against the reference on the GPU.
timeout 60 python3 -m pytest tests/test_triton_kernels.py tests/test_reference_ops.py -q -m cuda -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
