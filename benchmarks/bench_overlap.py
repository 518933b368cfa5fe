"""Exposed all-to-all time with and without micro-batch overlap, on one GPU.

What vLLM's dual-batch overlap does with our prepare/finalize, per MoE layer,
with two micro-batches A and B of ``tokens / 2`` tokens per rank each, every
micro-batch on its own workspaces (``--ep-size`` logical ranks each):

* compute: a stand-in "attention" and a stand-in "experts" per micro-batch,
  both sized like the layer's expert GEMMs (``[P * T/2 * K, H] x [H, 2I]``, then
  ``[P * T/2 * K, I] x [I, H]``: the work all P ranks' experts do);
* all-to-all: our fused dispatch and combine of every logical rank.

Rows (each variant captured once in a CUDA graph, as vLLM captures a split
decode step, and replayed back to back behind a held stream: CUDA events
around each replay of ``--layers`` layers, median over ``--iters``; eager
steps of this size are bound by the host's launch rate, not the GPU):

* ``compute_alone``: the compute of both micro-batches, one stream;
* ``a2a_alone``: both micro-batches' dispatches and combines, one stream;
* ``serial``: the same work back to back on one stream (DBO off);
* ``recv_hooks``: the receive-hook schedule (DeepEP-LL's order), one stream:
  each send, then the other micro-batch's compute, then the wait;
* ``overlapped``: DBO's order on two streams (vLLM ``ubatching``: before each
  all-to-all the micro-batch records its compute, the other micro-batch
  enqueues its compute, then the comm stream waits for the recorded point,
  runs the launch, and the compute stream waits for the launch):
  compute ``A0 B0 C_A0 C_B0 A1 ...``, comm ``D_A0 D_B0 K_A0 K_B0 D_A1 ...``, so
  ``D_A`` runs beside ``B``'s attention, ``D_B`` beside ``A``'s experts, ``K_A``
  beside ``B``'s experts, ``K_B`` beside the next layer's ``A`` attention.

``exposed = total - compute_alone``; the goal is ``overlapped <= 1.2 x
compute_alone``. With several logical ranks everything (all ranks' compute and
copies) shares one GPU, so this measures how well our kernels share SMs and
memory bandwidth with GEMMs, not NVLink.

    python benchmarks/bench_overlap.py --out benchmarks/results/<gpu>/overlap.json --plot
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_a2a import result_header, result_path, timed, warm_up_gpu  # noqa: E402
from benchmarks.shapes import SHAPES, routing  # noqa: E402
from vllm_a2a_plugin import A2AConfig, AllToAllSpec, LocalRanks  # noqa: E402
from vllm_a2a_plugin.all_to_all import PHASE_SEND  # noqa: E402

# Expert intermediate sizes (the models' moe_intermediate_size).
EXPERT_INTERMEDIATE = {"deepseek_v3": 2048, "qwen3_30b_a3b": 768, "mixtral_8x7b": 14336}
GOAL_RATIO = 1.2


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", default="deepseek_v3,qwen3_30b_a3b")
    p.add_argument("--ep-sizes", default="1,8", help="logical ranks on the GPU")
    p.add_argument("--tokens", default="128,1024", help="tokens per rank per step (both "
                   "micro-batches together)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--comm-max-blocks", default="0,32",
                   help="grid caps of our kernels to compare, comma separated (0: their "
                        "default, 2 x SMs; a small cap leaves the GEMMs more SMs)")
    p.add_argument("--out", default=None)
    p.add_argument("--name", default="overlap")
    p.add_argument("--plot", action="store_true", help="also write <out>.png")
    return p.parse_args(argv)


class MicroBatchWork:
    """One micro-batch of one layer: inputs, workspaces and stand-in compute."""

    def __init__(self, shape, ep_size: int, tokens: int, gen: torch.Generator, config):
        spec = AllToAllSpec(ep_size=ep_size, max_tokens_per_rank=tokens, hidden_size=shape.hidden,
                            top_k=shape.top_k, num_experts=shape.num_experts,
                            dispatch_dtype=torch.bfloat16, combine_dtype=torch.bfloat16)
        self.ranks = LocalRanks(spec, config=config)
        self.tokens = tokens
        self.xs = [torch.randn((tokens, shape.hidden), generator=gen, dtype=torch.float32)
                   .to("cuda", torch.bfloat16) for _ in range(ep_size)]
        self.ids = [routing(gen, tokens, shape, "uniform", rank=r, ep_size=ep_size).cuda()
                    for r in range(ep_size)]
        self.ws = [torch.rand((tokens, shape.top_k), generator=gen).cuda() for _ in range(ep_size)]
        rows = ep_size * tokens * shape.top_k
        inter = EXPERT_INTERMEDIATE[shape.name]
        self.act = torch.randn((rows, shape.hidden), device="cuda", dtype=torch.bfloat16)
        self.w1 = torch.randn((shape.hidden, 2 * inter), device="cuda", dtype=torch.bfloat16)
        self.mid = torch.empty((rows, inter), device="cuda", dtype=torch.bfloat16)
        self.w2 = torch.randn((inter, shape.hidden), device="cuda", dtype=torch.bfloat16)
        self.flops = 2 * rows * shape.hidden * 3 * inter

    def compute(self) -> None:
        """One expert-GEMM-sized piece of compute (attention or experts)."""
        up = self.act @ self.w1
        torch.mul(up[:, : self.mid.shape[1]], up[:, self.mid.shape[1]:], out=self.mid)
        self.mid @ self.w2

    def dispatch(self) -> None:
        self.ranks.dispatch(self.xs, self.ids, self.ws, runtime_max_tokens=self.tokens)

    def combine(self) -> None:
        self.ranks.combine()

    # The split forms, for the receive-hook schedule (every rank's send, later
    # every rank's wait, all on the current stream).
    def send_dispatch(self) -> None:
        for rank, a2a in enumerate(self.ranks.ranks):
            a2a.dispatch(self.xs[rank], self.ids[rank], self.ws[rank],
                         runtime_max_tokens=self.tokens, phases=PHASE_SEND)

    def wait_dispatch(self) -> None:
        for a2a in self.ranks.ranks:
            a2a.wait_dispatch()

    def send_combine(self) -> None:
        for a2a in self.ranks.ranks:
            a2a.combine(phases=PHASE_SEND)

    def wait_combine(self) -> None:
        for a2a in self.ranks.ranks:
            a2a.wait_combine()


def serial_step(a: MicroBatchWork, b: MicroBatchWork, layers: int, *, compute=True, comm=True):
    for _ in range(layers):
        for mb in (a, b):
            if compute:
                mb.compute()  # attention
            if comm:
                mb.dispatch()
            if compute:
                mb.compute()  # experts
            if comm:
                mb.combine()


def overlapped_step(a: MicroBatchWork, b: MicroBatchWork, layers: int,
                    comm_stream: torch.cuda.Stream) -> None:
    compute_stream = torch.cuda.current_stream()

    def comm_region(recorded: torch.cuda.Event, launch) -> None:
        comm_stream.wait_event(recorded)
        with torch.cuda.stream(comm_stream):
            launch()
        compute_stream.wait_stream(comm_stream)

    def record() -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(compute_stream)
        return event

    # The micro-batch threads' order: each records its compute before the
    # all-to-all region and yields; the other enqueues its compute meanwhile.
    a.compute()                  # A's attention
    a_ready = record()
    for layer in range(layers):
        b.compute()              # B's attention
        b_ready = record()
        comm_region(a_ready, a.dispatch)
        a.compute()              # A's experts
        a_done = record()
        comm_region(b_ready, b.dispatch)
        b.compute()              # B's experts
        b_done = record()
        comm_region(a_done, a.combine)
        if layer + 1 < layers:
            a.compute()          # A's next attention
            a_ready = record()
        comm_region(b_done, b.combine)


def recv_hooks_step(a: MicroBatchWork, b: MicroBatchWork, layers: int) -> None:
    """DeepEP-low-latency's order (``VLLM_A2A_DBO_SCHEDULE=recv_hooks``), one stream:
    a send, the other micro-batch's compute, then the wait (vLLM's receive hook)."""
    for layer in range(layers):
        a.compute()              # A's attention
        if layer:
            b.wait_combine()     # B's combine wait, run by A (hook) before A's dispatch
        a.send_dispatch()
        b.compute()              # B's attention
        a.wait_dispatch()        # A's hook, run by B
        b.send_dispatch()
        a.compute()              # A's experts
        b.wait_dispatch()        # B's hook, run by A's finalize
        a.send_combine()
        b.compute()              # B's experts
        a.wait_combine()         # A's hook, run by B's finalize
        b.send_combine()
    b.wait_combine()             # run when A's thread exits


def captured(step) -> torch.cuda.CUDAGraph:
    """``step`` captured in a CUDA graph after one eager run."""
    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    current = torch.cuda.current_stream()
    stream = torch.cuda.Stream()
    stream.wait_stream(current)
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        step()
    current.wait_stream(stream)
    return graph


def measure(args, shape, ep_size: int, tokens: int, comm_max_blocks: int) -> list[dict]:
    gen = torch.Generator().manual_seed(ep_size * 10007 + tokens)
    config = A2AConfig(check_expert_ids=False, timeout_s=30.0, max_blocks=comm_max_blocks)
    per_micro_batch = tokens // 2
    a = MicroBatchWork(shape, ep_size, per_micro_batch, gen, config)
    b = MicroBatchWork(shape, ep_size, per_micro_batch, gen, config)
    comm_stream = torch.cuda.Stream()
    variants = {
        "compute_alone": lambda: serial_step(a, b, args.layers, comm=False),
        "a2a_alone": lambda: serial_step(a, b, args.layers, compute=False),
        "serial": lambda: serial_step(a, b, args.layers),
        "overlapped": lambda: overlapped_step(a, b, args.layers, comm_stream),
        "recv_hooks": lambda: recv_hooks_step(a, b, args.layers),
    }
    medians = {}
    for name, step in variants.items():
        graph = captured(step)
        medians[name] = statistics.median(timed(graph.replay, iters=args.iters,
                                                warmup=args.warmup, queue_ahead=True))
        del graph
    a.ranks.synchronize()
    b.ranks.synchronize()
    compute = medians["compute_alone"]
    row = dict(shape=shape.name, ep_size=ep_size, tokens_per_rank=tokens,
               micro_batch_tokens=per_micro_batch, layers=args.layers,
               comm_max_blocks=comm_max_blocks,
               compute_tflops=round(2 * a.flops * 2 * args.layers / (compute * 1e-6) / 1e12, 1),
               **{f"{k}_us": round(v, 1) for k, v in medians.items()},
               exposed_serial_us=round(medians["serial"] - compute, 1),
               exposed_overlapped_us=round(medians["overlapped"] - compute, 1),
               exposed_recv_hooks_us=round(medians["recv_hooks"] - compute, 1),
               overlapped_over_compute=round(medians["overlapped"] / compute, 3),
               serial_over_compute=round(medians["serial"] / compute, 3))
    row["hidden_fraction"] = round(
        1 - row["exposed_overlapped_us"] / row["exposed_serial_us"], 3) \
        if row["exposed_serial_us"] > 0 else None
    print(json.dumps(row), flush=True)
    return [row]


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["rows"]
    labels = [f"{r['shape']}\nP={r['ep_size']} T={r['tokens_per_rank']}"
              + (f"\ncap {r['comm_max_blocks']}" if r["comm_max_blocks"] else "") for r in rows]
    x = range(len(rows))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(8, 1.6 * len(rows)), 8))
    width = 0.27
    top.bar([i - width for i in x], [r["exposed_serial_us"] for r in rows], width,
            label="back to back (DBO off)")
    top.bar(list(x), [r["exposed_recv_hooks_us"] for r in rows], width,
            label="receive hooks (one stream)")
    top.bar([i + width for i in x], [r["exposed_overlapped_us"] for r in rows], width,
            label="comm stream (default)")
    top.set_ylabel(f"exposed all-to-all, us ({rows[0]['layers']} layers)")
    top.set_xticks(list(x), labels, fontsize=8)
    top.legend()
    bottom.bar([i - width for i in x], [r["serial_over_compute"] for r in rows], width,
               label="back to back")
    bottom.bar(list(x), [r["recv_hooks_us"] / r["compute_alone_us"] for r in rows], width,
               label="receive hooks")
    bottom.bar([i + width for i in x], [r["overlapped_over_compute"] for r in rows], width,
               label="comm stream")
    bottom.axhline(GOAL_RATIO, color="k", linestyle="--", linewidth=1, label="goal 1.2")
    bottom.axhline(1.0, color="grey", linewidth=0.8)
    bottom.set_ylabel("step time / compute alone")
    bottom.set_xticks(list(x), labels, fontsize=8)
    bottom.legend()
    fig.suptitle(f"{doc['gpu']}, commit {doc['commit'][:10]}: CUDA graphs replayed back to "
                 f"back, CUDA events, median of {doc['iters']} steps", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device("cuda", torch.cuda.current_device())
    doc = result_header(args, device, 1, "none", 0.0)
    doc.update(method="each variant captured in a CUDA graph; replays queued behind a held "
                      "stream; CUDA events around each replay of --layers layers; median",
               iters=args.iters, rows=[])
    warm_up_gpu(device)
    for shape_name in args.shapes.split(","):
        for ep_size in map(int, args.ep_sizes.split(",")):
            for tokens in map(int, args.tokens.split(",")):
                for cap in map(int, args.comm_max_blocks.split(",")):
                    doc["rows"] += measure(args, SHAPES[shape_name], ep_size, tokens, cap)
                    torch.cuda.empty_cache()  # the point's workspaces and graphs are gone
    out = result_path(args, doc)
    out.write_text(json.dumps(doc, indent=1))
    print("wrote", out)
    if args.plot:
        plot(doc, out.with_suffix(".png"))
        print("wrote", out.with_suffix(".png"))


if __name__ == "__main__":
    main()
