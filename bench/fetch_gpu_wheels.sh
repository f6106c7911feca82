#!/usr/bin/env bash
# Wheels that bench/gpu_proof.py installs on the bare GPU machine, which has
# torch but no network, no DeepSpeed and no WebDataset (docs/training.md, "The GPU proof").
# Run here, where the package registry is reachable; the folder travels with
# the checkout (the device tool's `carry`), about 5 MB.
#
#   bash bench/fetch_gpu_wheels.sh [OUT_DIR]     # default bench/wheels
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-bench/wheels}"
PY="${PY:-.venv/bin/python}"
PIP=("$PY" -m pip --disable-pip-version-check -q)
mkdir -p "$OUT"
# DeepSpeed as pure Python (no CUDA ops built), exactly the version the stack pins
DS_BUILD_OPS=0 "${PIP[@]}" wheel --no-deps --no-build-isolation -w "$OUT" "deepspeed==0.19.8"
# its dependencies and WebDataset's that the GPU machine lacks: CPython 3.12, manylinux x86-64
"${PIP[@]}" download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --abi cp312 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$OUT" \
    "hjson==3.1.0" "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0" \
    "typing-inspection==0.4.5" "typing-extensions==4.16.0" "webdataset==1.0.2" \
    "braceexpand==0.1.7" "packaging==26.4"
ls -1 "$OUT"
