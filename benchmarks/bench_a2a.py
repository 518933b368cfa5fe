"""Dispatch / combine / round-trip timings: ours beside the baselines and the limit.

One GPU (default): our kernels with ``--ep-size`` logical ranks on the GPU (and at
one rank), every baseline at one rank (NCCL group of size 1), and the device
copy bandwidth as the limit. N GPUs: ``torchrun --nproc-per-node N
benchmarks/bench_a2a.py ...`` or ``mpirun -np N python benchmarks/bench_a2a.py
...`` (the store address agreed over MPI, :mod:`vllm_a2a_plugin.testing.launcher`):
one process per GPU, our workspace in torch symmetric memory, baselines over
NCCL, limit = measured peer copy bandwidth.

Writes ``benchmarks/results/<machine>/<name>.json`` (command, commit, gpu,
world_size, torch, rows) and plots with ``benchmarks/plot_results.py``.

Timing methods (each row's ``mode`` says which one it used):

* ``eager``: CUDA events around each call on the current stream; includes the
  host's enqueue time whenever the GPU waits for it (small batches do).
* ``graph``: one dispatch + combine captured in a CUDA graph, CUDA events around
  each replay (``median_us``: as the GPU saw it, host launch gaps included
  when the host is slower than the GPU); ``queued_median_us``: the same events
  while a spin kernel holds the stream until every replay is enqueued (nvbench's
  "blocking kernel"), so replays run back to back and the events time the
  device's work alone.
* ``kernel`` (ours only): GPU kernel time from the torch profiler (CUPTI), as
  DeepEP's ``bench_kineto`` measures: graph replays with a 256 MB L2 flush
  before each, our kernels' durations summed per op and iteration, divided by
  the number of ranks (one kernel per rank and op when fused). Kernel rows also
  carry DeepEP's bandwidth (valid (token, expert) selections x row bytes / time,
  per rank) and TensorRT-LLM's (tokens x min(EP, top-k) x row bytes / time).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

# One hardware queue per logical rank's stream; must precede CUDA initialisation.
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.baselines import (AllGatherReduceScatter, FlashInferOneSided,  # noqa: E402
                                  NcclTwoSided)
from benchmarks.shapes import DEFAULT_TOKENS, SHAPES, crossing_bytes, routing  # noqa: E402
from vllm_a2a_plugin import A2AConfig, AllToAllSpec, LocalRanks, OneSidedAllToAll, Workspace  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}


def dtype_label(dtype: torch.dtype) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", default=",".join(map(str, DEFAULT_TOKENS)),
                   help="tokens per rank, comma separated")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"any of {list(SHAPES)}")
    p.add_argument("--dtypes", default="bf16,fp8", help="dispatch dtypes: bf16, fp8 (1x128 scales)")
    p.add_argument("--routing", default="uniform,skewed",
                   help="comma list of uniform, skewed, local (ids of the rank's own experts only)")
    p.add_argument("--ep-size", type=int, default=8,
                   help="logical ranks on one GPU (single-process mode)")
    p.add_argument("--impls", default="a2a_one_sided,nccl_a2a,agrs,flashinfer_one_sided",
                   help="implementations to time (flashinfer_one_sided is skipped, with a "
                        "message, when flashinfer cannot be imported)")
    p.add_argument("--modes", default="eager,graph,kernel",
                   help="eager, graph (CUDA-graph replay), kernel (profiler kernel time; ours)")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads-per-block", type=int, default=256)
    p.add_argument("--max-blocks", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<gpu>/...)")
    p.add_argument("--name", default="a2a", help="result file stem")
    p.add_argument("--signal-floor", action="store_true",
                   help="graph rows also time our kernels with no token on any rank")
    p.add_argument("--trace-dir", default=None,
                   help="write the profiler trace (Chrome JSON, gzip) of every `kernel` point of "
                        "ours here: <shape>_<dtype>_<routing>_t<tokens>_ep<ranks>.json.gz")
    return p.parse_args(argv)


# The spin kernel that holds the stream (queued timing) counts SM cycles; 2 GHz
# is above any clock of the GPUs we run on, so it holds at least as long as asked.
_SPIN_CYCLES_PER_S = 2.0e9
_MAX_HOLD_S = 0.2


def timed(fn, *, iters: int, warmup: int, queue_ahead: bool = False) -> list[float]:
    """Per-iteration device time in microseconds (CUDA events around each call).

    ``queue_ahead``: first enqueue a spin kernel long enough for the host to
    enqueue every iteration behind it, so the iterations then run back to back
    and the events measure the device alone (no host launch gaps).
    """
    host_start = time.perf_counter()
    for _ in range(warmup):
        fn()
    host_s = (time.perf_counter() - host_start) / max(warmup, 1)
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    if queue_ahead:
        hold_s = min(_MAX_HOLD_S, 4 * iters * host_s + 1e-3)
        torch.cuda._sleep(int(hold_s * _SPIN_CYCLES_PER_S))
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]


def stats(samples: list[float]) -> tuple[float, float]:
    t = torch.tensor(samples)
    return float(t.median()), float(torch.quantile(t, 0.99))


def warm_up_gpu(device: torch.device, seconds: float = 2.0) -> None:
    """Busy the GPU for a while first: an idle card starts at low clocks (345 MHz
    read on an H100 here), which made the first point of a run slower."""
    a = torch.randn((4096, 4096), device=device, dtype=torch.bfloat16)
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=seconds)
    while datetime.datetime.now() < deadline:
        for _ in range(20):
            a = (a @ a).clamp_(-1, 1)
        torch.cuda.synchronize(device)


def copy_limit_gbps(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (bytes copied per second, GB/s)."""
    a = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    us = stats(timed(lambda: b.copy_(a), iters=20, warmup=3))[0]
    return nbytes / (us * 1e-6) / 1e9


