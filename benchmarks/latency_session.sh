#!/usr/bin/env bash
# Decode fixed cost in one device call (H100, <= 9 minutes): the kernels and Python of a
# "before" commit against this tree ("after"), side by side, then the GPU tests
# and a compute-sanitizer subset on "after".
#
#   bash benchmarks/latency_session.sh            # writes everything under $OUT
#
# Steps (each bounded by `timeout` and by the session deadline; a step that no
# longer fits is skipped and says so):
#   1. "before" sources: vllm_a2a_plugin/ + csrc/ of $A2A_BEFORE_REF from git
#      (verified with `git cat-file -e`), else the copy in .latency_old/ (carry it);
#      this tree's benchmarks/ is copied beside them, so both sides run the same
#      measurement code. Both extensions JIT-build at once, in separate processes
#      (ops.py loads one extension per process); a failed build is reported with
#      its log tail and the session goes on with what built.
#   2. bench_a2a.py, DeepSeek-V3 shape, fp8 dispatch / bf16 combine, uniform
#      routing, 1 and 8 logical ranks, 1/128/1024/4096 tokens per rank: eager,
#      CUDA-graph replay (events; queued) and profiler kernel time. Order
#      before, after, after, before: the second pair exposes drift.
#   3. host_overhead.py (eager host time per round trip, 1 token, fp8), both sides.
#   4. tests/test_kernels_gpu.py on "after", then test_faults_gpu.py and
#      test_ipc_one_gpu.py if time allows.
#   5. compute-sanitizer memcheck (quick subset) and racecheck (two grids).
#   5b. probe: "after" only, 1 token, 8 logical ranks, uniform against local routing
#      (ids of the sender's own experts: every flag crosses, no row does) with the
#      signal floor (our kernels with no token anywhere) and profiler traces:
#      which of rows, flags or launch structure sets the 8-rank time.
#   6. compare_runs.py tables + the regression check -> summary.txt, printed last.
#
# Files under $OUT: session.log, before_1.json, after_1.json, after_2.json,
# before_2.json, host.json, probe_after.json, traces/, summary.txt.
#
# A2A_SESSION_STEPS picks steps (comma list; default all, in this order):
#   bench1, host, tests, memcheck, racecheck, probe, bench2, host2, faults, ipc;
#   eagerab (not in the default: A2A_EAGER_AB_ROUNDS alternating before/after
#   processes of eager bench + host_overhead -> eager_ab.tgz) runs after host.
# A second call can finish what the deadline skipped, e.g.
#   A2A_SESSION_STEPS=bench2,host2,racecheck,faults,ipc bash benchmarks/latency_session.sh
#
# Environment: A2A_BEFORE_REF (default 371729f: main before the decode-cost work; its
# csrc is 3b1351d's plus the top-k id -1 skip), A2A_SESSION_BUDGET_S (default
# 530), A2A_SESSION_DTYPES (default fp8), A2A_COMMIT (this tree's commit, for the
# JSON headers), PYTHON (default python3).
set -u -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-/tmp/a2a_latency_out}
mkdir -p "$OUT"
LOG="$OUT/session.log"
SUMMARY="$OUT/summary.txt"
: > "$LOG"
: > "$SUMMARY"
PY=${PYTHON:-python3}
BEFORE_REF=${A2A_BEFORE_REF:-371729f}
DTYPES=${A2A_SESSION_DTYPES:-fp8}
STEPS=",${A2A_SESSION_STEPS:-bench1,host,tests,memcheck,racecheck,probe,bench2,host2,faults,ipc},"
want() { [[ "$STEPS" == *",$1,"* ]]; }
START=$(date +%s)
DEADLINE=$((START + ${A2A_SESSION_BUDGET_S:-530}))
WORK=$(mktemp -d /tmp/a2a_latency.XXXXXX)
export VLLM_A2A_CUDA_ARCHS=${VLLM_A2A_CUDA_ARCHS:-90a}
export VLLM_A2A_BUILD_DIR=${VLLM_A2A_BUILD_DIR:-/tmp/a2a_build}
export CUDA_DEVICE_MAX_CONNECTIONS=32
export PYTHONUNBUFFERED=1

say() { echo "[$(($(date +%s) - START))s] $*" | tee -a "$LOG"; }
note() { echo "$*" >> "$SUMMARY"; say "$*"; }
remaining() { echo $((DEADLINE - $(date +%s))); }

