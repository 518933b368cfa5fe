"""A lost DP rank in the real vLLM engine: two DP ranks on one GPU (expert
parallel over our all-to-all), one of them killed (``kill -9``) or stopped
(SIGSTOP) in the middle of a long generate.

The survivor must report the loss in our words, naming the lost rank (the
watchdog's line, then ``A2APeerLostError`` or its exit; never a device timeout:
``VLLM_A2A_TIMEOUT_S`` is 600 s here), within 5 s, and its engine must stop and
exit instead of hanging; the GPU is usable afterwards (a new engine gives the
tokens the engines gave before the fault). With a killed rank vLLM's own
data-parallel all-reduce (gloo) may see the closed connection first and end the
step with its own error; our line is in the log either way. A stopped rank
(its connections stay open) blocks that all-reduce, in the worker and in the
engine core: the worker's watchdog ends both (``VLLM_A2A_PEER_LOST_EXIT_S``).
A stopped rank, resumed after the survivor's error, ends too. Served (``vllm serve``, DP=2 external LB on one GPU): the
request in flight on the survivor gets an error response, not a hang, and its
``/health`` stops answering 200.

Needs CUDA, our kernels and vLLM importable (scripts/gpu_session.sh
engine_faults stages the bundle). Each rank logs to ``rank<r>.log`` in the
test's tmp dir; ``FAULT_RESULT`` lines carry the measured times.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.test_engine import tiny_model  # noqa: F401 - the module fixture
from vllm_a2a_plugin.testing.engine_check import (_distinct_free_ports, _free_port_pair,
                                                  _stop_all, _wait_healthy, dp_on_one_gpu_env,
                                                  serve_dp_command, serve_dp_on_one_gpu_env)
from vllm_a2a_plugin.testing.serve import engine_env

pytestmark = pytest.mark.engine

REPORT_WITHIN_S = 5.0
EXIT_WITHIN_S = 90.0
PROMPTS = ["hello world the quick brown fox", "one two three four"]

# One DP rank: an offline LLM (eager), a warm-up, then long generates until the
# engine fails; prints when it generates and what it raised.
_RANK = r"""
import faulthandler, json, os, sys, time, traceback
from vllm import LLM, SamplingParams
model, prompts = sys.argv[1], json.loads(sys.argv[2])
kwargs = dict(model=model, enforce_eager=True, max_model_len=256, max_num_seqs=8,
              gpu_memory_utilization=0.3, attention_backend="TRITON_ATTN", seed=0)
if os.environ.get("VLLM_DP_SIZE"):
    kwargs.update(enable_expert_parallel=True, all2all_backend="a2a_one_sided",
                  kv_cache_memory_bytes=1 << 30, disable_nccl_for_dp_synchronization=True,
                  max_num_batched_tokens=256)
llm = LLM(**kwargs)
greedy = SamplingParams(temperature=0, max_tokens=8)
outs = llm.generate(prompts, greedy, use_tqdm=False)
print("TOKENS", json.dumps([list(o.outputs[0].token_ids) for o in outs]), flush=True)
if not os.environ.get("VLLM_DP_SIZE"):
    sys.exit(0)
long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
print("GENERATING", time.time(), flush=True)
# The fault comes ~2 s from now. Still here a minute later: every thread's stack
# into this log, well before the test gives up (60 s for a word of the loss, then
# 90 s for the exit). The engine core's stacks: _dump_stacks in the test.
faulthandler.dump_traceback_later(60, exit=False, file=sys.stderr)
try:
    while True:
        llm.generate(prompts, long, use_tqdm=False)
except BaseException as exc:
    faulthandler.cancel_dump_traceback_later()
    print("RAISED", time.time(), type(exc).__name__, str(exc)[:500].replace("\n", " "), flush=True)
    traceback.print_exc()
    sys.exit(3)
