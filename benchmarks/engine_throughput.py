"""Engine throughput: output tokens/s of ``vllm serve`` with DP + expert parallelism,
one server start per all2all backend, the same requests for each.

The model has Qwen3-30B-A3B's architecture (48 layers, hidden 2048, 128 experts,
top-8) with vLLM's ``load_format="dummy"`` random weights and our local word-level
tokenizer, so nothing is downloaded (``--layers`` shortens it for a dry run).
Requests: ``--requests`` prompts of ``--input-words`` random words, each asking for
exactly ``--output-tokens`` tokens (``ignore_eos``), ``--concurrency`` in flight.

    python3 benchmarks/engine_throughput.py --dp 2 \\
        --backends a2a_one_sided,allgather_reducescatter,flashinfer_nvlink_one_sided

Writes JSON (command, gpu, dp, model, per backend: output tokens/s, requests/s,
wall time, or the error that stopped it) to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shlex
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vllm_a2a_plugin.testing.serve import (complete, free_port, server_log_tail,  # noqa: E402
                                           start_server, stop_server, wait_healthy)
from vllm_a2a_plugin.testing.tiny_moe import (QWEN3_30B_A3B, WORDS,  # noqa: E402
                                              write_config_and_tokenizer)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dp", type=int, default=2, help="data-parallel size (one GPU each)")
    p.add_argument("--backends", default="a2a_one_sided,allgather_reducescatter")
    p.add_argument("--layers", type=int, default=QWEN3_30B_A3B.num_layers)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--input-words", type=int, default=256)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--out", default=None, help="JSON path (default: print only)")
    return p.parse_args(argv)


def make_prompts(n: int, words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


def run_backend(args, model: str, backend: str, prompts: list[str]) -> dict:
    port = free_port()
    extra = ["--data-parallel-size", str(args.dp), "--all2all-backend", backend,
             "--load-format", "dummy"] + (["--enforce-eager"] if args.enforce_eager else [])
    proc = start_server(model, port, *extra, max_model_len=args.max_model_len,
                        gpu_memory_utilization=args.gpu_memory_utilization)
    try:
        wait_healthy(proc, port, timeout_s=900)
        complete(port, model, prompts[0], max_tokens=4)  # warm-up, not timed

        def one(prompt: str) -> int:
            reply = complete(port, model, prompt, max_tokens=args.output_tokens,
                             ignore_eos=True, timeout_s=600)
            return int(reply["usage"]["completion_tokens"])

        start = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            tokens = sum(pool.map(one, prompts))
        wall = time.perf_counter() - start
        return {"backend": backend, "output_tokens": tokens, "wall_s": round(wall, 2),
                "output_tokens_per_s": round(tokens / wall, 1),
                "requests_per_s": round(len(prompts) / wall, 2)}
    except Exception as exc:  # noqa: BLE001 - one backend failing must not hide the others
        return {"backend": backend, "error": f"{type(exc).__name__}: {str(exc)[-2000:]}",
                "server_log_tail": server_log_tail(proc)}
    finally:
        stop_server(proc)


def main(argv=None) -> None:
    args = parse_args(argv)
    spec = dataclasses.replace(QWEN3_30B_A3B, num_layers=args.layers)
    prompts = make_prompts(args.requests, args.input_words)
    with tempfile.TemporaryDirectory(prefix="qwen3-moe-dummy-") as model:
        write_config_and_tokenizer(model, spec)
        results = [run_backend(args, model, b, prompts) for b in args.backends.split(",")]
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    except ImportError:
        gpu = "unknown"
    doc = {"command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
           "gpu": gpu, "dp": args.dp, "model": dataclasses.asdict(spec),
           "requests": args.requests, "concurrency": args.concurrency,
           "input_words": args.input_words, "output_tokens": args.output_tokens,
           "results": results}
    print(json.dumps(results, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
