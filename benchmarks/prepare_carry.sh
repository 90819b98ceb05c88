#!/usr/bin/env bash
# Fill the git-ignored .carry/ folder that benchmarks/gpu_setup.sh reads on the device machine (see there).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .carry/common .carry/bmodel /tmp/carry_work
pip_download() {
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$1" "$2"
}
pip_download .carry/common torch-fidelity==0.4.0
pip_download .carry/common torchao==0.17.0
pip_download /tmp/carry_work diffusers==0.42.1
rm -rf /tmp/carry_work/slim && mkdir -p /tmp/carry_work/slim
python3 - <<'PY'
import zipfile
wheel = next(__import__("pathlib").Path("/tmp/carry_work").glob("diffusers-*.whl"))
with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(".carry/common/diffusers_slim.zip", "w", zipfile.ZIP_DEFLATED) as slim:
    for item in source.infolist():
        if item.filename.startswith("diffusers/") and not item.filename.startswith(("diffusers/pipelines/", "diffusers/modular_pipelines/")):
            slim.writestr(item, source.read(item))
PY
mkdir -p .carry/common/fmnist_test
cp "${DQCOMPILE_FMNIST:-/usr/share/datasets/fashion-mnist}"/t10k-* .carry/common/fmnist_test/
if [ -f benchmarks/models/fmnist_dit_b/config.json ] && ! git ls-files --error-unmatch benchmarks/models/fmnist_dit_b/config.json >/dev/null 2>&1; then
    tar cf - -C benchmarks/models fmnist_dit_b | xz -6 -T0 > .carry/bmodel/fmnist_dit_b.tar.xz
fi
du -sh .carry/*
