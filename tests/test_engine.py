"""The real vLLM engine with the plugin loaded through its entry point.

Needs CUDA, our kernels and vLLM importable (on the GPU machines: the offline
bundle of scripts/vllm_bundle.py on PYTHONPATH). One GPU: ``LLM(...)`` and
``vllm serve`` (a real HTTP request on 127.0.0.1) with CUDA graphs on and off;
with DP=1 the all-to-all itself is idle, so these prove the plugin loads and
the flag is honoured end to end. Two DP ranks on one GPU, offline (``LLM``)
and served (``vllm serve`` in external load-balancing mode, every request to
rank 0): both ranks' MoE layers run our kernels, the idle rank's dummy batches
included. Two GPUs: DP=2 expert parallel with ``a2a_one_sided`` must give the
same greedy tokens as ``allgather_reducescatter``, including a step where one
DP rank has no request.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest
import torch

from tests.greedy_compare import (LOGPROB_TOL, compare_greedy, fp8_tolerance,
                                  quantization_noise)
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


def engine_check(model: str, out, *flags: str, env: dict | None = None,
                 requests: list[dict] | None = None) -> dict:
    """One ``vllm_a2a_plugin.testing.engine_check`` run in a fresh process."""
    cmd = [sys.executable, "-m", "vllm_a2a_plugin.testing.engine_check", "--model", model,
           "--out", str(out), *flags]
    for request in requests or [{"prompt": p, "max_tokens": MAX_TOKENS} for p in PROMPTS]:
        cmd += ["--request", json.dumps(request)]
    proc = subprocess.run(cmd, env={**engine_env(), **(env or {})}, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    with open(out) as f:
        return json.load(f)


def rounds(result: dict, point: str, key: str = "dispatches") -> int:
    """One rank's counter at a point; the run has exactly one worker."""
    (counts,) = result[f"counts_after_{point}"]
    return counts[key]


def check_counts(result: dict, micro_batches: int = 1) -> dict:
    """Dispatches and combines pair up; returns this rank's per-phase rounds."""
    for point in ("start", "prefill", "generate"):
        assert rounds(result, point) == rounds(result, point, "combines"), point
    (done,) = result["counts_after_generate"]
    # The tiny model's MoE layers share one shape: one all-to-all per micro-batch.
    assert done["all_to_alls"] == micro_batches, done
    return {"start": rounds(result, "start"),
            "prefill": rounds(result, "prefill") - rounds(result, "start"),
            "generate": rounds(result, "generate") - rounds(result, "prefill"),
            "generate_host_calls": (rounds(result, "generate", "prepare_calls")
                                    - rounds(result, "prefill", "prepare_calls")),
            "allocation": done["allocation"]}


def _flags(graphs: bool, quantization: str) -> list[str]:
    return (["--graphs"] if graphs else []) + (
        ["--quantization", "fp8"] if quantization == "fp8" else [])


@pytest.mark.parametrize("quantization", ["bf16", "fp8"])
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "cuda-graphs-compile"])
def test_single_rank_mode_runs_our_kernels_in_the_engine(tiny_model, tmp_path, graphs,
                                                         quantization):
    """Test-only mode, one GPU: every MoE layer of a live ``LLM`` runs
    our prepare -> vLLM's Triton experts -> finalize with our kernels at EP = 1.
    The kernels' device counters prove it (one dispatch and one combine per
    MoE layer per forward step, CUDA-graph replays included) and the greedy
    tokens equal vLLM's own MoE path on the same prompts."""
    flags = _flags(graphs, quantization)
    reference = engine_check(tiny_model, tmp_path / "reference.json", *flags)
    ours = engine_check(tiny_model, tmp_path / "ours.json", "--backend", "a2a_one_sided",
                        *flags, env={"VLLM_A2A_TEST_SINGLE_RANK_EP": "1"})
    counts = check_counts(ours)
    assert counts["start"] > 0  # profiling / warm-up ran through our kernels
    # One forward per generated token (the 4 short prompts batch into one step);
    # vLLM's async scheduling may run one more step before it sees the requests end.
    assert counts["prefill"] in (NUM_MOE_LAYERS, 2 * NUM_MOE_LAYERS), counts
    assert counts["generate"] in (NUM_MOE_LAYERS * MAX_TOKENS,
                                  NUM_MOE_LAYERS * (MAX_TOKENS + 1)), counts
    if graphs:
        assert counts["generate_host_calls"] < counts["generate"], counts  # graph replays
    else:
        assert counts["generate_host_calls"] == counts["generate"], counts
    summary = compare_greedy(ours["outputs"], reference["outputs"], LOGPROB_TOL[quantization])
    print("ENGINE_RESULT", json.dumps({"counts": counts, "tokens": summary}))


