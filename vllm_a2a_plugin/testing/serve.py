"""Start, query and stop a real ``vllm serve`` on 127.0.0.1 (engine tests, engine
benchmarks). Everything is bounded in time; nothing leaves this machine."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_env() -> dict[str, str]:
    """The environment an engine run gets: no flashinfer sampler JIT build (minutes
    on first use, design §9) and NVLink multicast off (the GPU machines' rule)."""
    return {**os.environ, "VLLM_USE_FLASHINFER_SAMPLER": "0", "NCCL_NVLS_ENABLE": "0",
            "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def start_server(model: str, port: int, *extra: str, max_model_len: int = 256,
                 gpu_memory_utilization: float = 0.3) -> subprocess.Popen:
    """``vllm serve model`` with expert parallelism and Triton attention.

    Run as ``python -m`` of the ``vllm`` console script's module: the same CLI,
    and it also works where vLLM is on PYTHONPATH without its scripts (the
    offline bundle of scripts/vllm_bundle.py)."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model,
           "--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(max_model_len),
           "--gpu-memory-utilization", str(gpu_memory_utilization), "--enable-expert-parallel",
           "--attention-backend", "TRITON_ATTN", *extra]
    return start_logged(cmd, env=engine_env())


def start_logged(cmd: list[str], *, env: dict[str, str] | None = None,
                 cwd: str | None = None) -> subprocess.Popen:
    """Start ``cmd`` in its own process group, its output in a temporary log file
    (``proc.log_path``; :func:`stop_server` deletes it).

    A file, not a pipe: nobody reads a pipe while the server runs, and a long run
    (one access-log line per request) would fill it and stall the server."""
    log = tempfile.NamedTemporaryFile(prefix="vllm-serve-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    log.close()
    proc.log_path = log.name
    return proc


def server_log_tail(proc: subprocess.Popen, chars: int = 4000) -> str:
    with open(proc.log_path, errors="replace") as f:
        return f.read()[-chars:]


def wait_healthy(proc: subprocess.Popen, port: int, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early:\n{server_log_tail(proc)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"server not healthy within {timeout_s} s:\n{server_log_tail(proc)}")


def complete(port: int, model: str, prompt: str, *, max_tokens: int = 8,
             ignore_eos: bool = False, timeout_s: float = 120) -> dict:
    """One greedy ``/v1/completions`` request; returns the response's first choice
    plus its ``usage``."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens,
                       "temperature": 0, "ignore_eos": ignore_eos}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        if r.status != 200:
            raise AssertionError(f"HTTP {r.status} from the server")
        reply = json.loads(r.read())
    return {**reply["choices"][0], "usage": reply.get("usage", {})}


def stop_server(proc: subprocess.Popen) -> None:
    """Stop the server's whole process group and delete its log."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    if os.path.exists(proc.log_path):
        os.unlink(proc.log_path)
