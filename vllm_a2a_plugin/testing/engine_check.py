"""Real vLLM engine runs for the engine tests: greedy tokens, top-2 logprobs and
a2a_one_sided round counts, written as JSON.

One rank (``LLM`` in this process)::

    python -m vllm_a2a_plugin.testing.engine_check --model DIR --out run.json \\
        [--backend a2a_one_sided] [--graphs] [--quantization fp8] [--dbo] \\
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

``vllm serve`` with several DP ranks sharing ONE GPU: :func:`serve_dp_on_one_gpu`
starts one ``vllm serve`` per rank in vLLM's external load-balancing mode
(``--data-parallel-rank r``, each rank its own HTTP port; rank 0's process runs
the DP coordinator), sends every request to rank 0 only, and reads every rank's
counters through vLLM's ``/collective_rpc`` dev endpoint. A rank that gets no
request is woken by the coordinator (``START_DP_WAVE``) and runs dummy batches
in lock step, which is the idle-rank case offline DP cannot reach.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
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


def generate_in_one_batch(llm, prompts: list[str], params):
    """``llm.generate`` with every request queued before the first step.

    ``LLM.generate`` hands requests to the engine core (another process) one by
    one, and the core steps as soon as it has one: which requests share the
    first steps then depends on timing. With fp8's dynamic per-tensor
    activation scales (one scale over the step's tokens) that changes the
    numbers, so two runs of the same model could part at a near-tie (seen with
    vLLM 0.33, eager fp8, single-rank mode against plain vLLM). vLLM's
    documented way to queue first: pause scheduling (``sleep(level=0)``),
    enqueue, resume. Offline DP engines keep ``generate``: their steps are
    paced by DP waves across ranks, which a paused rank would stall.
    """
    if os.environ.get("VLLM_DP_SIZE"):
        return llm.generate(prompts, params, use_tqdm=False)
    llm.sleep(level=0)
    llm.enqueue(prompts, params, use_tqdm=False)
    llm.wake_up(tags=["scheduling"])
    return llm.wait_for_completion(use_tqdm=False)


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
    if args.dbo:
        # Dual-batch overlap with the smallest thresholds vLLM accepts (one
        # token per micro-batch), so the tiny model's steps really split.
        kwargs.update(enable_dbo=True, dbo_decode_token_threshold=2,
                      dbo_prefill_token_threshold=2)
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
    generate_in_one_batch(llm, prompts, SamplingParams(temperature=0, max_tokens=1))
    if counted:
        result["counts_after_prefill"] = _counts(llm)
    params = [SamplingParams(temperature=0, max_tokens=r["max_tokens"], ignore_eos=True,
                             logprobs=TOP_LOGPROBS) for r in requests]
    started = time.perf_counter()
    outs = generate_in_one_batch(llm, prompts, params)
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
    parser.add_argument("--dbo", action="store_true",
                        help="dual-batch overlap (--enable-dbo) with thresholds of 2 tokens")
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


def _distinct_free_ports(count: int) -> list[int]:
    """``count`` different ports, each free when asked (held open together, so
    the OS cannot hand out one twice)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


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


class EpRoundCountsWorkerExtension:
    """A worker extension (vLLM's ``--worker-extension-cls``) that gives every
    worker a method :meth:`a2a_ep_round_counts`.

    vLLM's ``/collective_rpc`` HTTP endpoint calls worker methods by name only
    (no pickled functions cross HTTP), so a served engine reaches
    :func:`~vllm_a2a_plugin.vllm.manager.ep_round_counts` through this method.
    vLLM appends this class to the worker class's bases; the name must not
    clash with a worker attribute (vLLM asserts that).
    """

    def a2a_ep_round_counts(self) -> dict:
        from vllm_a2a_plugin.vllm.manager import ep_round_counts

        return ep_round_counts(self)


# Spelt out: this module also runs as __main__, where __name__ would not resolve.
COUNTS_WORKER_EXTENSION = "vllm_a2a_plugin.testing.engine_check.EpRoundCountsWorkerExtension"
COUNTS_RPC_METHOD = "a2a_ep_round_counts"


def serve_dp_command(model: str, rank: int, dp_size: int, http_port: int, rpc_port: int,
                     flags: list[str]) -> list[str]:
    """``vllm serve`` for DP rank ``rank`` of ``dp_size`` in external load-balancing
    mode, every rank sharing GPU 0 with the others.

    - ``--data-parallel-rank`` selects external LB: one API server and one
      engine per process; rank 0's process also runs the DP coordinator, which
      wakes idle ranks for each wave. ``--data-parallel-size-local 1`` is what
      that mode requires (and what vLLM's own external-LB tests pass).
    - ``--data-parallel-address``/``--data-parallel-rpc-port``: where rank 0's
      front end takes the other ranks' engine handshakes (same on all ranks).
    - ``--disable-nccl-for-dp-synchronization``: the per-step DP token sync on
      gloo (NCCL refuses two ranks on one GPU).
    - ``--kv-cache-memory-bytes``: a fixed KV cache, no memory profiling (it
      would count the other engine's allocations as its own).
    - ``--worker-extension-cls``: our counter method for ``/collective_rpc``.
    """
    return [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model,
            "--host", "127.0.0.1", "--port", str(http_port),
            "--max-model-len", "256", "--max-num-seqs", "8", "--max-num-batched-tokens", "256",
            "--gpu-memory-utilization", "0.3", "--kv-cache-memory-bytes", str(1 << 30),
            "--seed", "0", "--attention-backend", "TRITON_ATTN", "--enable-expert-parallel",
            "--data-parallel-size", str(dp_size), "--data-parallel-rank", str(rank),
            "--data-parallel-size-local", "1", "--data-parallel-address", "127.0.0.1",
            "--data-parallel-rpc-port", str(rpc_port), "--disable-nccl-for-dp-synchronization",
            "--worker-extension-cls", COUNTS_WORKER_EXTENSION, *flags]


def serve_dp_on_one_gpu_env(env: dict[str, str]) -> dict[str, str]:
    """What every rank's ``vllm serve`` needs to share GPU 0 with the others.

    Every external-LB rank's engine is local DP rank 0 of its own process, so
    its worker takes logical device 0; one visible GPU makes that the same GPU
    for all ranks. Offline DP's ``VLLM_DP_*`` variables are dropped: serve takes
    DP from its flags, and a stray one would only mislead a reader of the log.
    """
    served = {k: v for k, v in env.items() if not k.startswith("VLLM_DP_")}
    served.update({
        "CUDA_VISIBLE_DEVICES": env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0],
        "VLLM_DISABLE_PYNCCL": "1",  # NCCL refuses two ranks on one GPU
        "VLLM_SERVER_DEV_MODE": "1",  # mounts /collective_rpc, how counts are read
        # Kernels of two processes time-slice one GPU; each rank compiles on its own.
        "VLLM_A2A_TIMEOUT_S": env.get("VLLM_A2A_TIMEOUT_S", "600"),
        "VLLM_ENGINE_READY_TIMEOUT_S": "1800",
    })
    return served