@pytest.mark.parametrize("quantization", ["bf16", "fp8"])
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "cuda-graphs-compile"])
def test_two_dp_ranks_on_one_gpu_run_our_kernels(tiny_model, tmp_path, graphs, quantization):
    """Two real DP engines (DP=2, EP=2) share one GPU; their MoE
    layers exchange tokens through our kernels over CUDA-IPC workspaces. Rank 1
    finishes its one request after 2 tokens and then runs vLLM's dummy batches
    while rank 0 decodes on (the idle-rank case): both ranks' device counters
    must advance in lock step, and every prompt's greedy tokens must equal a
    DP=1 run of vLLM's own MoE path."""
    from vllm_a2a_plugin.testing.engine_check import run_dp_on_one_gpu

    flags = _flags(graphs, quantization)
    requests = [[{"prompt": PROMPTS[0], "max_tokens": MAX_TOKENS},
                 {"prompt": PROMPTS[1], "max_tokens": MAX_TOKENS}],
                [{"prompt": PROMPTS[2], "max_tokens": 2}]]
    ranks = run_dp_on_one_gpu(tiny_model, tmp_path, requests,
                              ["--backend", "a2a_one_sided", *flags], engine_env())
    reference = engine_check(tiny_model, tmp_path / "reference.json", *flags,
                             requests=requests[0] + requests[1])
    counts = [check_counts(r) for r in ranks]
    assert [c["allocation"] for c in counts] == ["cuda_ipc", "cuda_ipc"]
    for phase in ("start", "prefill", "generate"):
        assert counts[0][phase] == counts[1][phase], (phase, counts)  # lock step
    assert counts[0]["start"] > 0, counts
    # Rank 0 needs MAX_TOKENS forward steps; rank 1 joins each with a real or a
    # dummy batch. Offline DP engines decide every 16 steps (vLLM's
    # dp_sync_interval) whether any rank still has work, so a wave runs in
    # whole blocks of steps, dummy batches on both ranks after the last token
    # (seen on an H100: 16 steps for the prefill-only and for the 8-token wave).
    for phase, least_steps in (("prefill", 1), ("generate", MAX_TOKENS)):
        assert counts[0][phase] % NUM_MOE_LAYERS == 0, counts
        assert counts[0][phase] >= NUM_MOE_LAYERS * least_steps, counts
    outputs = ranks[0]["outputs"] + ranks[1]["outputs"]
    tolerances = {}
    if quantization == "fp8":
        # Each EP rank here scales what it received; the DP=1 reference scales its
        # whole batch: other token sets, so other fp8 rounding. How much that can
        # move these logprobs is read from vLLM's own fp8 run against its bf16 run.
        unquantized = engine_check(tiny_model, tmp_path / "reference_bf16.json",
                                   *_flags(graphs, "bf16"), requests=requests[0] + requests[1])
        noise = quantization_noise(reference["outputs"], unquantized["outputs"])
        tol, gap_tol = fp8_tolerance(noise)
        tolerances = {"fp8_noise": noise, "tol": tol, "gap_tol": gap_tol}
    else:
        tol = gap_tol = LOGPROB_TOL[quantization]
    summary = compare_greedy(outputs, reference["outputs"], tol, gap_tol)
    print("ENGINE_RESULT", json.dumps({"counts": counts, "tokens": summary, **tolerances,
                                       "generate_s": [r["generate_s"] for r in ranks]}))


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "cuda-graphs-compile"])
def test_two_dp_ranks_with_dual_batch_overlap(tiny_model, tmp_path, graphs):
    """``--enable-dbo`` with two DP engines on one GPU: vLLM splits steps into two
    micro-batches (thresholds of 2 tokens; both ranks get two prompts of equal
    length budget so every step qualifies on both), each micro-batch's
    dispatch and combine run through its own workspace on vLLM's comm stream.
    Both ranks' counters move in lock step, micro-batch 1's workspace does
    real rounds (a whole number of MoE layers: one per layer of every split
    step), and the greedy tokens equal a DP=1 run of vLLM's own MoE path."""
    from vllm_a2a_plugin.testing.engine_check import run_dp_on_one_gpu

    flags = _flags(graphs, "bf16") + ["--dbo"]
    requests = [[{"prompt": PROMPTS[0], "max_tokens": MAX_TOKENS},
                 {"prompt": PROMPTS[1], "max_tokens": MAX_TOKENS}],
                [{"prompt": PROMPTS[2], "max_tokens": MAX_TOKENS},
                 {"prompt": PROMPTS[3], "max_tokens": MAX_TOKENS}]]
    ranks = run_dp_on_one_gpu(tiny_model, tmp_path, requests,
                              ["--backend", "a2a_one_sided", *flags], engine_env())
    reference = engine_check(tiny_model, tmp_path / "reference.json", *_flags(graphs, "bf16"),
                             requests=requests[0] + requests[1])
    counts = [check_counts(r, micro_batches=2) for r in ranks]
    for phase in ("start", "prefill", "generate"):
        assert counts[0][phase] == counts[1][phase], (phase, counts)  # lock step
    split = []
    for result in ranks:
        start, done = result["counts_after_start"][0], result["counts_after_generate"][0]
        second = [c["dispatches_by_micro_batch"][1] for c in (start, done)]
        split.append({"micro_batch_1_dispatches": second[1] - second[0],
                      "overlapped_prepare_calls": done["overlapped_prepare_calls"]
                      - start["overlapped_prepare_calls"],
                      "by_micro_batch": done["dispatches_by_micro_batch"]})
    assert split[0]["micro_batch_1_dispatches"] == split[1]["micro_batch_1_dispatches"], split
    assert split[0]["micro_batch_1_dispatches"] > 0, split  # steps were split
    assert split[0]["micro_batch_1_dispatches"] % NUM_MOE_LAYERS == 0, split
    if not graphs:
        # Eager: every split step's prepare ran in a micro-batch thread, twice per layer.
        for rank in split:
            assert rank["overlapped_prepare_calls"] == 2 * rank["micro_batch_1_dispatches"], split
    summary = compare_greedy(ranks[0]["outputs"] + ranks[1]["outputs"], reference["outputs"],
                             LOGPROB_TOL["bf16"])
    print("ENGINE_RESULT", json.dumps({"counts": counts, "split": split, "tokens": summary,
                                       "generate_s": [r["generate_s"] for r in ranks]}))


