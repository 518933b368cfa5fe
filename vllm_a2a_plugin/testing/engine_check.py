"""Real vLLM engine runs for the engine tests: greedy tokens, top-2 logprobs and
a2a_one_sided round counts, written as JSON.

One rank (``LLM`` in this process)::

    python -m vllm_a2a_plugin.testing.engine_check --model DIR --out run.json \\
        [--backend a2a_one_sided] [--graphs] [--quantization fp8] \\
        [--request '{"prompt": "...", "max_tokens": 8}' ...]

Several DP ranks sharing ONE GPU: :func:`run_dp_on_one_gpu` starts one such
process per rank with vLLM's offline data-parallel settings (``VLLM_DP_*``;
every rank's local DP index 0, so all use ``cuda:0``), no PyNccl (NCCL refuses
two ranks on one GPU; vLLM's own groups stay unused or on gloo), the DP token
sync on gloo, and a fixed KV-cache size (vLLM's memory profiling would count
the other process's allocations as its own). Our pool then shares the EP
workspaces through CUDA IPC. Every rank must call ``generate`` with at least
one request (offline DP has no coordinator to wake an idle engine); a rank
whose requests finish first runs vLLM's dummy batches in lock step until the
others finish, which is the idle-rank case.

Counts come from :func:`vllm_a2a_plugin.vllm.manager.ep_round_counts` through
``LLM.collective_rpc`` after start-up (profiling, warm-up and CUDA-graph
capture run MoE layers), after a prefill-only generate (``max_tokens=1``) and
after the full generate (``ignore_eos``: each request yields exactly its
``max_tokens``). The kernels' device counters count every dispatch/combine,
CUDA-graph replays included; the host counters count Python calls of our
prepare/finalize (captures and eager steps only).

Without ``--backend`` the engine runs vLLM's default MoE path (the reference).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

# The tiny random model's next-token distributions are nearly flat (top logprobs
# around -3.3 over ~130 words), so a near-tie can involve the 3rd or 4th token.
TOP_LOGPROBS = 5
DEFAULT_REQUESTS = [{"prompt": p, "max_tokens": 8} for p in (
    "hello world the quick brown fox", "one two three four", "the expert model",
    "red green blue")]


def _counts(llm) -> list[dict]:
    from vllm_a2a_plugin.vllm.manager import ep_round_counts

    # A function (not a worker method name) crosses to the workers pickled,
    # which vLLM allows only with VLLM_ALLOW_INSECURE_SERIALIZATION (set in main).
    return llm.collective_rpc(ep_round_counts)


def run(args: argparse.Namespace) -> dict:
    from vllm import LLM, SamplingParams

    kwargs = dict(model=args.model, enforce_eager=not args.graphs,
                  max_model_len=args.max_model_len, max_num_seqs=8,
                  gpu_memory_utilization=args.gpu_memory_utilization,
                  attention_backend="TRITON_ATTN", seed=0)
    if args.quantization:
        kwargs["quantization"] = args.quantization
    if args.backend:
        kwargs.update(enable_expert_parallel=True, all2all_backend=args.backend)
    if os.environ.get("VLLM_DP_SIZE"):
        # Two engines on one GPU: no memory profiling, DP sync on gloo.
        kwargs.update(kv_cache_memory_bytes=1 << 30, disable_nccl_for_dp_synchronization=True,
                      max_num_batched_tokens=256)
    requests = args.request
    prompts = [r["prompt"] for r in requests]
    started = time.perf_counter()
    llm = LLM(**kwargs)
    result = {"config": {k: v for k, v in vars(args).items() if k != "out"},
              "dp_rank": int(os.environ.get("VLLM_DP_RANK", "0")),
              "start_s": round(time.perf_counter() - started, 1)}
    counted = bool(args.backend)
    if counted:
        result["counts_after_start"] = _counts(llm)
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1))
    if counted:
        result["counts_after_prefill"] = _counts(llm)
    params = [SamplingParams(temperature=0, max_tokens=r["max_tokens"], ignore_eos=True,
                             logprobs=TOP_LOGPROBS) for r in requests]
    started = time.perf_counter()
    outs = llm.generate(prompts, params)
    result["generate_s"] = round(time.perf_counter() - started, 2)
    if counted:
        result["counts_after_generate"] = _counts(llm)
    result["outputs"] = [{
        "prompt": o.prompt,
        "tokens": list(o.outputs[0].token_ids),
        # Per generated token: {token id: logprob} of the TOP_LOGPROBS most likely
        # tokens (and the chosen one): enough to tell a near-tie from a divergence.
        "top_logprobs": [{str(t): float(lp.logprob) for t, lp in step.items()}
                         for step in o.outputs[0].logprobs],
    } for o in outs]
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--backend", default=None, help="all2all backend (default: vLLM's)")
    parser.add_argument("--graphs", action="store_true",
                        help="CUDA graphs + torch.compile (default: eager)")
    parser.add_argument("--quantization", default=None)
    parser.add_argument("--max-model-len", type=int, default=256)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    parser.add_argument("--request", action="append", type=json.loads, default=None,
                        help='JSON {"prompt": ..., "max_tokens": N}; repeatable')
    args = parser.parse_args(argv)
    args.request = args.request or DEFAULT_REQUESTS
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Test tool only: lets collective_rpc carry our counter function to the workers.
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    result = run(args)
    result["env"] = {k: v for k, v in os.environ.items()
                     if k.startswith(("VLLM_A2A", "VLLM_DP", "VLLM_DISABLE"))}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("ENGINE_CHECK", json.dumps({k: result[k] for k in result if k.startswith("counts")}))


def _free_port_pair() -> int:
    """A port P with P + 1 free too (vLLM's DP group takes P, the workers' world P + 1)."""
    while True:
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            try:
                with socket.socket() as second:
                    second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port


def dp_on_one_gpu_env(rank: int, dp_size: int, port: int) -> dict[str, str]:
    """What one DP rank's process needs to share GPU 0 with the others."""
    return {
        "VLLM_DP_SIZE": str(dp_size), "VLLM_DP_RANK": str(rank),
        "VLLM_DP_RANK_LOCAL": "0",  # every rank's engine picks local device 0
        "VLLM_DP_MASTER_IP": "127.0.0.1", "VLLM_DP_MASTER_PORT": str(port),
        "VLLM_DISABLE_PYNCCL": "1",  # NCCL refuses two ranks on one GPU
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0],
        # Kernels of two processes time-slice one GPU; torch.compile runs per rank.
        "VLLM_A2A_TIMEOUT_S": os.environ.get("VLLM_A2A_TIMEOUT_S", "600"),
        "VLLM_ENGINE_READY_TIMEOUT_S": "1800",
    }