def _post_json(port: int, path: str, body: dict, timeout_s: float) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as reply:
        return json.loads(reply.read())


def _served_counts(port: int) -> dict:
    """One served rank's :func:`ep_round_counts` (its one worker: TP = 1)."""
    (counts,) = _post_json(port, "/collective_rpc", {"method": COUNTS_RPC_METHOD},
                           timeout_s=60)["results"]
    return counts


def _settled_counts(ports: list[int], timeout_s: float = 120, poll_s: float = 0.5,
                    stable_reads: int = 3) -> list[dict]:
    """Every rank's counts once none has moved over ``stable_reads`` reads.

    An answered request does not end its wave: the ranks run dummy batches up to
    the next DP sync step (vLLM's ``dp_sync_interval``) before they agree to
    stop, so counts read at once could catch one rank mid-tail.
    """
    deadline = time.monotonic() + timeout_s
    history: list[list[dict]] = []
    while time.monotonic() < deadline:
        history.append([_served_counts(port) for port in ports])
        recent = history[-stable_reads:]
        if len(recent) == stable_reads and all(reads == recent[0] for reads in recent):
            return recent[0]
        time.sleep(poll_s)
    raise AssertionError(f"counts still moving after {timeout_s} s: {history[-stable_reads:]}")


def _served_completion(port: int, model: str, request: dict) -> dict:
    """One greedy ``/v1/completions`` request, in :func:`run`'s output format.

    ``ignore_eos`` gives exactly ``max_tokens`` tokens; ``return_tokens_as_token_ids``
    names every token ``token_id:<id>`` so tokens and top logprobs come back as
    ids, comparable with an offline run's.
    """
    reply = _post_json(port, "/v1/completions", {
        "model": model, "prompt": request["prompt"], "max_tokens": request["max_tokens"],
        "temperature": 0, "ignore_eos": True, "logprobs": TOP_LOGPROBS,
        "return_tokens_as_token_ids": True}, timeout_s=300)
    choice = reply["choices"][0]

    def token_id(name: str) -> str:
        assert name.startswith("token_id:"), name
        return name.removeprefix("token_id:")

    logprobs = choice["logprobs"]
    top_logprobs = []  # per generated token: {token id: logprob}, the chosen one included
    for top, chosen, chosen_logprob in zip(logprobs["top_logprobs"], logprobs["tokens"],
                                           logprobs["token_logprobs"]):
        step = {token_id(name): logprob for name, logprob in top.items()}
        step[token_id(chosen)] = chosen_logprob
        top_logprobs.append(step)
    return {"prompt": request["prompt"], "text": choice["text"],
            "tokens": [int(token_id(name)) for name in logprobs["tokens"]],
            "top_logprobs": top_logprobs}