def test_vllm_serve_dp2_on_one_gpu_idle_rank_runs_our_kernels(tiny_model, tmp_path):
    """``vllm serve`` with DP=2, EP=2, both ranks on one GPU (external load
    balancing: one server per rank), eager, bf16. Every request goes to rank 0;
    rank 1 gets none, so only vLLM's DP coordinator can wake it (START_DP_WAVE)
    to run dummy batches through our kernels while rank 0 decodes. Per request
    both ranks' device counters must advance by the same amount, at least one
    dispatch per MoE layer per generated token, and the greedy tokens must
    equal a DP=1 run of vLLM's own MoE path."""
    from vllm_a2a_plugin.testing.engine_check import serve_dp_on_one_gpu

    requests = [{"prompt": PROMPTS[0], "max_tokens": MAX_TOKENS},
                {"prompt": PROMPTS[1], "max_tokens": MAX_TOKENS}]
    served = serve_dp_on_one_gpu(tiny_model, tmp_path, requests,
                                 ["--all2all-backend", "a2a_one_sided", "--enforce-eager"],
                                 engine_env())
    reference = engine_check(tiny_model, tmp_path / "reference.json", requests=requests)

    start = served["counts_after_start"]
    every_read = [start, *served["counts_after_request"]]
    assert [c["dp_rank"] for c in start] == [0, 1], start  # each port answers for its rank
    assert [c["allocation"] for c in start] == ["cuda_ipc", "cuda_ipc"], start
    for ranks in every_read:
        for counts in ranks:
            assert counts["dispatches"] == counts["combines"], ranks
            assert counts["all_to_alls"] == 1, ranks  # the tiny model's layers share one shape
    assert start[0]["dispatches"] == start[1]["dispatches"] > 0, start  # profiling in lock step
    waves = []
    for before, after in itertools.pairwise(every_read):
        dispatches = [a["dispatches"] - b["dispatches"] for a, b in zip(after, before)]
        host_calls = [a["prepare_calls"] - b["prepare_calls"] for a, b in zip(after, before)]
        waves.append({"dispatches": dispatches, "host_calls": host_calls})
        # Rank 1 had no request, yet ran as many rounds as rank 0: its dummy batches.
        assert dispatches[0] == dispatches[1], waves
        # MAX_TOKENS forward steps at least; the wave then runs dummy batches on
        # both ranks up to the next DP sync step (vLLM's dp_sync_interval, 16).
        assert dispatches[0] % NUM_MOE_LAYERS == 0, waves
        assert dispatches[0] >= NUM_MOE_LAYERS * MAX_TOKENS, waves
        assert host_calls == dispatches, waves  # eager: one Python call per round
    assert all(o["text"] for o in served["outputs"]), served["outputs"]
    summary = compare_greedy(served["outputs"], reference["outputs"], LOGPROB_TOL["bf16"])
    print("ENGINE_RESULT", json.dumps({"start": [c["dispatches"] for c in start],
                                       "waves": waves, "tokens": summary,
                                       "exit_codes": served["exit_codes"]}))


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
