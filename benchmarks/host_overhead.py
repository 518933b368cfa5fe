"""Host (Python + launch) cost of one eager dispatch + combine, and where it goes.

Eager round trips at small batches are bound by the host, not the GPU: this
times the enqueue of ``--iters`` round trips of one rank (launches are
asynchronous, so this is host time alone), then profiles them with cProfile and
prints the functions that cost the most.

Beside the round trip it times, the same way, what bounds it from below:

* ``dispatch_us`` / ``combine_us``: each call of the round trip on its own;
* ``host_us_out_given``: the round trip with ``combine(out=...)`` into a tensor
  the caller made (vLLM's finalize does that) instead of ours;
* ``raw_ops_us_per_round_trip``: the two ``torch.ops`` calls alone with their
  arguments built once (op dispatch, argument checks in C++, two launches):
  what is left with no Python of ours at all: the ops OneSidedAllToAll calls
  (``raw_ops``: ``planned`` where launch plans exist, else ``general``), and both
  kinds timed in this process (``raw_general_us``, ``raw_planned_us``);
* ``python_only_us``: the round trip with the op calls replaced by a no-op:
  our Python alone (run last: it leaves the all-to-all unusable);
* ``torch_op_floor_us``: one trivial torch CUDA op (``zero_`` of 16 bytes):
  the dispatcher + launch floor any op pays.

    python3 benchmarks/host_overhead.py --shape deepseek_v3 --tokens 1 --dtype fp8
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
    p.add_argument("--dtype", default="fp8", choices=("bf16", "fp8"),
                   help="dispatch dtype; fp8 sends 1x128 float32 scales beside it")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--top", type=int, default=15, help="profile rows to print")
    p.add_argument("--json", default=None, help="also write the timings here")
    args = p.parse_args(argv)

    shape = SHAPES[args.shape]
    device = torch.device("cuda", 0)
    fp8 = args.dtype == "fp8"
    spec = AllToAllSpec(ep_size=1, max_tokens_per_rank=args.tokens, hidden_size=shape.hidden,
                        top_k=shape.top_k, num_experts=shape.num_experts,
                        dispatch_dtype=torch.float8_e4m3fn if fp8 else torch.bfloat16,
                        scale_cols=shape.hidden // 128 if fp8 else 0)
    a2a = OneSidedAllToAll(Workspace.allocate_local(spec, device), 0,
                           config=A2AConfig(check_expert_ids=False, timeout_s=30.0))
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn((args.tokens, shape.hidden), generator=gen, device=device).to(spec.dispatch_dtype)
    scales = (torch.rand((args.tokens, spec.scale_cols), generator=gen, device=device)
              if fp8 else None)
    ids = routing(gen, args.tokens, shape, "uniform")
    weights = torch.rand((args.tokens, shape.top_k), generator=gen, device=device)

    def round_trip():
        a2a.dispatch(x, ids, weights, x_scales=scales, runtime_max_tokens=args.tokens)
        a2a.combine()

    for _ in range(20):
        round_trip()
    torch.cuda.synchronize()

    def median_of_5(run) -> float:
        """Median over 5 batches of ``args.iters`` enqueues, us per iteration."""
        per_batch = []
        for _ in range(5):
            start = time.perf_counter()
            run(args.iters)
            per_batch.append((time.perf_counter() - start) / args.iters * 1e6)
            torch.cuda.synchronize()
        return sorted(per_batch)[2]

    def round_trips(n: int) -> None:
        for _ in range(n):
            round_trip()

    enqueue_us = median_of_5(round_trips)
    given_out = torch.empty((args.tokens, shape.hidden), dtype=spec.combine_dtype, device=device)

    def round_trips_out_given(n: int) -> None:
        for _ in range(n):
            a2a.dispatch(x, ids, weights, x_scales=scales, runtime_max_tokens=args.tokens)
            a2a.combine(out=given_out)

    out_given_us = median_of_5(round_trips_out_given)
    split = {"dispatch": [], "combine": []}
    for _ in range(5):
        spent = {"dispatch": 0.0, "combine": 0.0}
        for _ in range(args.iters):
            t0 = time.perf_counter()
            a2a.dispatch(x, ids, weights, x_scales=scales, runtime_max_tokens=args.tokens)
            t1 = time.perf_counter()
            a2a.combine()
            spent["dispatch"] += t1 - t0
            spent["combine"] += time.perf_counter() - t1
        torch.cuda.synchronize()
        for op in split:
            split[op].append(spent[op] / args.iters * 1e6)
    dispatch_us, combine_us = (sorted(split[op])[2] for op in ("dispatch", "combine"))

    # The two ops with every argument built once: the general ops (every version
    # has them) and, where this tree has launch plans, the planned ops that
    # OneSidedAllToAll calls; both in this process, so the host's speed of the
    # moment is the same for both (it varies by 1.5x between processes on a VM).
    out = torch.empty((args.tokens, shape.hidden), dtype=spec.combine_dtype, device=device)
    tail = (a2a._max_blocks(), a2a.config.threads_per_block, a2a.config.timeout_ns)
    payloads = [x] + ([scales] if fp8 else [])
    payload_rows = list(spec.payload_row_bytes)
    dispatch_op = torch.ops.a2a_one_sided.dispatch.default
    combine_op = torch.ops.a2a_one_sided.combine.default
    peer_ptrs = a2a.workspace.peer_ptrs

    def general_round_trips(n: int) -> None:
        for _ in range(n):
            dispatch_op(a2a._buffer, peer_ptrs, 0, payloads, ids, weights, a2a._expert_owner,
                        a2a._pad_ids, a2a._error_record_ptr, args.tokens, args.tokens,
                        spec.combine_row_bytes, 3, *tail)
            combine_op(a2a._buffer, peer_ptrs, 0, ids, a2a._expert_owner, out,
                       a2a._error_record_ptr, args.tokens, args.tokens, payload_rows, 3, *tail)

    general_us = median_of_5(general_round_trips)
    planned_us = None
    if hasattr(a2a, "_launch_plan"):
        plan = a2a._launch_plan()
        dispatch_planned = torch.ops.a2a_one_sided.dispatch_planned.default
        combine_planned = torch.ops.a2a_one_sided.combine_planned.default

        def planned_round_trips(n: int) -> None:
            for _ in range(n):
                dispatch_planned(plan, a2a._buffer, x, scales, ids, weights, args.tokens, 3)
                combine_planned(plan, a2a._buffer, ids, out, args.tokens, 3)

        planned_us = median_of_5(planned_round_trips)
    raw_ops, raw_us = ("planned", planned_us) if planned_us is not None else ("general", general_us)
    tiny = torch.empty(16, dtype=torch.uint8, device=device)

    def tiny_ops(n: int) -> None:
        for _ in range(n):
            tiny.zero_()

    floor_us = median_of_5(tiny_ops)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.iters):
        round_trip()
    profiler.disable()
    torch.cuda.synchronize()
    a2a.check_errors()

    # Our Python alone: the same round trips with the op calls replaced by a
    # no-op (state checks, input checks, views, output slice; no launch).
    def no_launch(*_args) -> None:
        return None

    for name in ("_dispatch_op", "_combine_op", "_dispatch_planned", "_combine_planned"):
        if hasattr(a2a, name):
            setattr(a2a, name, no_launch)
    python_us = median_of_5(round_trips)

    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(args.top)
    print(text.getvalue())
    print(f"host time per eager round trip (dispatch + combine), {args.shape} {args.dtype}, "
          f"{args.tokens} tokens: {enqueue_us:.1f} us (dispatch {dispatch_us:.1f}, combine "
          f"{combine_us:.1f}; {out_given_us:.1f} with combine(out=...)); the two ops alone "
          f"({raw_ops}) {raw_us:.1f} us; our Python alone "
          f"{python_us:.1f} us; one trivial torch op {floor_us:.1f} us")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "shape": args.shape, "dtype": args.dtype, "tokens": args.tokens,
            "host_us_per_round_trip": round(enqueue_us, 2), "dispatch_us": round(dispatch_us, 2),
            "combine_us": round(combine_us, 2), "host_us_out_given": round(out_given_us, 2),
            "raw_ops_us_per_round_trip": round(raw_us, 2),
            "raw_ops": raw_ops, "raw_general_us": round(general_us, 2),
            "raw_planned_us": None if planned_us is None else round(planned_us, 2),
            "python_only_us": round(python_us, 2), "torch_op_floor_us": round(floor_us, 2)}))


if __name__ == "__main__":
    main()
