# Source this first in a device-machine command (the lent GPU has torch and Triton but neither diffusers,
# torch-fidelity nor torchao, and a call carries at most 64 MiB). It expects the git-ignored .carry/ folder
# that benchmarks/prepare_carry.sh fills here:
#   .carry/common: diffusers without its pipelines (diffusers_slim.zip: dqcompile needs models and
#                  schedulers only), the torch-fidelity and torchao wheels, the Fashion-MNIST test split
#   .carry/bmodel: the benchmark model's folder as fmnist_dit_b.tar.xz (when it is not committed yet)
# and sets PYTHONPATH, DQCOMPILE_FMNIST and DQCOMPILE_COMMIT (from $COMMIT) for the scripts that follow.
export PYTHONUNBUFFERED=1
SITE=/tmp/site
mkdir -p "$SITE"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .carry/common/*.whl
python3 -c "import zipfile; zipfile.ZipFile('.carry/common/diffusers_slim.zip').extractall('$SITE')"
export PYTHONPATH="$SITE:$PWD"
export DQCOMPILE_FMNIST="$PWD/.carry/common/fmnist_test"
export DQCOMPILE_COMMIT="${COMMIT:-unknown}"
if [ -f .carry/bmodel/fmnist_dit_b.tar.xz ] && [ ! -f benchmarks/models/fmnist_dit_b/config.json ]; then
    mkdir -p benchmarks/models && tar xJf .carry/bmodel/fmnist_dit_b.tar.xz -C benchmarks/models
fi
python3 -c "import torch, triton, diffusers, torch_fidelity, torchao; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__, 'torchao', torchao.__version__, torch.cuda.get_device_name())"
