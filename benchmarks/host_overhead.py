"""Host (Python + launch) cost of one eager dispatch + combine, and where it goes.

Eager round trips at small batches are bound by the host, not the GPU: this
times the enqueue of ``--iters`` round trips of one rank (launches are
asynchronous, so this is host time alone), then profiles them with cProfile and
prints the functions that cost the most.

    python3 benchmarks/host_overhead.py --shape deepseek_v3 --tokens 1
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.shapes import SHAPES, routing  # noqa: E402
from vllm_a2a_plugin import A2AConfig, AllToAllSpec, OneSidedAllToAll, Workspace  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="deepseek_v3", choices=list(SHAPES))
    p.add_argument("--tokens", type=int, default=1)
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--top", type=int, default=15, help="profile rows to print")
    p.add_argument("--json", default=None, help="also write the timings here")
    args = p.parse_args(argv)

    shape = SHAPES[args.shape]
    device = torch.device("cuda", 0)
    spec = AllToAllSpec(ep_size=1, max_tokens_per_rank=args.tokens, hidden_size=shape.hidden,
                        top_k=shape.top_k, num_experts=shape.num_experts)
    a2a = OneSidedAllToAll(Workspace.allocate_local(spec, device), 0,
                           config=A2AConfig(check_expert_ids=False, timeout_s=30.0))
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn((args.tokens, shape.hidden), generator=gen, device=device).bfloat16()
    ids = routing(gen, args.tokens, shape, "uniform")
    weights = torch.rand((args.tokens, shape.top_k), generator=gen, device=device)

    def round_trip():
        a2a.dispatch(x, ids, weights, runtime_max_tokens=args.tokens)
        a2a.combine()

    for _ in range(20):
        round_trip()
    torch.cuda.synchronize()

    def timed_enqueue() -> float:
        start = time.perf_counter()
        for _ in range(args.iters):
            round_trip()
        elapsed = time.perf_counter() - start
        torch.cuda.synchronize()
        return elapsed / args.iters * 1e6

    enqueue_us = sorted(timed_enqueue() for _ in range(5))[2]
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.iters):
        round_trip()
    profiler.disable()
    torch.cuda.synchronize()
    a2a.check_errors()

    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(args.top)
    print(text.getvalue())
    print(f"host time per eager round trip (dispatch + combine), {args.shape}, "
          f"{args.tokens} tokens: {enqueue_us:.1f} us")
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": args.shape, "tokens": args.tokens,
                                               "host_us_per_round_trip": round(enqueue_us, 2)}))


if __name__ == "__main__":
    main()
