#!/usr/bin/env bash
# Installs vllm-a2a-plugin with vLLM into a virtual environment.
#
#   bash scripts/install.sh                          # vllm 0.33.0 (newest supported) into .venv
#   VLLM_VERSION=0.32.0 bash scripts/install.sh      # vllm 0.32.0 instead
#   VLLM_VERSION=0.32.0 VENV=.venv-vllm032 bash scripts/install.sh   # into another venv
#
# (the version may also be the first argument: bash scripts/install.sh 0.32.0).
# Used by the README's first command and by .ci/run; keep them in step.
set -euo pipefail
cd "$(dirname "$0")/.."

VLLM_VERSION=${1:-${VLLM_VERSION:-0.33.0}}
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

# The torch each vLLM release pins (installed first, see below).
case "$VLLM_VERSION" in
    0.32.*) TORCH_VERSION=2.13.0 ;;
    0.33.*) TORCH_VERSION=2.14.0 ;;
    *) echo "install.sh: vLLM $VLLM_VERSION is not supported; use 0.33.0 (default) or 0.32.0" >&2
       exit 2 ;;
esac

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

# torch first: on the CPU machines pip takes the local torch 2.13.0+cpu wheel
# for vLLM 0.32; torch 2.14.0 (vLLM 0.33) comes from the index as its CUDA
# build (about 9 GB with its CUDA libraries, and it runs on CPU as well).
"${PIP[@]}" "torch==$TORCH_VERSION"
"${PIP[@]}" "vllm==$VLLM_VERSION" "torch==$TORCH_VERSION"

if "$VENV/bin/python" -c 'import sys, torch; sys.exit(0 if torch.version.cuda is None else 1)'; then
    # vLLM's dependencies bring CUDA builds of torchvision/torchaudio/torchcodec,
    # which break `import vllm` next to a CPU torch; vLLM's LLM path needs none.
    # (With vLLM 0.33's CUDA torch they match torch and stay.)
    "$VENV/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec || true
fi

# Our package, built against the torch just installed (hence no build isolation).
# The CUDA kernels are compiled now only where they can run and build: torch with
# CUDA, a visible GPU and a complete CUDA toolkit (CUDA_HOME); elsewhere a CPU-only
# extension is built and a GPU machine JIT-builds the kernels on first use.
# VLLM_A2A_BUILD_KERNELS=yes compiles them here anyway (no GPU needed).
# The mpi extra (mpi4py + MPICH's pip wheel, ~15 MB, with its mpirun in the venv's
# bin/) lets benchmarks and multi-rank tests start under mpirun as under torchrun.
"${PIP[@]}" --no-build-isolation -e ".[dev,mpi]"
"$VENV/bin/python" - <<'PY'
import vllm
from vllm_a2a_plugin import ops
from vllm_a2a_plugin.vllm.compat import check_vllm_version

check_vllm_version()
ops.load()
print(f"vllm-a2a-plugin installed with vLLM {vllm.__version__}; {ops.kernel_status()}")
PY
