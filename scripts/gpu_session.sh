#!/usr/bin/env bash
# One-GPU runs, one step per device call (each fits the 10-minute limit). Run
# from the repo root on the lent GPU machine; steps marked
# (bundle) need the vLLM bundle staged first (docs/development.md): carry one
# .bundle part per call and begin the command with `bash scripts/gpu_session.sh stage;`.
#
#   bash scripts/gpu_session.sh stage           # store this call's bundle part (unpacks after the last);
#                                               # A2A_BUNDLE=.bundle033 for vLLM 0.33 (default .bundle, 0.32)
#   bash scripts/gpu_session.sh vllm            # (bundle) install check, toolchain test, vLLM's experts
#   bash scripts/gpu_session.sh kernels         # build; kernels, IPC processes, faults, resources
#   bash scripts/gpu_session.sh soak            # >= 10^6 checked rounds -> $OUT/soak.json
#   bash scripts/gpu_session.sh experts         # (bundle) vLLM's experts on our dispatch/combine
#   bash scripts/gpu_session.sh engine "<-k expr>"   # (bundle) engine tests, e.g. "eager and bf16",
#                                               # "dual_batch_overlap" (DBO, two DP engines)
#   bash scripts/gpu_session.sh overlap         # two micro-batches in flight + bench_overlap.py
#   bash scripts/gpu_session.sh bench [args]    # (bundle: flashinfer baseline) bench_a2a.py suite
#   bash scripts/gpu_session.sh stage-sglang .whl-sglang/p1   # then p2 (one call each, carrying
#                                               # that part; built here by scripts/sglang_stage.py build)
#   bash scripts/gpu_session.sh sglang          # SGLang's imports, our GPU tests, engine (eager)
#   bash scripts/gpu_session.sh sglang-engine graphs   # the engine pair with decode CUDA graphs
#   bash scripts/gpu_session.sh faults          # lost peers: watchdog + GPU fault tests, >= 100 faults
#                                               # per kind -> $OUT/fault_detection.{json,png}
#   bash scripts/gpu_session.sh engine_faults "<-k expr>"  # (bundle) vLLM DP=2 on one GPU, a rank
#                                               # killed / stopped; default -k kill (~4 min each)
#
# Logs and JSON go to $OUT (the device tool's output folder) or ./out.
set -euo pipefail
cd "$(dirname "$0")/.."
step=${1:?usage: gpu_session.sh stage|kernels|soak|experts|engine [pytest -k expression]}
out=${OUT:-out}
failed=0
mkdir -p "$out"
# NVLink multicast stays off on these machines (it can take the host's GPUs down).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=32 VLLM_A2A_CUDA_ARCHS=90a
# A run cut short by a call's time limit still shows why its tests failed.
export A2A_INSTANT_FAILURES=1
export VLLM_A2A_BUILD_DIR=${VLLM_A2A_BUILD_DIR:-/tmp/a2a_build}
commit=${A2A_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
# Installs this tree editable: registers our entry points for the engines' plugin
# loaders and builds the kernels for this machine's torch.
install_plugin() {
  python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -3
}
with_vllm() {
  export PYTHONPATH=/tmp/vllm_site VLLM_USE_FLASHINFER_SAMPLER=0
  install_plugin
}
case "$step" in
  stage)
    python3 scripts/vllm_bundle.py stage --bundle "${A2A_BUNDLE:-.bundle}" --target /tmp/vllm_site \
      2>&1 | tail -2 ;;
  vllm)
    with_vllm
    python3 -c "import torch, vllm; from vllm_a2a_plugin import ops; \
print('vllm', vllm.__version__, 'torch', torch.__version__, 'kernels', ops.kernel_status())" \
      2>&1 | tee "$out/vllm_import.log" | tail -3
    # test_vllm_plugin.py (CPU-level: parser, loader, gloo modular kernel) runs in CI
    # against both vLLM versions; add it here with A2A_PLUGIN_TESTS=1.
    python3 -m pytest tests/test_install_toolchain.py tests/test_vllm_gpu_experts.py \
      ${A2A_PLUGIN_TESTS:+tests/test_vllm_plugin.py} -q --timeout 300 -p no:cacheprovider -rs \
      2>&1 | tee "$out/vllm.log" | tail -12 ;;
  kernels)
    install_plugin
    python3 -m pytest tests/test_kernels_gpu.py tests/test_ipc_one_gpu.py \
      tests/test_default_device_gpu.py tests/test_faults_gpu.py tests/test_resources_gpu.py \
      -q --timeout 300 -p no:cacheprovider -rs 2>&1 | tee "$out/kernels.log" | tail -15 || failed=1
    python3 benchmarks/resource_cycles.py --cycles 10000 --out "$out/resource_cycles.json" \
      2>&1 | tail -8 ;;
  soak)
    A2A_COMMIT=$commit python3 benchmarks/soak.py --out "$out/soak.json" --rounds 1000000 \
      --minutes "${SOAK_MINUTES:-8}" 2>&1 | tee "$out/soak.log" | tail -8 ;;
  experts)
    with_vllm
    python3 -m pytest tests/test_vllm_gpu_experts.py -q --timeout 200 -p no:cacheprovider \
      2>&1 | tee "$out/experts.log" | tail -5 ;;
  engine)
    with_vllm
    python3 -m pytest tests/test_engine.py -v -s --timeout 900 -p no:cacheprovider -rs \
      -k "${2:-not multigpu}" 2>&1 | tee "$out/engine.log" \
      | grep -E "ENGINE_RESULT|PASSED|FAILED|SKIPPED|Error|^E " | tail -40 || failed=1
    cp /tmp/pytest-of-*/pytest-*/test_two_dp*/rank*.log "$out/" 2>/dev/null || true
    cp /tmp/pytest-of-*/pytest-*/test_vllm_serve_dp2*/serve-rank*.log "$out/" 2>/dev/null || true ;;
  bench)
    # flashinfer's MoeAlltoAll comes from the bundle; its JIT cache stays for later calls.
    export PYTHONPATH=/tmp/vllm_site FLASHINFER_WORKSPACE_BASE=/tmp/flashinfer_ws
    install_plugin
    shift
    A2A_COMMIT=$commit timeout "${BENCH_TIMEOUT_S:-560}" python3 benchmarks/bench_a2a.py \
      --out "$out/suite.json" "$@" 2>&1 | grep -v "it/s]" | tee "$out/bench.log" | tail -15 ;;
  faults)
    install_plugin
    timeout "${FAULT_TESTS_TIMEOUT_S:-240}" python3 -m pytest tests/test_watchdog_cpu.py \
      tests/test_faults_gpu.py -q --timeout 120 -p no:cacheprovider -rs 2>&1 \
      | tee "$out/faults.log" | tail -15 || failed=1
    A2A_COMMIT=$commit timeout "${FAULT_BENCH_TIMEOUT_S:-330}" python3 benchmarks/fault_detection.py --faults "${FAULTS:-100}" --interval "${FAULT_INTERVAL_S:-0.25}" \
      --json "$out/fault_detection.json" --plot "$out/fault_detection.png" 2>&1 \
      | tee "$out/fault_detection.log" | tail -60 ;;
  engine_faults)
    with_vllm
    timeout "${ENGINE_FAULTS_TIMEOUT_S:-540}" python3 -m pytest tests/test_engine_faults.py -v -s \
      --timeout 400 -p no:cacheprovider -rs -k "${2:-kill}" 2>&1 | tee "$out/engine_faults.log" | grep -E "FAULT_RESULT|PASSED|FAILED|SKIPPED|Error|^E " | tail -40 || failed=1
    for d in /tmp/pytest-of-*/pytest-*/test_dp2_*[0-9] /tmp/pytest-of-*/pytest-*/test_served*[0-9]; do
      [ -d "$d" ] && mkdir -p "$out/$(basename "$d")" && cp "$d"/*.log "$out/$(basename "$d")/" 2>/dev/null
    done; true ;;

  overlap)
    # Two micro-batches in flight (split phases; the comm-stream order of DBO, eager
    # and in a CUDA graph), then exposed all-to-all with and without overlap.
    install_plugin
    python3 -m pytest tests/test_overlap_gpu.py -q --timeout 120 -p no:cacheprovider -rs 2>&1 \
      | tee "$out/overlap_tests.log" | tail -5 || failed=1
    A2A_COMMIT=$commit timeout "${BENCH_TIMEOUT_S:-330}" python3 benchmarks/bench_overlap.py \
      --comm-max-blocks "${COMM_MAX_BLOCKS:-0}" --out "$out/overlap.json" --plot 2>&1 \
      | tee "$out/bench_overlap.log" | tail -12 ;;
  stage-sglang)
    # One part of SGLang's wheels per call, installed into /tmp/sglang_site
    # (scripts/sglang_stage.py; carry exactly that part, e.g. .whl-sglang/p1).
    python3 scripts/sglang_stage.py install "${2:?usage: gpu_session.sh stage-sglang .whl-sglang/pN [build]}" \
      2>&1 | tail -3
    # "build" (with the last, small part): our kernels now, so the test call
    # spends its time on tests (the build is cached in $VLLM_A2A_BUILD_DIR).
    if [ "${3:-}" = build ]; then install_plugin; fi ;;
  sglang|sglang-engine)
    # SGLang 0.5.23 staged by the stage-sglang calls: its own site, never vLLM's.
    python3 scripts/sglang_stage.py check
    install_plugin
    export PYTHONPATH=${SGLANG_SITE:-/tmp/sglang_site} HF_HUB_OFFLINE=1 SGLANG_ENGINE_OUT="$out/sglang_engine"
    if [ "$step" = sglang ]; then
      python3 - <<'PY' 2>&1 | tee "$out/sglang_import.log" | tail -30
import importlib, traceback
import torch
print("torch", torch.__version__)
for name in ("sglang", "sglang.srt.plugins", "sgl_kernel",
             "sglang.srt.layers.moe.moe_runner.triton", "vllm_a2a_plugin.sglang.dispatcher",
             "sglang.srt.entrypoints.engine", "sglang.srt.managers.scheduler",
             "sglang.srt.models.qwen3_moe", "sglang.srt.layers.attention.triton_backend",
             "sglang.srt.managers.detokenizer_manager",
             "sglang.srt.function_call.function_call_parser"):
    try:
        importlib.import_module(name)
        print("import", name, "ok")
    except BaseException:  # noqa: BLE001 - report every failure in full
        print("import", name, "FAILED"); traceback.print_exc(limit=3)
try:  # the trimmed sglang-kernel 0.4.5 registered its ops beside torch 2.11
    print("sgl_kernel.moe_sum_reduce", torch.ops.sgl_kernel.moe_sum_reduce.default._schema)
except BaseException:  # noqa: BLE001
    traceback.print_exc(limit=3)
PY
      timeout "${SGLANG_GPU_TESTS_TIMEOUT_S:-270}" python3 -m pytest tests/test_sglang_plugin.py \
        tests/test_sglang_engine_check_cpu.py tests/test_sglang_gpu.py -q --timeout 200 \
        -p no:cacheprovider -rs 2>&1 | tee "$out/sglang.log" | tail -25 || failed=1
    fi
    # Real engines (tests/test_sglang_engine.py): default MoE path vs ours, eager
    # by default; "graphs" (or "eager or graphs") as the second argument. A run
    # past its own limit fails with its log's tail before the step's limit hits.
    export SGLANG_ENGINE_RUN_TIMEOUT_S=${SGLANG_ENGINE_RUN_TIMEOUT_S:-120}
    timeout "${SGLANG_ENGINE_TIMEOUT_S:-250}" python3 -m pytest tests/test_sglang_engine.py -v -s \
      -k "${2:-eager}" -p no:cacheprovider -rs 2>&1 | tee "$out/sglang_engine.log" \
      | grep -E "SGLANG_ENGINE|PASSED|FAILED|SKIPPED|Error|^E " | tail -30 ;;
  *) echo "unknown step $step" >&2; exit 2 ;;
esac
# A failed test run above lets the step go on (its logs are copied, the engine
# runs after the tests); the step still fails.
exit "$failed"
