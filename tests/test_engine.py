"""The real vLLM engine with the plugin loaded through its entry point.

Needs CUDA, our kernels and vLLM importable (on the GPU machines: the offline
bundle of scripts/vllm_bundle.py on PYTHONPATH). One GPU: ``LLM(...)`` and
``vllm serve`` (a real HTTP request on 127.0.0.1) with CUDA graphs on and off;
with DP=1 the all-to-all itself is idle, so these prove the plugin loads and
the flag is honoured end to end. Two GPUs: DP=2 expert parallel with
``a2a_one_sided`` must give the same greedy tokens as
``allgather_reducescatter``, including a step where one DP rank has no request.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from vllm_a2a_plugin.testing.serve import (complete, engine_env, free_port, start_server,
                                           stop_server, wait_healthy)

pytestmark = pytest.mark.engine

PROMPTS = ["hello world the quick brown fox", "one two three four", "the expert model",
           "red green blue"]


def _skip_reason() -> str | None:
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"vLLM is not importable here ({type(exc).__name__}: {exc})"
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    from vllm_a2a_plugin import ops

    if not ops.kernels_available():
        return "our CUDA kernels are not built here"
    return None


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    from vllm_a2a_plugin.testing.tiny_moe import TinyMoESpec, make_tiny_moe

    return str(make_tiny_moe(tmp_path_factory.mktemp("tiny-moe"), TinyMoESpec(top_k=2)))


@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "cuda-graphs"])
def test_llm_generates_with_the_plugin(tiny_model, enforce_eager):
    code = f"""
import json
from vllm import LLM, SamplingParams
llm = LLM(model={tiny_model!r}, enforce_eager={enforce_eager}, max_model_len=256,
          gpu_memory_utilization=0.3, enable_expert_parallel=True,
          all2all_backend="a2a_one_sided", attention_backend="TRITON_ATTN")
outs = llm.generate({PROMPTS!r}, SamplingParams(temperature=0, max_tokens=8))
print("TOKENS", json.dumps([list(o.outputs[0].token_ids) for o in outs]))
import vllm_a2a_plugin.vllm.hooks as hooks
print("PLUGIN", hooks._installed)
"""
    proc = subprocess.run([sys.executable, "-c", code], env=engine_env(), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    tokens = json.loads(proc.stdout.split("TOKENS", 1)[1].splitlines()[0])
    assert len(tokens) == len(PROMPTS) and all(len(t) == 8 for t in tokens)
    assert "PLUGIN True" in proc.stdout


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "cuda-graphs"])
def test_vllm_serve_answers_http(tiny_model, graphs):
    port = free_port()
    extra = ["--all2all-backend", "a2a_one_sided"] + ([] if graphs else ["--enforce-eager"])
    proc = start_server(tiny_model, port, *extra)
    try:
        wait_healthy(proc, port)
        choice = complete(port, tiny_model, PROMPTS[0])
        assert isinstance(choice["text"], str) and choice["text"]
        assert choice["usage"]["completion_tokens"] > 0
    finally:
        stop_server(proc)


NUM_MOE_LAYERS = 2  # TinyMoESpec's default: every layer is a MoE layer
MAX_TOKENS = 8


def engine_check(model: str, out, *flags: str, env: dict | None = None) -> dict:
    """One ``vllm_a2a_plugin.testing.engine_check`` run in a fresh process."""
    cmd = [sys.executable, "-m", "vllm_a2a_plugin.testing.engine_check", "--model", model,
           "--out", str(out), "--max-tokens", str(MAX_TOKENS), *flags]
    proc = subprocess.run(cmd, env={**engine_env(), **(env or {})}, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    with open(out) as f:
        return json.load(f)


def rounds(counts: list[dict], key: str) -> list[int]:
    return [c[key] for c in counts]


@pytest.mark.parametrize("quantization", ["bf16", "fp8"])
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "cuda-graphs-compile"])
def test_single_rank_mode_runs_our_kernels_in_the_engine(tiny_model, tmp_path, graphs,
                                                         quantization):
    """Issue 12 (test-only mode, one GPU): every MoE layer of a live ``LLM`` runs
    our prepare -> vLLM's Triton experts -> finalize with our kernels at EP = 1.
    The kernels' device counters prove it (one dispatch and one combine per
    MoE layer per forward step, CUDA-graph replays included) and the greedy
    tokens equal vLLM's own MoE path on the same prompts."""
    flags = (["--graphs"] if graphs else []) + (
        ["--quantization", "fp8"] if quantization == "fp8" else [])
    reference = engine_check(tiny_model, tmp_path / "reference.json", *flags)
    ours = engine_check(tiny_model, tmp_path / "ours.json", "--backend", "a2a_one_sided",
                        *flags, env={"VLLM_A2A_TEST_SINGLE_RANK_EP": "1"})
    start, prefill, done = (ours["counts_after_start"], ours["counts_after_prefill"],
                            ours["counts_after_generate"])
    assert len(done) == 1 and done[0]["all_to_alls"] == 1  # layers of one shape share one
    for c in (start, prefill, done):
        assert rounds(c, "dispatches") == rounds(c, "combines")
    assert start[0]["dispatches"] > 0  # profiling / warm-up ran through our kernels
    prefill_rounds = prefill[0]["dispatches"] - start[0]["dispatches"]
    generate_rounds = done[0]["dispatches"] - prefill[0]["dispatches"]
    # One forward step per generated token (4 short prompts batch into one step).
    assert prefill_rounds == NUM_MOE_LAYERS, prefill_rounds
    assert generate_rounds == NUM_MOE_LAYERS * MAX_TOKENS, generate_rounds
    host_calls = done[0]["prepare_calls"] - prefill[0]["prepare_calls"]
    if graphs:
        assert host_calls < generate_rounds  # decode steps were graph replays
    else:
        assert host_calls == generate_rounds
    print("ROUNDS", json.dumps({"start": start, "prefill": prefill, "generate": done}))
    assert ours["tokens"] == reference["tokens"], (ours["tokens"], reference["tokens"])


@pytest.mark.multigpu
def test_dp2_expert_parallel_matches_allgather_reducescatter(tiny_model):
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, {torch.cuda.device_count()} visible")
    results = {}
    for backend in ("allgather_reducescatter", "a2a_one_sided"):
        port = free_port()
        proc = start_server(tiny_model, port, "--data-parallel-size", "2",
                            "--all2all-backend", backend)
        try:
            wait_healthy(proc, port)
            # One request alone: the other DP rank has none in that step.
            alone = complete(port, tiny_model, PROMPTS[0])["text"]
            together = [complete(port, tiny_model, p)["text"] for p in PROMPTS]
            results[backend] = [alone, *together]
        finally:
            stop_server(proc)
    assert results["a2a_one_sided"] == results["allgather_reducescatter"]