def _stop_all(procs: list[subprocess.Popen], grace_s: float = 60) -> list[int]:
    """Stop every rank's process group; their leaders' exit codes.

    SIGTERM to all at once (vLLM's clean shutdown; rank 0's front end holds the
    coordinator the other ranks talk to, so ranks stopped one by one would wait
    on a peer already gone), once only (a second SIGTERM can cut vLLM's shutdown
    short), SIGKILL to a leader still running after ``grace_s``, then SIGKILL
    to whatever is left in each group (an engine or coordinator process that
    outlived its server would hold GPU memory into the next test).
    """
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # the whole group is gone already
    return [proc.returncode for proc in procs]


def _wait_healthy(procs: list[subprocess.Popen], ports: list[int], timeout_s: float) -> None:
    """Until every rank's ``/health`` answers 200; fails at once if a rank exits."""
    deadline = time.monotonic() + timeout_s
    pending = dict(enumerate(ports))
    while pending:
        for rank, port in list(pending.items()):
            if procs[rank].poll() is not None:
                raise AssertionError(f"DP rank {rank}'s vllm serve exited with "
                                     f"{procs[rank].returncode} before it was healthy")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        del pending[rank]
            except OSError:
                pass
        if pending:
            if time.monotonic() > deadline:
                raise AssertionError(f"DP ranks {sorted(pending)} not healthy in {timeout_s} s")
            time.sleep(1)


def serve_dp_on_one_gpu(model: str, out_dir: Path, requests: list[dict], flags: list[str],
                        env: dict[str, str], dp_size: int = 2, startup_timeout_s: float = 480
                        ) -> dict:
    """``dp_size`` ``vllm serve`` processes (one per DP rank, all on GPU 0); every
    request goes to rank 0's HTTP port, one at a time, so ranks 1.. get none.

    Returns ``{"counts_after_start": [rank0, rank1, ...], "counts_after_request":
    [[rank0, rank1, ...] per request], "outputs": [per request, :func:`run`'s
    format plus "text"], "exit_codes": [...]}``; every counts entry is one
    rank's :func:`ep_round_counts`, read once it stopped moving. Each request
    starts its own DP wave (the previous one has ended), so ranks 1.. are woken
    once per request. Output goes to ``serve-rank<r>.log`` in ``out_dir``; on
    failure the AssertionError carries every rank's log tail. The start-up limit
    stays under the device tool's 10 minutes per command, so a hung start-up
    still reports its logs.
    """
    rpc_port, *http_ports = _distinct_free_ports(dp_size + 1)
    served_env = serve_dp_on_one_gpu_env(env)
    procs, logs = [], []
    try:
        for rank in range(dp_size):
            log = open(out_dir / f"serve-rank{rank}.log", "w")  # noqa: SIM115 - closed below
            logs.append(log)
            procs.append(subprocess.Popen(
                serve_dp_command(model, rank, dp_size, http_ports[rank], rpc_port, flags),
                env=served_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        try:
            _wait_healthy(procs, http_ports, startup_timeout_s)
            result: dict = {"http_ports": http_ports,
                            "counts_after_start": _settled_counts(http_ports),
                            "counts_after_request": [], "outputs": []}
            for request in requests:
                result["outputs"].append(_served_completion(http_ports[0], model, request))
                result["counts_after_request"].append(_settled_counts(http_ports))
        except Exception as exc:  # every failure gets the ranks' logs
            for log in logs:
                log.flush()
            tails = "".join(f"\n--- DP rank {r} (serve-rank{r}.log) ---\n"
                            + _tail(out_dir / f"serve-rank{r}.log") for r in range(dp_size))
            raise AssertionError(f"{type(exc).__name__}: {exc}{tails}") from exc
    finally:
        exit_codes = _stop_all(procs)
        for log in logs:
            log.close()
    result["exit_codes"] = exit_codes
    return result


if __name__ == "__main__":
    main()