# run_step NAME MIN_SECONDS MAX_SECONDS DIR CMD...: runs CMD in DIR with a timeout
# of min(MAX, time left); skipped when less than MIN_SECONDS are left.
run_step() {
  local name=$1 min=$2 max=$3 dir=$4
  shift 4
  local left
  left=$(remaining)
  if ((left < min)); then
    note "SKIPPED $name: ${left}s left, needs ${min}s"
    : > "$WORK/step.log"
    return 99
  fi
  local budget=$((left < max ? left : max))
  say "=== $name (timeout ${budget}s): $*"
  (cd "$dir" && timeout --kill-after=10 "$budget" "$@") > "$WORK/step.log" 2>&1
  local rc=$?
  cat "$WORK/step.log" >> "$LOG"
  say "=== $name: rc=$rc$( ((rc == 124 || rc == 137)) && echo ' (TIMED OUT)')"
  return $rc
}

# The last line of the last step's output that matches $1 (pytest's summary,
# the sanitizer's summary), or a note that there was none.
last_match() { grep -E "$1" "$WORK/step.log" 2>/dev/null | tail -n 1 || true; }

# A prebuilt extension next to the package would be loaded instead of the JIT
# build of this tree's csrc (ops.py prefers it): park it for the session.
PARKED=()
for so in "$ROOT"/vllm_a2a_plugin/_C*.so; do
  [ -e "$so" ] || continue
  mv "$so" "$WORK/" && PARKED+=("$(basename "$so")")
  say "parked prebuilt $so (restored at exit)"
done
finish() {
  for name in ${PARKED[@]+"${PARKED[@]}"}; do mv "$WORK/$name" "$ROOT/vllm_a2a_plugin/$name"; done
  rm -rf "$WORK"
}
trap finish EXIT

# ---------------------------------------------------------------- 1. sources
BEFORE="$WORK/before"
mkdir -p "$BEFORE"
if git -C "$ROOT" cat-file -e "${BEFORE_REF}^{commit}" 2>/dev/null; then
  git -C "$ROOT" archive "$BEFORE_REF" vllm_a2a_plugin csrc | tar -x -C "$BEFORE"
  say "before: $BEFORE_REF from git"
elif [ -f "$ROOT/.latency_old/csrc/dispatch.cu" ]; then
  cp -r "$ROOT/.latency_old/vllm_a2a_plugin" "$ROOT/.latency_old/csrc" "$BEFORE/"
  BEFORE_REF="$(cat "$ROOT/.latency_old/REF" 2>/dev/null || echo unknown) (.latency_old)"
  say "before: copy in .latency_old ($BEFORE_REF)"
else
  note "NO BEFORE SOURCES: $BEFORE_REF is not in this checkout's git and .latency_old/ is absent"
  BEFORE=""
fi
if [ -n "$BEFORE" ]; then
  cp -r "$ROOT/benchmarks" "$BEFORE/benchmarks"
  rm -rf "$BEFORE/benchmarks/results"
fi
AFTER_COMMIT=${A2A_COMMIT:-$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)}
note "before: $BEFORE_REF   after: $AFTER_COMMIT (this tree, uncommitted changes included)"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" >> "$LOG" 2>&1

