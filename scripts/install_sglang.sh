#!/usr/bin/env bash
# Installs vllm-a2a-plugin into ./.venv-sglang with sglang==0.5.23 and torch 2.14.1
# (SGLang pins torch 2.14.1, vLLM 0.32 pins 2.13.0: the engines never share a venv).
#
# Lean on purpose: sglang itself is installed without its dependency list (which
# brings flashinfer, flash-attn-4, DeepEP, DeepGEMM, tilelang, ... several GB of
# GPU kernels) plus only what importing SGLang's server arguments, plugin loader,
# MoE layers, dispatchers and runners needs, at SGLang's pinned versions.
# Serving a model needs the full `pip install sglang==0.5.23` instead.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
VENV=.venv-sglang
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

# torch first (on the CPU machines pip takes the local 2.14.1 wheel).
"${PIP[@]}" "torch==2.14.1"
"${PIP[@]}" --no-deps "sglang==0.5.23"
# What `import sglang.srt.server_args / plugins / layers.moe.*` needs; versions
# pinned where sglang 0.5.23 pins them.
"${PIP[@]}" "torch==2.14.1" "numpy" "msgspec" "pyyaml" "pydantic" "requests" "aiohttp" \
    "orjson" "pyzmq>=25.1.2" "psutil" "packaging" "pillow" "regex" "tqdm" "ipython" \
    "pybase64" "einops" "gguf" "partial_json_parser" "python-dateutil<3" \
    "apache-tvm-ffi==0.1.11" "transformers==5.19.0" "tokenizers==0.23.2" \
    "sentencepiece==0.2.1" "compressed-tensors==0.18.0" "openai==2.8.0" "torchvision" "starlette" "dill"
# What sglang.Engine's processes import beyond that (the GPU staging carries the same list).
"${PIP[@]}" --no-deps -r scripts/sglang_engine_wheels.txt "uvloop" "h11" "click"

# Our package against the torch just installed (a CUDA build: setup.py compiles
# the kernels only with a GPU and a complete toolkit, else the CPU-only extension
# that carries the workspace layout, and says so).
"${PIP[@]}" --no-build-isolation -e ".[dev]" "python-dateutil<3"
"$VENV/bin/python" -c 'import sglang, torch, vllm_a2a_plugin.sglang.hooks as h; h.check_sglang_version(); print("sglang", sglang.__version__, "torch", torch.__version__, "+ vllm-a2a-plugin installed")'