def run_dp_on_one_gpu(model: str, out_dir: Path, requests_per_rank: list[list[dict]],
                      flags: list[str], env: dict[str, str], timeout_s: float = 1500
                      ) -> list[dict]:
    """Start one engine_check process per DP rank, all on GPU 0; their results.

    Output goes to log files (``rank<r>.log`` in ``out_dir``), never to a pipe
    nobody reads (a full pipe would stall vLLM).
    """
    port = _free_port_pair()
    dp_size = len(requests_per_rank)
    procs, logs = [], []
    for rank, requests in enumerate(requests_per_rank):
        cmd = [sys.executable, "-m", "vllm_a2a_plugin.testing.engine_check", "--model", model,
               "--out", str(out_dir / f"rank{rank}.json"), *flags]
        for request in requests:
            cmd += ["--request", json.dumps(request)]
        log = open(out_dir / f"rank{rank}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen(cmd, env={**env, **dp_on_one_gpu_env(rank, dp_size, port)},
                                      stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    deadline = time.monotonic() + timeout_s
    try:
        for rank, proc in enumerate(procs):
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"DP rank {rank} did not finish in {timeout_s} s:\n"
                                     + _tail(out_dir / f"rank{rank}.log")) from None
            if proc.returncode != 0:
                raise AssertionError(f"DP rank {rank} exited with {proc.returncode}:\n"
                                     + _tail(out_dir / f"rank{rank}.log"))
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
        for log in logs:
            log.close()
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(dp_size)]


def _tail(path: Path, chars: int = 6000) -> str:
    return path.read_text(errors="replace")[-chars:]


if __name__ == "__main__":
    main()
