#!/usr/bin/env bash
# The multi-GPU runs, one step per device call (each fits the 10-minute
# limit). Run from the repo root on a machine of N GPUs; stage the vLLM
# bundle first for `engine` and `throughput` (docs/development.md, "vLLM on
# the GPU machines").
#
#   bash scripts/multigpu_session.sh tests        # kernels across N processes (symmetric memory)
#   bash scripts/multigpu_session.sh bench        # benchmark suite, one process per GPU
#   bash scripts/multigpu_session.sh engine       # DP=2 EP: same greedy tokens as allgather_reducescatter
#   bash scripts/multigpu_session.sh throughput   # served output tokens/s per backend, DP=N
#
# Logs and JSON go to $OUT (the device tool's output folder) or ./out.
set -euo pipefail
cd "$(dirname "$0")/.."
step=${1:?usage: multigpu_session.sh tests|bench|engine|throughput}
out=${OUT:-out}
mkdir -p "$out"
gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())')
# NVLink multicast stays off on these machines (it can take the host's GPUs down).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=32 VLLM_A2A_CUDA_ARCHS=90a
export VLLM_A2A_BUILD_DIR=${VLLM_A2A_BUILD_DIR:-/tmp/a2a_build}
commit=${A2A_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
case "$step" in
  tests)
    A2A_TEST_WORLD=$gpus python3 -m pytest tests/test_kernels_multigpu.py -v --timeout 300 \
      -p no:cacheprovider -rs 2>&1 | tee "$out/multigpu_tests.log" ;;
  bench)
    A2A_COMMIT=$commit torchrun --nproc-per-node "$gpus" benchmarks/bench_a2a.py \
      --iters 30 --warmup 5 --out "$out/suite_x$gpus.json" 2>&1 | tr '\r' '\n' \
      | grep -v 'it/s\]$' | tee "$out/bench.log" ;;
  engine)
    python3 -m pytest tests/test_engine.py -v --timeout 900 -p no:cacheprovider -rs \
      -k dp2 2>&1 | tee "$out/engine_dp2.log" ;;
  throughput)
    python3 benchmarks/engine_throughput.py --dp "$gpus" \
      --backends a2a_one_sided,allgather_reducescatter,flashinfer_nvlink_one_sided \
      --out "$out/engine_throughput_dp$gpus.json" 2>&1 | tee "$out/throughput.log" ;;
  *) echo "unknown step $step" >&2; exit 2 ;;
esac