# ---------------------------------------------------------------- 1b. builds
build() {  # build DIR LOGFILE: JIT-build the extension of DIR's csrc
  (cd "$1" && timeout 300 "$PY" -c "
from vllm_a2a_plugin import ops
ops.require_kernels()
import torch
print('built', ops.csrc_dir(), 'max threads per block', ops.max_threads_per_block(0))
") > "$2" 2>&1
}
say "=== builds (parallel)"
build "$ROOT" "$WORK/build_after.log" &
PID_AFTER=$!
if [ -n "$BEFORE" ]; then build "$BEFORE" "$WORK/build_before.log" & PID_BEFORE=$!; fi
AFTER_OK=1
BEFORE_OK=0
wait "$PID_AFTER" || AFTER_OK=0
if [ -n "$BEFORE" ]; then wait "$PID_BEFORE" && BEFORE_OK=1; fi
for side in after before; do
  [ -f "$WORK/build_$side.log" ] || continue
  echo "--- build $side" >> "$LOG"
  cat "$WORK/build_$side.log" >> "$LOG"
done
if ((AFTER_OK)); then note "build after: ok"; else
  note "BUILD AFTER FAILED; log tail:"
  tail -n 30 "$WORK/build_after.log" | tee -a "$SUMMARY"
fi
if [ -n "$BEFORE" ]; then
  if ((BEFORE_OK)); then note "build before: ok"; else
    note "BUILD BEFORE FAILED; log tail:"
    tail -n 30 "$WORK/build_before.log" | tee -a "$SUMMARY"
  fi
fi

# ---------------------------------------------------------------- 2. benchmarks
BENCH_ARGS=(--shapes deepseek_v3 --dtypes "$DTYPES" --routing uniform --tokens 1,128,1024,4096
            --ep-size 8 --impls a2a_one_sided --modes eager,graph,kernel --iters 30 --warmup 5)
# side_of SIDE: sets SIDE_DIR and SIDE_COMMIT of "before" or "after"; fails when
# that side's extension did not build.
side_of() {
  if [ "$1" = after ]; then SIDE_DIR=$ROOT; SIDE_COMMIT=$AFTER_COMMIT; ((AFTER_OK))
  else SIDE_DIR=$BEFORE; SIDE_COMMIT=$BEFORE_REF; ((BEFORE_OK)); fi
}
bench() {  # bench SIDE RUN
  local side=$1 run=$2
  side_of "$side" || return 0
  A2A_COMMIT="$SIDE_COMMIT" run_step "bench $side #$run" 60 150 "$SIDE_DIR" \
    "$PY" benchmarks/bench_a2a.py "${BENCH_ARGS[@]}" --out "$OUT/${side}_${run}.json"
}
if want bench1; then bench before 1; bench after 1; fi

# ---------------------------------------------------------------- 3. host time
host() {  # host SIDE [SUFFIX]
  local side=$1 suffix=${2:-}
  side_of "$side" || return 0
  run_step "host overhead $side" 30 60 "$SIDE_DIR" "$PY" benchmarks/host_overhead.py \
    --tokens 1 --dtype fp8 --iters 300 --json "$WORK/host_$side$suffix.json"
}
if want host; then host before; host after; fi

# ---------------------------------------------------------------- 3b. eager A/B
# Event-timed eager rows and host times follow the host's and the GPU clocks'
# state of the moment, which moves between processes by more than a host-code
# change: several short processes per side, alternating (before-after, then
# after-before), each a bench_a2a.py eager run (1 rank, 1 and 128 tokens) and a
# host_overhead.py run; the medians per side are summarised.
eager_ab() {
  local rounds=${A2A_EAGER_AB_ROUNDS:-3} i side order
  mkdir -p "$OUT/eager_ab"
  for ((i = 1; i <= rounds; i++)); do
    order="before after"; ((i % 2)) || order="after before"
    for side in $order; do
      side_of "$side" || continue
      A2A_COMMIT="$SIDE_COMMIT" run_step "eager A/B $side #$i" 20 60 "$SIDE_DIR" "$PY" benchmarks/bench_a2a.py \
        --shapes deepseek_v3 --dtypes "$DTYPES" --routing uniform --tokens 1,128 --ep-size 1 \
        --impls a2a_one_sided --modes eager --iters 200 --warmup 20 \
        --out "$OUT/eager_ab/bench_${side}_$i.json"
      run_step "eager A/B host $side #$i" 15 60 "$SIDE_DIR" "$PY" benchmarks/host_overhead.py \
        --tokens 1 --dtype fp8 --iters 300 --json "$OUT/eager_ab/host_${side}_$i.json"
    done
  done
  "$PY" - "$OUT/eager_ab" <<'EOF_AB' >> "$SUMMARY" 2>&1
import json, sys
from pathlib import Path
root = Path(sys.argv[1])
print("## eager A/B, interleaved processes (us; one value per process, in run order)")
for side in ("before", "after"):
    runs = sorted(root.glob(f"bench_{side}_*.json"))
    rows = [json.loads(p.read_text())["rows"] for p in runs]
    for tokens in (1, 128):
        vals = [r["median_us"] for rs in rows for r in rs if r["op"] == "round_trip"
                and r["tokens_per_rank"] == tokens]
        print(f"{side:>6} eager round trip (events), {tokens} tok: {vals}")
    hosts = [json.loads(p.read_text()) for p in sorted(root.glob(f"host_{side}_*.json"))]
    for field in ("host_us_per_round_trip", "raw_planned_us", "python_only_us",
                  "torch_op_floor_us"):
        print(f"{side:>6} {field}: {[h.get(field) for h in hosts]}")
EOF_AB
  (cd "$OUT" && tar czf eager_ab.tgz eager_ab && rm -rf eager_ab)
}
if want eagerab; then eager_ab; fi

# ---------------------------------------------------------------- 4. tests
if ((AFTER_OK)) && want tests; then
  run_step "tests/test_kernels_gpu.py" 120 200 "$ROOT" "$PY" -m pytest tests/test_kernels_gpu.py tests/test_dispatch_checks.py -q \
    && true; note "test_kernels_gpu: $(last_match '(passed|failed|error)')"
fi

# ---------------------------------------------------------------- 5. sanitizer
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
if ((AFTER_OK)) && [ -n "$SAN" ] && want memcheck; then
  A2A_TEST_QUICK=1 A2A_UNDER_SANITIZER=1 run_step "memcheck" 60 150 "$ROOT" "$SAN" --tool memcheck \
    "$PY" -m pytest tests/test_kernels_gpu.py -q \
    -k "matches_reference or rows_cut_into_pieces or zero_tokens"
  note "memcheck: $(last_match 'ERROR SUMMARY') / $(last_match '(passed|failed|error)')"
fi
if ((AFTER_OK)) && [ -n "$SAN" ] && want racecheck; then
  A2A_TEST_QUICK=1 A2A_UNDER_SANITIZER=1 run_step "racecheck" 40 100 "$ROOT" "$SAN" --tool racecheck \
    "$PY" -m pytest tests/test_kernels_gpu.py -q -k "rows_cut_into_pieces and (256-1 or 256-3)"
  note "racecheck: $(last_match 'RACECHECK SUMMARY') / $(last_match '(passed|failed|error)')"
elif ((AFTER_OK)) && [ -z "$SAN" ]; then
  note "SKIPPED sanitizer: compute-sanitizer not found"
fi

# ---------------------------------------------------------------- 5b. probe
if ((AFTER_OK)) && want probe; then
  A2A_COMMIT="$AFTER_COMMIT" run_step "probe (uniform vs local routing, signal floor)" 40 120 "$ROOT" \
    "$PY" benchmarks/bench_a2a.py --shapes deepseek_v3 --dtypes "$DTYPES" --routing uniform,local \
    --tokens 1 --ep-size 8 --impls a2a_one_sided --modes graph,kernel --iters 30 --warmup 5 \
    --signal-floor --trace-dir "$OUT/traces" --out "$OUT/probe_after.json"
  note "probe: $OUT/probe_after.json"
fi

# ---------------------------------------------------------------- 2b/4b. drift pair, more tests
if want bench2; then bench after 2; bench before 2; fi
if want host2; then host after _2; fi
if ((AFTER_OK)) && want faults; then
  run_step "tests/test_faults_gpu.py" 100 150 "$ROOT" "$PY" -m pytest tests/test_faults_gpu.py -q \
    && true; note "test_faults_gpu: $(last_match '(passed|failed|error)')"
fi
if ((AFTER_OK)) && want ipc; then
  run_step "tests/test_ipc_one_gpu.py" 60 120 "$ROOT" "$PY" -m pytest tests/test_ipc_one_gpu.py -q \
    && true; note "test_ipc_one_gpu: $(last_match '(passed|failed|error)')"
fi

# ---------------------------------------------------------------- 6. summary
"$PY" - "$WORK" "$OUT/host.json" <<'EOF' >> "$SUMMARY" 2>&1
import json, sys
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
doc = {side: json.loads((work / f"host_{side}.json").read_text())
       for side in ("before", "after", "after_2") if (work / f"host_{side}.json").exists()}
out.write_text(json.dumps(doc, indent=1))
print("## host time, eager, one rank, 1 token, fp8 (us per round trip)")
for side, d in doc.items():
    print(f"{side:>6}: round trip {d['host_us_per_round_trip']}, dispatch {d['dispatch_us']}, "
          f"combine {d['combine_us']}, with combine(out=...) {d.get('host_us_out_given')}, "
          f"the two ops alone ({d.get('raw_ops', 'general')}) "
          f"{d['raw_ops_us_per_round_trip']} (general {d.get('raw_general_us')}, planned "
          f"{d.get('raw_planned_us')}), our Python alone {d.get('python_only_us')}, "
          f"one trivial torch op {d['torch_op_floor_us']}")
EOF
for run in 1 2; do
  if [ -f "$OUT/before_$run.json" ] && [ -f "$OUT/after_$run.json" ]; then
    echo "" >> "$SUMMARY"
    echo "# pair $run: before_$run.json -> after_$run.json" >> "$SUMMARY"
    (cd "$ROOT" && "$PY" benchmarks/compare_runs.py "$OUT/before_$run.json" "$OUT/after_$run.json" \
      --tokens 1,128,1024,4096) >> "$SUMMARY" 2>&1
  fi
done
if [ -f "$OUT/probe_after.json" ]; then
  "$PY" - "$OUT/probe_after.json" <<'EOF' >> "$SUMMARY" 2>&1
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
print("\n## probe (after): 1 token, uniform vs local routing (us; kernel = profiler, per rank)")
for r in rows:
    if r["impl"] != "a2a_one_sided":
        continue
    extra = {k: r[k] for k in ("queued_median_us", "floor_queued_us", "signal_floor_queued_us",
                               "start_skew_us", "bytes") if k in r}
    print(f"ep{r['ep_size']} {r['routing']:>7} {r['op']:>10} {r['mode']:>6}: median {r['median_us']} {extra}")
EOF
fi
say "session done in $(($(date +%s) - START))s"
echo "================ summary ================"
cat "$SUMMARY"
