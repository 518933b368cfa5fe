"""Workspace create/destroy cycles: no growth of GPU memory, pinned host memory or RSS.

Each cycle builds ``P`` logical ranks on one GPU (``Workspace.allocate_local``
and one ``OneSidedAllToAll`` per rank, each with its pinned, device-mapped
error record), runs one dispatch/combine round, releases the workspace and
drops every object. After ``--warmup`` cycles the numbers are taken as the
baseline; the last cycle's numbers must not exceed them (beyond small slack for
RSS, which Python's own allocator moves). Samples along the way go to the JSON.

    python3 benchmarks/resource_cycles.py --cycles 10000 --out $OUT/resource_cycles.json

Exit status 0 when nothing grew.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vllm_a2a_plugin import A2AConfig, AllToAllSpec, OneSidedAllToAll, Workspace  # noqa: E402
from vllm_a2a_plugin.all_to_all import PHASE_SEND  # noqa: E402
from vllm_a2a_plugin.workspace import WorkspaceLayout  # noqa: E402

# Slack for the process's resident set: Python's allocator and torch's caches
# move it by a few MiB on their own; a leak of one 4 KiB pinned page or one
# small tensor per cycle over 10^4 cycles exceeds it.
RSS_SLACK_BYTES = 32 << 20
# mem_get_info sees the whole device (the CUDA context, other processes); torch's
# reserved pool may settle on another segment split. Exact check: memory_allocated.
DEVICE_FREE_SLACK_BYTES = 20 << 20
RESERVED_SLACK_BYTES = 20 << 20


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc), 0 where unavailable."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def pinned_host_stats() -> dict[str, int]:
    """Torch's pinned (host) caching allocator: bytes it holds and bytes in use."""
    stats_fn = getattr(torch.cuda, "host_memory_stats", None)
    if stats_fn is None:
        return {}
    stats = stats_fn()
    keys = ("allocated_bytes.current", "active_bytes.current", "allocations.current",
            "num_host_alloc", "num_host_free")
    return {k: int(stats[k]) for k in keys if k in stats}


def snapshot(device: torch.device) -> dict[str, int]:
    gc.collect()
    torch.cuda.synchronize(device)
    free, _ = torch.cuda.mem_get_info(device)
    snap = {"gpu_allocated": torch.cuda.memory_allocated(device),
            "gpu_reserved": torch.cuda.memory_reserved(device),
            "gpu_free": free, "rss": rss_bytes()}
    snap.update({f"pinned_{k}": v for k, v in pinned_host_stats().items()})
    return snap


def one_cycle(spec: AllToAllSpec, device: torch.device, inputs, config: A2AConfig) -> None:
    """Create the ranks, run one round (split phases), release everything."""
    workspace = Workspace.allocate_local(spec, device)
    ranks = [OneSidedAllToAll(workspace, r, config=config) for r in range(spec.ep_size)]
    xs, ids, weights, m = inputs
    for a2a, x, i, w in zip(ranks, xs, ids, weights):
        a2a.dispatch(x, i, w, runtime_max_tokens=m, phases=PHASE_SEND)
    for a2a in ranks:
        a2a.wait_dispatch()
    outs = [a2a.combine_output() for a2a in ranks]
    for a2a, out in zip(ranks, outs):
        a2a.combine(out=out, phases=PHASE_SEND)
    for a2a in ranks:
        a2a.wait_combine()
    for a2a in ranks:
        a2a.synchronize()
    workspace.release()


def run_cycles(cycles: int, *, warmup: int = 50, samples: int = 20, ep_size: int = 4,
               device: torch.device | str = "cuda") -> dict:
    """Run the cycles; returns baseline, final and sampled numbers and the verdict."""
    device = torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    spec = AllToAllSpec(ep_size=ep_size, max_tokens_per_rank=64, hidden_size=1024, top_k=4,
                        num_experts=8 * ep_size)
    config = A2AConfig(timeout_s=10.0, check_expert_ids=False)
    gen = torch.Generator(device="cpu").manual_seed(0)
    counts = [64, 0] + [17] * (ep_size - 2)
    xs = [torch.randn((n, 1024), generator=gen).to(device=device, dtype=torch.bfloat16)
          for n in counts]
    ids = [torch.rand((n, spec.num_experts), generator=gen).topk(4, dim=1).indices
           .to(device=device, dtype=torch.int32) for n in counts]
    weights = [torch.rand((n, 4), generator=gen).to(device) for n in counts]
    inputs = (xs, ids, weights, max(counts))

    start = time.monotonic()
    for _ in range(warmup):
        one_cycle(spec, device, inputs, config)
    baseline = snapshot(device)
    sampled = []
    every = max(1, cycles // max(1, samples))
    for i in range(1, cycles + 1):
        one_cycle(spec, device, inputs, config)
        if i % every == 0 or i == cycles:
            sampled.append({"cycle": i, **snapshot(device)})
    final = sampled[-1] if sampled else snapshot(device)
    growth = {k: final[k] - baseline[k] for k in baseline if k in final}
    checks = {
        "gpu_allocated": growth["gpu_allocated"] <= 0,
        "gpu_reserved": growth["gpu_reserved"] <= RESERVED_SLACK_BYTES,
        "gpu_free": -growth["gpu_free"] <= DEVICE_FREE_SLACK_BYTES,
        "rss": growth["rss"] <= RSS_SLACK_BYTES,
    }
    # Pinned memory: bytes held and cudaHostAlloc calls. Not active_bytes: on an
    # H100 with torch 2.11 it rose 128 B per cycle while allocated bytes, the
    # number of allocations and of cudaHostAlloc calls stayed flat over 10^4
    # cycles (the host caching allocator's counter, not memory held).
    for key in ("pinned_allocated_bytes.current", "pinned_allocations.current",
                "pinned_num_host_alloc"):
        if key in growth:
            checks[key] = growth[key] <= 0
    return {
        "cycles": cycles, "warmup": warmup, "ep_size": ep_size,
        "workspace_bytes_per_rank": WorkspaceLayout.for_spec(spec).total_bytes,
        "seconds": round(time.monotonic() - start, 2),
        "baseline": baseline, "final": final, "growth": growth, "samples": sampled,
        "checks": checks, "passed": all(checks.values()),
        "pinned_stats_available": bool(pinned_host_stats()),
        "gpu": torch.cuda.get_device_name(device), "torch": torch.__version__,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cycles", type=int, default=10_000)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--ep-size", type=int, default=4)
    p.add_argument("--out", default=None, help="JSON result path")
    args = p.parse_args(argv)
    doc = run_cycles(args.cycles, warmup=args.warmup, ep_size=args.ep_size)
    doc["command"] = " ".join([sys.executable, *sys.argv])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    for name in ("baseline", "final", "growth"):
        print(name, json.dumps(doc[name]))
    print("checks", json.dumps(doc["checks"]), "seconds", doc["seconds"])
    return 0 if doc["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
