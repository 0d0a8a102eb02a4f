#!/usr/bin/env bash
# Download the wheels bench/gpu_check.py needs on a GPU machine that has torch + CUDA but no
# megatron-core and no network, into the git-ignored folder .whl/ (it travels with the working tree).
# Run it here, on a machine with access to PyPI:
#     bash bench/fetch_gpu_wheels.sh                 # for the GPU machine's Python 3.12 (default)
#     PYTHON_VERSION=3.11 bash bench/fetch_gpu_wheels.sh
# gpu_check.py then installs them with `pip install --no-index --find-links .whl` into a venv that
# sees the machine's own torch (docs/operations.md, "GPU check"). torch itself is never downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
ABI="cp${PYTHON_VERSION/./}"
DEST="${DEST:-.whl}"
PIP="${PIP:-python -m pip}"
mkdir -p "$DEST"
TARGET=(--only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp
        --abi "$ABI" --abi abi3 --abi none
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64 --platform any --dest "$DEST")
# megatron-core declares torch as a dependency: fetch it alone (its other needs, numpy and
# packaging, come below) so that pip does not download a multi-GB torch.
$PIP download "${TARGET[@]}" --no-deps "megatron-core==0.16.1"
# Everything else the check imports, with dependencies (none of them pulls torch). Versions follow
# requirements.txt where it pins them.
$PIP download "${TARGET[@]}" \
    "transformers==5.23.0" "safetensors" "tokenizers" "PyYAML" "numpy" "psutil" "tqdm" "packaging>=24.2"
du -sh "$DEST"
ls "$DEST"