def peer_limit_gbps(group, device: torch.device, nbytes: int = 256 << 20) -> float:
    """Copy bandwidth into a peer's symmetric buffer (NVLink), GB/s."""
    import torch.distributed._symmetric_memory as symm_mem

    buf = symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
    handle = symm_mem.rendezvous(buf, group)
    peer = (dist.get_rank(group) + 1) % dist.get_world_size(group)
    dst = handle.get_buffer(peer, (nbytes,), torch.uint8)
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dist.barrier(group)
    us = stats(timed(lambda: dst.copy_(src), iters=20, warmup=3))[0]
    dist.barrier(group)
    return nbytes / (us * 1e-6) / 1e9


def eager_rows(dispatch, combine, *, iters: int, warmup: int, disp_bytes: int, comb_bytes: int,
               sync_each: bool = False, before_each=None) -> list[tuple]:
    """Times dispatch, combine and their sum with events around each call.

    ``sync_each`` waits for the device after every iteration (baselines sync on
    the host anyway; the distributed path barriers first via ``before_each``).
    """
    for _ in range(warmup):
        if before_each:
            before_each()
        dispatch()
        combine()
    torch.cuda.synchronize()
    events = []
    for _ in range(iters):
        e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        if before_each:
            before_each()
        e0.record()
        dispatch()
        e1.record()
        combine()
        e2.record()
        if sync_each:
            torch.cuda.synchronize()
        events.append((e0, e1, e2))
    torch.cuda.synchronize()
    d_us = [a.elapsed_time(b) * 1e3 for a, b, _ in events]
    c_us = [b.elapsed_time(c) * 1e3 for _, b, c in events]
    r_us = [a.elapsed_time(c) * 1e3 for a, _, c in events]
    return [("dispatch", "eager", d_us, disp_bytes), ("combine", "eager", c_us, comb_bytes),
            ("round_trip", "eager", r_us, disp_bytes + comb_bytes)]


def capture_round_trip(dispatch, combine, device) -> torch.cuda.CUDAGraph:
    """One dispatch + combine captured in a CUDA graph (after one eager round)."""
    dispatch()
    combine()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        dispatch()
        combine()
    torch.cuda.current_stream(device).wait_stream(stream)
    return graph


def graph_round_trip(dispatch, combine, device, args, nbytes: int, *, before=None,
                     graph=None) -> tuple:
    """Round trips replayed from a CUDA graph: events as the GPU sees them, and
    queued (host held back, see ``timed``) in ``queued_median_us`` / ``queued_p99_us``.

    ``before`` runs before each timing (the distributed path barriers there)."""
    graph = graph or capture_round_trip(dispatch, combine, device)
    if before:
        before()
    r_us = timed(graph.replay, iters=args.iters, warmup=args.warmup)
    if before:
        before()
    q_us = timed(graph.replay, iters=args.iters, warmup=args.warmup, queue_ahead=True)
    q_med, q_p99 = stats(q_us)
    return ("round_trip", "graph", r_us, nbytes,
            {"queued_median_us": round(q_med, 2), "queued_p99_us": round(q_p99, 2)})