"""


# A step blocked in vLLM's per-step DP all-reduce (gloo) with a stopped peer is
# ended by none of our waits: the watchdog ends the process 3 s after the loss.
# PYTHONFAULTHANDLER: every Python process of a rank (the front end and vLLM's
# engine core, which inherits the environment) prints its threads' stacks on a
# fatal signal; _dump_stacks sends one to a rank the test found hung.
FAULT_ENV = {"VLLM_A2A_PEER_LOST_EXIT_S": "3", "PYTHONFAULTHANDLER": "1"}


def _start_rank(model: str, rank: int, port: int, log_path: Path) -> subprocess.Popen:
    env = {**engine_env(), **dp_on_one_gpu_env(rank, 2, port), **FAULT_ENV}
    log = open(log_path, "w")  # noqa: SIM115 - the child keeps it; closed with the test
    return subprocess.Popen([sys.executable, "-c", _RANK, model, json.dumps(PROMPTS)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for_line(path: Path, marker: str | tuple[str, ...], timeout_s: float,
                   procs: list[subprocess.Popen] = ()) -> tuple[float, str] | None:
    """(time it was seen, the line) of the first line of ``path`` holding ``marker``
    (any of them, for a tuple)."""
    markers = (marker,) if isinstance(marker, str) else marker
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in path.read_text(errors="replace").splitlines():
            if any(m in line for m in markers):
                return time.time(), line
        if any(p.poll() is not None for p in procs):
            return None
        time.sleep(0.05)
    return None


def _tokens_line(text: str) -> list:
    return json.loads(text.split("TOKENS", 1)[1].splitlines()[0])


# What ended the survivor's engine, first match in its log.
_CAUSES = (("A2APeerLostError", "our error (A2APeerLostError)"),
           ("did not stop within", "our watchdog's exit (blocked in a host collective)"),
           ("gloo", "vLLM's data-parallel all-reduce (gloo) saw the closed connection"))


def _cause(text: str) -> str:
    return next((why for marker, why in _CAUSES if marker in text), "unknown")


def _reference_tokens(model: str, tmp_path: Path, name: str) -> list:
    log = tmp_path / f"{name}.log"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-c", _RANK, model, json.dumps(PROMPTS)],
                              env=engine_env(), stdout=f, stderr=subprocess.STDOUT, timeout=400)
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    return _tokens_line(text)


def _tail(path: Path, chars: int = 5000) -> str:
    return path.read_text(errors="replace")[-chars:]


def _dump_stacks(proc: subprocess.Popen, log: Path) -> str:
    """End a rank the test found hung so that it says where: SIGABRT to its
    process group (front end and engine core: faulthandler, on through
    FAULT_ENV, prints every thread's stack into the log), then the log's tail."""
    try:
        os.killpg(proc.pid, signal.SIGCONT)  # a stopped rank takes the signal too
        os.killpg(proc.pid, signal.SIGABRT)
    except ProcessLookupError:
        return _tail(log)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass
    time.sleep(1.0)  # the engine core (not our child) may still be writing
    return _tail(log, 30000)


@pytest.mark.parametrize("fault", ["kill", "stop"])
def test_dp2_lost_rank_reports_our_error_fast(tiny_model, tmp_path, fault):  # noqa: F811
    port = _free_port_pair()
    logs = [tmp_path / f"rank{r}.log" for r in range(2)]
    procs = [_start_rank(tiny_model, r, port, logs[r]) for r in range(2)]
    try:
        for r in range(2):
            if _wait_for_line(logs[r], "GENERATING", 480, procs) is None:
                pytest.fail(f"DP rank {r} never started generating:\n{_tail(logs[r])}")
        time.sleep(2.0)  # mid-generate: both ranks in steps that run our kernels
        fault_at = time.time()
        os.killpg(procs[1].pid, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        # The first word of ours in the survivor's log: the watchdog's own line
        # (printed when it raises the abort word) or the exception the engine died of.
        seen = _wait_for_line(logs[0], ("watchdog (pid", "A2APeerLostError"), 60)
        if seen is None:
            pytest.fail("no word of the lost peer on the survivor:\n"
                        + _dump_stacks(procs[0], logs[0]))
        report_s = seen[0] - fault_at
        raised = _wait_for_line(logs[0], "RAISED", EXIT_WITHIN_S, procs[:1])
        text = logs[0].read_text(errors="replace")
        print("FAULT_RESULT", json.dumps({
            "fault": fault, "report_s": round(report_s, 3), "line": seen[1][:300],
            "engine_raised_s": round(raised[0] - fault_at, 3) if raised else None,
            "engine_stopped_by": _cause(text),
            "our_error_in_log": "A2APeerLostError" in text,
            "engine_core_ended": "ending its engine process" in text}))
        assert report_s < REPORT_WITHIN_S, report_s
        assert "EP rank 1 lost" in text or "EP rank 1 was lost" in text
        assert "A2ATimeoutError" not in text
        if raised is None:
            pytest.fail("the survivor's engine did not stop:\n" + _dump_stacks(procs[0], logs[0]))
        assert _cause(text) != "unknown", f"the engine died of something else:\n{text[-5000:]}"
        try:
            procs[0].wait(EXIT_WITHIN_S)  # the survivor exits, it does not hang
        except subprocess.TimeoutExpired:
            pytest.fail(f"the survivor hangs after the loss:\n{_dump_stacks(procs[0], logs[0])}")
        assert procs[0].returncode != 0
        before = _tokens_line(text)
        if fault == "stop":  # resumed after the error: it ends too, naming the same loss
            os.killpg(procs[1].pid, signal.SIGCONT)
            try:
                procs[1].wait(EXIT_WITHIN_S)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the resumed rank hangs:\n{_dump_stacks(procs[1], logs[1])}")
            print("FAULT_RESULT", json.dumps({
                "fault": "stop/resumed", "exit": procs[1].returncode,
                "our_error": "A2APeerLostError" in logs[1].read_text(errors="replace")}))
    finally:
        for proc in procs:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass
            proc.wait(30)
    # The GPU is usable: a new engine gives the tokens the engines gave before
    # the fault (which test_engine.py checks against one engine without DP).
    after = _reference_tokens(tiny_model, tmp_path, "after")
    assert after == before and all(len(t) == 8 for t in after)


def test_served_dp2_request_in_flight_errors_and_health_reports_dead(tiny_model,  # noqa: F811
                                                                     tmp_path):
    rpc_port, *http_ports = _distinct_free_ports(3)
    env = {**serve_dp_on_one_gpu_env(engine_env()), **FAULT_ENV}
    logs = [tmp_path / f"serve-rank{r}.log" for r in range(2)]
    procs = []
    try:
        for rank in range(2):
            log = open(logs[rank], "w")  # noqa: SIM115 - the child keeps it
            procs.append(subprocess.Popen(
                serve_dp_command(tiny_model, rank, 2, http_ports[rank], rpc_port,
                                 ["--enforce-eager", "--all2all-backend", "a2a_one_sided"]),
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        _wait_healthy(procs, http_ports, 480)
        answer: dict = {}

        def long_request() -> None:
            body = json.dumps({"model": tiny_model, "prompt": PROMPTS[0], "max_tokens": 240,
                               "temperature": 0, "ignore_eos": True}).encode()
            request = urllib.request.Request(f"http://127.0.0.1:{http_ports[0]}/v1/completions",
                                             data=body,
                                             headers={"Content-Type": "application/json"})
            started = time.time()
            try:
                with urllib.request.urlopen(request, timeout=120) as r:
                    answer.update(status=r.status, body=r.read()[:300].decode(errors="replace"))
            except urllib.error.HTTPError as exc:
                answer.update(status=exc.code, body=exc.read()[:300].decode(errors="replace"))
            except OSError as exc:  # the server closed the connection: also an answer
                answer.update(status=None, body=f"{type(exc).__name__}: {exc}")
            answer["after_s"] = time.time() - started

        thread = threading.Thread(target=long_request)
        thread.start()
        time.sleep(1.5)
        fault_at = time.time()
        os.killpg(procs[1].pid, signal.SIGKILL)
        thread.join(150)
        if thread.is_alive():
            pytest.fail("the request in flight hangs; the survivor:\n"
                        + _dump_stacks(procs[0], logs[0]))
        health = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_ports[0]}/health",
                                            timeout=2) as r:
                    health = r.status
            except urllib.error.HTTPError as exc:
                health = exc.code
            except OSError:
                health = "down"
            if health != 200:
                break
            time.sleep(0.5)
        text = logs[0].read_text(errors="replace")
        print("FAULT_RESULT", json.dumps({
            "fault": "serve/kill", "answer": answer, "health": health,
            "after_fault_s": round(time.time() - fault_at, 2),
            "engine_stopped_by": _cause(text), "our_error": "A2APeerLostError" in text}))
        assert answer.get("status") != 200 or "error" in answer.get("body", "").lower(), answer
        assert health != 200, "the survivor still reports healthy"
        # Which word comes first is a race: vLLM's gloo all-reduce may see the
        # closed socket and tear the engine down (its workers too) before our
        # watchdog's next look; either is a known, fast end (no hang, no timeout).
        assert _cause(text) != "unknown", text[-5000:]
        assert "A2ATimeoutError" not in text
    finally:
        _stop_all(procs, grace_s=20)
