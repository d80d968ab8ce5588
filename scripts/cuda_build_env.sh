#!/usr/bin/env bash
# Creates (once) a venv holding a CUDA build of torch, used ONLY for its C++/CUDA headers, and prints
# the include directories the CUDA compile test (tests/test_cuda_build.py) needs, one per line.
#
# Why: the dev venv has the CPU torch wheel, which ships no CUDA headers, so csrc/*.cu cannot be
# compiled against it. The CUDA wheel is installed with --no-deps: its headers are all we read, and
# importing it would need the NVIDIA runtime wheels, so nothing ever imports this torch.
#
# Env: DAAM_FAST_CUDA_BUILD_VENV (default .cache/cuda-build-venv), DAAM_FAST_CUDA_BUILD_TORCH (default
# 2.14.1: its headers match the CUDA 13.0 nvcc and need -std=c++20), PYTHON (default python3).
# Without nvcc this does nothing and exits 0, so `make test` works on machines without a toolkit.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${DAAM_FAST_CUDA_BUILD_VENV:-.cache/cuda-build-venv}"
TORCH_VERSION="${DAAM_FAST_CUDA_BUILD_TORCH:-2.14.1}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.daam-fast-torch-$TORCH_VERSION"

if ! command -v nvcc >/dev/null 2>&1; then
    echo "cuda_build_env: nvcc not found; skipping the CUDA build venv (CUDA compile test will skip)" >&2
    exit 0
fi

if [ ! -f "$STAMP" ]; then
    echo "cuda_build_env: installing torch==$TORCH_VERSION (headers only, --no-deps) into $VENV" >&2
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    # No torch import ever happens here: site-packages is located from the venv's own python.
    "$VENV/bin/python" -m pip install -q --no-deps "torch==$TORCH_VERSION" >&2
    touch "$STAMP"
fi

SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
INC="$SITE/torch/include"
if [ ! -f "$INC/torch/extension.h" ] || [ ! -d "$INC/ATen/cuda" ]; then
    echo "cuda_build_env: $INC lacks torch/extension.h or ATen/cuda: not a CUDA build of torch" >&2
    exit 1
fi
echo "$INC"
echo "$INC/torch/csrc/api/include"