def empty_structure_graph(ep_size: int, device) -> torch.cuda.CUDAGraph:
    """The launch structure of our round trip with empty kernels: dispatch, then
    combine, one kernel per rank each. With ``ep_size`` > 1 each op is one wave as
    LocalRanks' concurrent mode launches it: every rank's kernel on the rank's own
    stream, forked from the capture stream and joined back to it, so the round
    trip has two fork/join waves (the experts run between them). Its replay time
    is the floor no kernel work can go below: launch and graph overhead alone.
    The kernel is torch's ``spin_kernel`` with 0 cycles.

    (Until 2026-11-25 the graph had one wave with both kernels on each rank's
    stream: one fork/join fewer than the round trip it stood beside.)"""
    graph = torch.cuda.CUDAGraph()
    capture = torch.cuda.Stream(device)
    streams = [torch.cuda.Stream(device) for _ in range(ep_size)] if ep_size > 1 else []
    capture.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(capture), torch.cuda.graph(graph, stream=capture):
        for _op in ("dispatch", "combine"):
            if not streams:
                torch.cuda._sleep(0)
                continue
            for stream in streams:
                stream.wait_stream(capture)
                with torch.cuda.stream(stream):
                    torch.cuda._sleep(0)
            for stream in streams:
                capture.wait_stream(stream)
    torch.cuda.current_stream(device).wait_stream(capture)
    torch.cuda.synchronize(device)
    return graph


# Our kernels' names (csrc/dispatch.cu, csrc/combine.cu), as the profiler reports them.
KERNEL_NAMES = {"dispatch": "dispatch_kernel", "combine": "combine_kernel"}
_L2_FLUSH_BYTES = 256 << 20  # DeepEP's bench_kineto flush; above any GPU's L2


def _device_kernel_events(prof) -> list[tuple[str, float, float]]:
    """``(name, start_us, duration_us)`` of every GPU kernel the profiler saw."""
    from torch.autograd import DeviceType

    found = []
    for evt in prof.events():
        if getattr(evt, "device_type", None) == DeviceType.CUDA:
            found.append((evt.name, float(evt.time_range.start), float(evt.time_range.elapsed_us())))
    return found


