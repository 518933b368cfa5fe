#!/usr/bin/env bash
# Installs vllm-a2a-plugin into ./.venv with vllm==0.32.0 and torch 2.13.
# Used by the README's first command and by .ci/run; keep them in step.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

# torch first: on the CPU machines pip takes the local torch 2.13.0+cpu wheel;
# elsewhere this is the CUDA build from the index.
"${PIP[@]}" "torch==2.13.0"
# vLLM pins torch==2.13.0, which the wheel above satisfies.
"${PIP[@]}" "vllm==0.32.0" "torch==2.13.0"

if .venv/bin/python -c 'import sys, torch; sys.exit(0 if torch.version.cuda is None else 1)'; then
    # vLLM's dependencies bring CUDA builds of torchvision/torchaudio/torchcodec,
    # which break `import vllm` next to a CPU torch; vLLM's LLM path needs none.
    .venv/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec || true
fi

# Our package, built against the torch just installed (hence no build isolation):
# CUDA kernels when torch has CUDA and nvcc is found, else the CPU-only extension.
"${PIP[@]}" --no-build-isolation -e ".[dev]"
.venv/bin/python -c 'from vllm_a2a_plugin import ops; ops.load(); print("vllm-a2a-plugin installed; kernels:", ops.kernels_available())'