def kernel_rows(replay, *, iters: int, ranks: int, device, op_bytes: dict[str, dict],
                empty_replay=None, trace_path: Path | None = None) -> list:
    """Kernel time per op from the torch profiler over ``iters`` replays.

    Per iteration: the summed duration of that op's kernels divided by ``ranks``
    (every rank launches its own), so a row reads "GPU time of one rank's op".
    ``op_bytes[op]``: ``bytes`` (crossing), ``deepep_bytes`` and ``trtllm_bytes``
    per rank, turned into the bandwidth columns. ``empty_replay`` (an
    empty-kernel graph, see ``empty_structure_graph``) is replayed in the same
    profiler session; its kernels' median goes to ``empty_kernel_us``. With
    several ranks, ``start_skew_us`` is the median over iterations of (last - first
    start) of that op's kernels: how long the first rank's kernel waits, at
    least, for the last one to start. ``trace_path``: the profile as a Chrome
    trace (gzip)."""
    from torch.profiler import ProfilerActivity, profile

    flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
    replay()
    if empty_replay is not None:
        empty_replay()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            flush.zero_()
            replay()
        if empty_replay is not None:
            for _ in range(iters):
                empty_replay()
        torch.cuda.synchronize(device)
    if trace_path is not None:
        trace_path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace_path))
    events = _device_kernel_events(prof)
    empty = [d for n, _, d in events if "spin_kernel" in n]
    empty_us = round(stats(empty)[0], 2) if empty else None
    rows = []
    for op, iterations in kernels_per_iteration(events, iters=iters).items():
        b = op_bytes[op]
        samples = _us_per_rank(iterations, ranks)
        med = stats(samples)[0]
        skews = _start_skews(iterations)
        extra = {"kernels_per_iteration": len(iterations[0]), "empty_kernel_us": empty_us,
                 "start_skew_us": round(stats(skews)[0], 2) if skews else None,
                 "deepep_gbps": round(b["deepep_bytes"] / (med * 1e-6) / 1e9, 2) if med else 0.0,
                 "trtllm_gbps": round(b["trtllm_bytes"] / (med * 1e-6) / 1e9, 2) if med else 0.0}
        rows.append((op, "kernel", samples, b["bytes"] // ranks, extra))
    return rows


def kernels_per_iteration(events: list[tuple[str, float, float]], *, iters: int
                          ) -> dict[str, list[list[tuple[float, float]]]]:
    """``{op: [[(start_us, duration_us) of that op's kernels] per iteration]}`` from
    the profiler's ``(name, start_us, duration_us)`` kernels of ``iters`` replays.

    Kernels are taken in start order, ``len / iters`` per iteration (replays do
    not overlap: each waits for the L2 flush before it); an op whose count does
    not divide by ``iters`` is left out with a message."""
    grouped = {}
    ordered = sorted(events, key=lambda e: e[1])
    for op, name in KERNEL_NAMES.items():
        kernels = [(t, d) for n, t, d in ordered if name in n]
        if not kernels or len(kernels) % iters:
            print(f"kernel time for {op}: found {len(kernels)} '{name}' kernels over {iters} "
                  f"iterations; no kernel row")
            continue
        per_iter = len(kernels) // iters
        grouped[op] = [kernels[i * per_iter:(i + 1) * per_iter] for i in range(iters)]
    return grouped


def _us_per_rank(iterations: list[list[tuple[float, float]]], ranks: int) -> list[float]:
    return [sum(d for _, d in kernels) / ranks for kernels in iterations]


def _start_skews(iterations: list[list[tuple[float, float]]]) -> list[float]:
    """Last minus first kernel start per iteration; none with one kernel per iteration."""
    if len(iterations[0]) < 2:
        return []
    return [kernels[-1][0] - kernels[0][0] for kernels in iterations]


def per_iteration_kernel_times(events: list[tuple[str, float, float]], *, iters: int,
                               ranks: int) -> dict[str, tuple[int, list[float]]]:
    """``{op: (kernels per iteration, [us per rank, one per iteration])}``: the
    summed durations of each iteration's kernels (:func:`kernels_per_iteration`)."""
    return {op: (len(its[0]), _us_per_rank(its, ranks))
            for op, its in kernels_per_iteration(events, iters=iters).items()}


def start_skews(events: list[tuple[str, float, float]], *, iters: int) -> dict[str, list[float]]:
    """``{op: [last - first kernel start of that op, us, one per iteration]}``; ops
    with one kernel per iteration or a count that does not divide are left out."""
    grouped = kernels_per_iteration(events, iters=iters)
    skews = {op: _start_skews(its) for op, its in grouped.items()}
    return {op: values for op, values in skews.items() if values}


def convention_bytes(topk_ids: list[torch.Tensor], *, num_experts: int, ep_size: int, top_k: int,
                     dispatch_row: int, combine_row: int) -> dict[str, dict[str, float]]:
    """Per-rank bytes of the published conventions (mean over ranks).

    DeepEP (tests/test_low_latency.py): every valid (token, expert) selection
    moves one row, wherever the expert lives. TensorRT-LLM: every token moves
    min(EP, top-k) rows."""
    selections = sum(int(((ids >= 0) & (ids < num_experts)).sum()) for ids in topk_ids)
    tokens = sum(int(ids.shape[0]) for ids in topk_ids)
    ranks = len(topk_ids)
    fanout = min(ep_size, top_k)
    return {op: {"deepep_bytes": selections * row / ranks, "trtllm_bytes": tokens * fanout * row / ranks}
            for op, row in (("dispatch", dispatch_row), ("combine", combine_row))}


def make_inputs(gen, shape, tokens, dtype, kind, ranks, device):
    """Random per-rank inputs, generated on the GPU (``gen`` is a CUDA generator)."""
    xs, scales, ids, weights = [], [], [], []
    for rank in range(ranks):
        x = torch.randn((tokens, shape.hidden), generator=gen, device=device)
        xs.append(x.to(dtype))
        scales.append(torch.rand((tokens, shape.hidden // 128), generator=gen, device=device)
                      if dtype == torch.float8_e4m3fn else None)
        ids.append(routing(gen, tokens, shape, kind, rank=rank, ep_size=ranks))
        weights.append(torch.rand((tokens, shape.top_k), generator=gen, device=device))
    return xs, scales, ids, weights


def ours_single_process(args, shape, dtype, tokens, kind, ep_size, gen, device):
    """Ours in one process: at one rank exactly what one vLLM EP rank runs (one
    ``OneSidedAllToAll``); at ``ep_size`` > 1, logical ranks on this GPU, each on its
    own stream (their host work is serialised here, so eager times grow with the
    rank count; graph replay shows the device time)."""
    spec = AllToAllSpec(ep_size=ep_size, max_tokens_per_rank=tokens, hidden_size=shape.hidden,
                        top_k=shape.top_k, num_experts=shape.num_experts, dispatch_dtype=dtype,
                        scale_cols=shape.hidden // 128 if dtype == torch.float8_e4m3fn else 0)
    config = A2AConfig(threads_per_block=args.threads_per_block, max_blocks=args.max_blocks,
                       check_expert_ids=False, timeout_s=30.0)
    xs, scales, ids, weights = make_inputs(gen, shape, tokens, dtype, kind, ep_size, device)
    if ep_size == 1:
        workspace = Workspace.allocate_local(spec, device)
        ranks = OneSidedAllToAll(workspace, 0, config=config)

        def dispatch():
            ranks.dispatch(xs[0], ids[0], weights[0], x_scales=scales[0],
                           runtime_max_tokens=tokens)

        def dispatch_no_tokens():
            ranks.dispatch(xs[0][:0], ids[0][:0], weights[0][:0],
                           x_scales=None if scales[0] is None else scales[0][:0],
                           runtime_max_tokens=0)
    else:
        ranks = LocalRanks(spec, mode="concurrent", config=config, device=device)
        workspace = ranks.workspace
        sc = scales if scales[0] is not None else None

        def dispatch():
            ranks.dispatch(xs, ids, weights, x_scales=sc, runtime_max_tokens=tokens)

        def dispatch_no_tokens():
            ranks.dispatch([x[:0] for x in xs], [i[:0] for i in ids], [w[:0] for w in weights],
                           x_scales=None if sc is None else [c[:0] for c in sc],
                           runtime_max_tokens=0)

    for buf in workspace.buffers.values():  # never time on zeros
        buf[workspace.layout.recv_topk_ids:].random_(0, 255)

    def combine():
        ranks.combine()

    rows = []
    payload_row = sum(spec.payload_row_bytes)
    disp_bytes = crossing_bytes(ids, shape.num_experts, ep_size, payload_row)
    comb_bytes = crossing_bytes(ids, shape.num_experts, ep_size, spec.combine_row_bytes)
    if "eager" in args.modes:
        rows += eager_rows(dispatch, combine, iters=args.iters, warmup=args.warmup,
                           disp_bytes=disp_bytes, comb_bytes=comb_bytes)
        ranks.synchronize()
    graph = None
    empty = empty_structure_graph(ep_size, device) if {"graph", "kernel"} & set(
        args.modes.split(",")) else None
    if "graph" in args.modes:
        graph = capture_round_trip(dispatch, combine, device)
        row = graph_round_trip(dispatch, combine, device, args, disp_bytes + comb_bytes,
                               graph=graph)
        floor = stats(timed(empty.replay, iters=args.iters, warmup=args.warmup,
                            queue_ahead=True))[0]
        row[4]["floor_queued_us"] = round(floor, 2)  # same launch structure, empty kernels
        # Our own kernels with no token on any rank: launches plus the cross-rank
        # flag waits of both phases, no data; what a round trip cannot go below.
        if args.signal_floor:
            signal = capture_round_trip(dispatch_no_tokens, combine, device)
            row[4]["signal_floor_queued_us"] = round(stats(timed(
                signal.replay, iters=args.iters, warmup=args.warmup, queue_ahead=True))[0], 2)
            del signal
        rows.append(row)
        ranks.synchronize()
    if "kernel" in args.modes:
        graph = graph or capture_round_trip(dispatch, combine, device)
        op_bytes = convention_bytes(ids, num_experts=shape.num_experts, ep_size=ep_size,
                                    top_k=shape.top_k, dispatch_row=payload_row,
                                    combine_row=spec.combine_row_bytes)
        op_bytes["dispatch"]["bytes"] = disp_bytes
        op_bytes["combine"]["bytes"] = comb_bytes
        trace = (Path(args.trace_dir) / f"{shape.name}_{dtype_label(dtype)}_{kind}_t{tokens}"
                                        f"_ep{ep_size}.json.gz") if args.trace_dir else None
        rows += kernel_rows(graph.replay, iters=args.iters, ranks=ep_size, device=device,
                            op_bytes=op_bytes, empty_replay=empty.replay, trace_path=trace)
        ranks.synchronize()
    del graph, empty
    del ranks
    return rows


def baseline_rows(args, impl, shape, dtype, tokens, kind, group, gen, device):
    """One rank of a baseline (the whole group runs this collectively)."""
    world = dist.get_world_size(group)
    xs, scales, ids, _ = make_inputs(gen, shape, tokens, dtype, kind, world, device)
    me = dist.get_rank(group)
    x, ids_me = xs[me], ids[me]
    if scales[me] is not None:  # ship fp8 rows and their scales as one byte row
        x = torch.cat([x.view(torch.uint8), scales[me].view(torch.uint8)], dim=1)
    if impl == "nccl_a2a":
        a2a = NcclTwoSided(group, shape.num_experts)
    else:
        a2a = AllGatherReduceScatter(group, tokens)
    y_holder = {}

    def dispatch():
        recv = a2a.dispatch(x, ids_me)
        y_holder["y"] = torch.empty((recv.shape[0], shape.hidden), dtype=torch.bfloat16,
                                    device=device).normal_()

    def combine():
        a2a.combine(y_holder["y"])

    row_bytes = x.shape[1] * x.element_size()
    if impl == "nccl_a2a":
        disp_bytes = crossing_bytes(ids, shape.num_experts, world, row_bytes)
        comb_bytes = crossing_bytes(ids, shape.num_experts, world, shape.hidden * 2)
    else:  # every rank's tokens go to every other rank, outputs come back reduced
        disp_bytes = world * (world - 1) * tokens * row_bytes
        comb_bytes = world * (world - 1) * tokens * shape.hidden * 2
    rows = eager_rows(dispatch, combine, iters=args.iters, warmup=args.warmup,
                      disp_bytes=disp_bytes, comb_bytes=comb_bytes, sync_each=True)
    if impl == "agrs" and "graph" in args.modes:  # nccl_a2a needs its split sizes on the host
        rows.append(graph_round_trip(dispatch, combine, device, args, disp_bytes + comb_bytes,
                                     before=lambda: dist.barrier(group)))
    return rows


_FLASHINFER_CHECKED: dict[str, bool] = {}


def flashinfer_usable(rank: int) -> bool:
    if "ok" not in _FLASHINFER_CHECKED:
        try:
            import flashinfer.comm.trtllm_moe_alltoall  # noqa: F401
            _FLASHINFER_CHECKED["ok"] = True
        except Exception as exc:  # noqa: BLE001
            if rank == 0:
                print(f"flashinfer_one_sided skipped: {type(exc).__name__}: {exc}")
            _FLASHINFER_CHECKED["ok"] = False
    return _FLASHINFER_CHECKED["ok"]


def flashinfer_rows(args, shape, dtype, tokens, kind, group, gen, device):
    """flashinfer's MoeAlltoAll on the same inputs; expert outputs are random."""
    world, me = dist.get_world_size(group), dist.get_rank(group)
    xs, scales, ids, weights = make_inputs(gen, shape, tokens, dtype, kind, world, device)
    scale_row = 0 if scales[me] is None else scales[me].shape[1] * 4
    a2a = FlashInferOneSided(group, max_tokens=tokens, top_k=shape.top_k,
                             num_experts=shape.num_experts, hidden=shape.hidden,
                             x_row_bytes=shape.hidden * dtype.itemsize, scale_row_bytes=scale_row)
    y = torch.randn((world * tokens, shape.hidden), generator=gen, device=device).bfloat16()
    row = shape.hidden * dtype.itemsize + scale_row
    disp_bytes = crossing_bytes(ids, shape.num_experts, world, row)
    comb_bytes = crossing_bytes(ids, shape.num_experts, world, shape.hidden * 2)
    def dispatch():
        a2a.dispatch(xs[me], ids[me], weights[me], scales[me], tokens)

    def combine():
        a2a.combine(y)

    rows = eager_rows(dispatch, combine, iters=args.iters, warmup=args.warmup,
                      disp_bytes=disp_bytes, comb_bytes=comb_bytes, sync_each=world > 1,
                      before_each=(lambda: dist.barrier(group)) if world > 1 else None)
    if "graph" in args.modes:  # its flags advance on the device, so replays stay in step
        rows.append(graph_round_trip(dispatch, combine, device, args, disp_bytes + comb_bytes,
                                     before=lambda: dist.barrier(group)))
    del a2a
    return rows


def main(argv=None):
    args = parse_args(argv)
    from vllm_a2a_plugin.testing import launcher

    launch = launcher.detect()
    if launch is not None:  # torchrun or mpirun: one process per GPU
        device = torch.device("cuda", launch.local_rank)
        torch.cuda.set_device(device)
        launcher.init_process_group("nccl", launch, device_id=device)
    else:
        device = torch.device("cuda", 0)
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=device)
    group = dist.group.WORLD
    world = dist.get_world_size()
    rank = dist.get_rank()
    impls = args.impls.split(",")
    tokens_list = [int(t) for t in args.tokens.split(",")]
    combos = [(s, d, k, t) for s in args.shapes.split(",") for d in args.dtypes.split(",")
              for k in args.routing.split(",") for t in tokens_list]
    try:
        from tqdm import tqdm
        progress = tqdm(combos, disable=rank != 0)
    except ImportError:
        progress = combos
    warm_up_gpu(device)
    limit = peer_limit_gbps(group, device) if world > 1 else copy_limit_gbps(device)
    limit_kind = "peer_copy" if world > 1 else "device_copy"
    rows = []
    doc = result_header(args, device, world, limit_kind, limit)
    out = result_path(args, doc)
    for shape_name, dtype_name, kind, tokens in progress:
        shape, dtype = SHAPES[shape_name], DTYPES[dtype_name]
        gen = torch.Generator(device=device).manual_seed(tokens * 131 + len(rows))
        results = []
        if "a2a_one_sided" in impls:
            if world == 1:
                for ep in sorted({1, args.ep_size}):
                    if shape.num_experts % ep:
                        continue
                    for r in ours_single_process(args, shape, dtype, tokens, kind, ep, gen, device):
                        results.append(("a2a_one_sided", ep, *r))
            else:
                results += [("a2a_one_sided", world, *r) for r in
                            ours_distributed(args, shape, dtype, tokens, kind, group, gen, device)]
        if "flashinfer_one_sided" in impls and flashinfer_usable(rank):
            results += [("flashinfer_one_sided", world, *r) for r in
                        flashinfer_rows(args, shape, dtype, tokens, kind, group, gen, device)]
        for impl in impls:
            if impl in ("nccl_a2a", "agrs"):
                results += [(impl, world, *r) for r in
                            baseline_rows(args, impl, shape, dtype, tokens, kind, group, gen,
                                          device)]
        for impl, ep, op, mode, samples, nbytes, *extra in results:
            med, p99 = stats(samples)
            gbps = nbytes / (med * 1e-6) / 1e9 if med > 0 else 0.0
            rows.append(dict(impl=impl, op=op, mode=mode, shape=shape_name, dtype=dtype_name,
                             routing=kind, tokens_per_rank=tokens, ep_size=ep,
                             median_us=round(med, 2), p99_us=round(p99, 2), bytes=nbytes,
                             gbps=round(gbps, 2), frac_of_limit=round(gbps / limit, 4),
                             **(extra[0] if extra else {})))
        add_speedups(rows[-len(results):] if results else [])
        if rank == 0:  # after every point, so a run cut short still leaves its rows
            out.write_text(json.dumps({**doc, "rows": rows}, indent=1))
    if rank == 0:
        print(f"wrote {out} ({len(rows)} rows); {limit_kind} limit {limit:.0f} GB/s")
    dist.destroy_process_group()


def add_speedups(rows: list[dict]) -> None:
    """On each of our rows of one point: ``speedup_vs[impl]`` = that baseline's median
    over ours, for the same op, mode and rank count (> 1: we are faster)."""
    ours = [r for r in rows if r["impl"] == "a2a_one_sided"]
    for row in ours:
        row["speedup_vs"] = {
            other["impl"]: round(other["median_us"] / row["median_us"], 3)
            for other in rows
            if other["impl"] != "a2a_one_sided" and row["median_us"] > 0
            and (other["op"], other["mode"], other["ep_size"]) ==
                (row["op"], row["mode"], row["ep_size"])}


def result_header(args, device, world: int, limit_kind: str, limit: float) -> dict:
    """Everything a result file says besides its rows: how to rerun it, and where."""
    # A2A_COMMIT first: the device tool's copy of the tree can carry a stale .git,
    # so the command line that launches a run names the commit it was made from.
    commit = os.environ.get("A2A_COMMIT", "")
    if not commit:
        try:
            found = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                   text=True).stdout.strip()
            commit = found if len(found) == 40 else ""
        except OSError:
            pass
    return dict(command=" ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
                commit=commit or "unknown", gpu=torch.cuda.get_device_name(device),
                world_size=world, torch=torch.__version__, cuda=torch.version.cuda,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                limit_kind=limit_kind, limit_gbps=round(limit, 1))


def result_path(args, doc: dict) -> Path:
    if args.out:
        out = Path(args.out)
    else:
        machine = doc["gpu"].replace("NVIDIA ", "").replace(" ", "_") + f"_x{doc['world_size']}"
        out = ROOT / "benchmarks" / "results" / machine / f"{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def ours_distributed(args, shape, dtype, tokens, kind, group, gen, device):
    world, me = dist.get_world_size(group), dist.get_rank(group)
    spec = AllToAllSpec(ep_size=world, max_tokens_per_rank=tokens, hidden_size=shape.hidden,
                        top_k=shape.top_k, num_experts=shape.num_experts, dispatch_dtype=dtype,
                        scale_cols=shape.hidden // 128 if dtype == torch.float8_e4m3fn else 0)
    ws = Workspace.allocate_symmetric(spec, group, device)
    a2a = OneSidedAllToAll(ws, me, config=A2AConfig(
        threads_per_block=args.threads_per_block, max_blocks=args.max_blocks,
        check_expert_ids=False, timeout_s=30.0))
    xs, scales, ids, weights = make_inputs(gen, shape, tokens, dtype, kind, world, device)
    payload_row = sum(spec.payload_row_bytes)
    disp_bytes = crossing_bytes(ids, shape.num_experts, world, payload_row)
    comb_bytes = crossing_bytes(ids, shape.num_experts, world, spec.combine_row_bytes)

    def dispatch():
        a2a.dispatch(xs[me], ids[me], weights[me], x_scales=scales[me], runtime_max_tokens=tokens)

    rows = eager_rows(dispatch, a2a.combine, iters=args.iters, warmup=args.warmup,
                      disp_bytes=disp_bytes, comb_bytes=comb_bytes, sync_each=True,
                      before_each=lambda: dist.barrier(group))
    graph = None
    if "graph" in args.modes or "kernel" in args.modes:
        graph = capture_round_trip(dispatch, a2a.combine, device)
    if "graph" in args.modes:
        rows.append(graph_round_trip(dispatch, a2a.combine, device, args,
                                     disp_bytes + comb_bytes, before=lambda: dist.barrier(group),
                                     graph=graph))
    if "kernel" in args.modes:
        op_bytes = convention_bytes([ids[me]], num_experts=shape.num_experts, ep_size=world,
                                    top_k=shape.top_k, dispatch_row=payload_row,
                                    combine_row=spec.combine_row_bytes)
        # Crossing bytes summed over the group; a kernel row carries one rank's share.
        op_bytes["dispatch"]["bytes"] = disp_bytes // world
        op_bytes["combine"]["bytes"] = comb_bytes // world
        dist.barrier(group)
        rows += kernel_rows(graph.replay, iters=args.iters, ranks=1, device=device,
                            op_bytes=op_bytes)
    del graph
    a2a.check_errors()
    ws.release()
    return rows


if __name__ == "__main__":
    main()
