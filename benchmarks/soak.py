"""Soak: a million checked dispatch/combine rounds on one GPU.

Random cases (``P`` in {2, 3, 4, 6, 8} logical ranks, top-k 1..16, hidden
128..1024, bf16 / fp16 / fp8 with float32 scales, random owner tables, split
and concurrent modes, capacity 1..16 tokens) each run a few eager rounds, then
a CUDA graph of ``--graph-rounds`` rounds (each with its own token counts,
including ranks at 0 and all ranks at 0, and its own runtime max tokens) that
is replayed with fresh random data generated inside the graph. Every round,
eager or replayed, is checked on the GPU against the vectorized reference of
``benchmarks/soak_reference.py``: received ids, weights, hidden states and
scales bit for bit, combine outputs bit for bit. Mismatch counts accumulate in
a device tensor read every ``--sync-every`` replays (with the ranks' error
records), so checking costs no host sync per round.

    python3 benchmarks/soak.py --out $OUT/soak.json --rounds 1000000 --minutes 9

A round is one dispatch and one combine of every rank of the case (``P``
kernel round trips); ``rank_rounds`` in the result counts those. Exit status 0
only when the target was reached with no mismatch and no device error.
``--device cpu`` drives the same loop over the host reference (no kernels, no
graphs): what ``tests/test_soak_cpu.py`` runs.
"""

from __future__ import annotations

import os

# Concurrent mode gives each logical rank its own stream and hardware queue;
# this must be set before CUDA initialises (see vllm_a2a_plugin/local_ranks.py).
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import shlex  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.soak_reference import (EP_SIZES, KINDS, MODES, Checker,  # noqa: E402
                                       ReferenceRanks, SoakCase, generate_round, random_case,
                                       random_counts, random_runtime_max)

_DTYPE_CYCLE = ("bf16", "fp16", "fp8")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="JSON result path")
    p.add_argument("--rounds", type=int, default=1_000_000, help="stop after this many rounds")
    p.add_argument("--minutes", type=float, default=9.0,
                   help="stop when this much time has passed, target reached or not")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda", help="cuda (the kernels) or cpu (the reference)")
    p.add_argument("--seconds-per-case", type=float, default=2.5,
                   help="replay time of one case before the next is drawn")
    p.add_argument("--eager-rounds", type=int, default=8, help="eager rounds per case")
    p.add_argument("--graph-rounds", type=int, default=16, help="rounds in one captured graph")
    p.add_argument("--sync-every", type=int, default=64,
                   help="replays between reads of the mismatch counters and error records")
    p.add_argument("--timeout-s", type=float, default=10.0, help="device timeout of a wait")
    p.add_argument("--modes", default=",".join(MODES), help="LocalRanks modes to draw from")
    return p.parse_args(argv)


class Tally:
    """Counts of one soak run; ``add`` records ``n`` rounds of one plan of a case."""

    def __init__(self):
        self.rounds = 0
        self.rank_rounds = 0
        self.eager_rounds = 0
        self.graph_rounds = 0
        self.graphs = 0
        self.cases = 0
        self.any_rank_zero_rounds = 0
        self.all_ranks_zero_rounds = 0
        self.mismatches = Counter({kind: 0 for kind in KINDS})
        self.per_config: dict[str, Counter] = {name: Counter() for name in (
            "ep_size", "dtype", "mode", "top_k", "hidden", "owner")}
        self.failures: list[dict] = []

    def add(self, case: SoakCase, counts: list[int], n: int, *, graph: bool,
            linear_owner: bool) -> None:
        self.rounds += n
        self.rank_rounds += n * case.ep_size
        if graph:
            self.graph_rounds += n
        else:
            self.eager_rounds += n
        if min(counts) == 0:
            self.any_rank_zero_rounds += n
        if max(counts) == 0:
            self.all_ranks_zero_rounds += n
        for name, value in (("ep_size", case.ep_size), ("dtype", case.dtype),
                            ("mode", case.mode), ("top_k", case.top_k),
                            ("hidden", case.hidden),
                            ("owner", "linear" if linear_owner else "random")):
            self.per_config[name][str(value)] += n

    def add_mismatches(self, case: SoakCase, counts: list[int]) -> None:
        got = dict(zip(KINDS, counts))
        if any(got.values()):
            self.mismatches.update(got)
            self.failures.append({"case": case.describe(), "mismatches": got})

    def total_mismatches(self) -> int:
        return sum(self.mismatches.values())


def _is_linear(case: SoakCase) -> bool:
    e, p = case.num_experts, case.ep_size
    return case.owner == tuple(min(x * p // e, p - 1) for x in range(e))


def soak_round(ranks, checker: Checker, case: SoakCase, counts: list[int], m: int,
               device: torch.device, mismatches: torch.Tensor) -> None:
    """One round: fresh inputs on ``device``, dispatch, check, combine, check.

    Only device work and no host sync, so it can be captured in a CUDA graph
    (the mismatch counts land in ``mismatches``, ``[len(KINDS)]`` int64).
    """
    inputs = generate_round(case, counts, m, device)
    outputs = torch.zeros((case.ep_size, m, case.hidden), dtype=case.combine_dtype,
                          device=device)
    results = ranks.dispatch(inputs.per_rank(inputs.x), inputs.per_rank(inputs.topk_ids),
                             inputs.per_rank(inputs.topk_weights),
                             x_scales=inputs.per_rank(inputs.x_scales) if case.scale_cols
                             else None, runtime_max_tokens=m)
    expected = checker.expected_dispatch(inputs)
    mismatches.add_(checker.dispatch_mismatches(results, inputs, expected))
    ranks.combine(list(inputs.y), outs=inputs.per_rank(outputs))
    mismatches.add_(checker.combine_mismatches(outputs, inputs, expected))


def make_ranks(case: SoakCase, device: torch.device, timeout_s: float):
    if device.type == "cpu":
        return ReferenceRanks(case)
    from vllm_a2a_plugin import A2AConfig, LocalRanks

    return LocalRanks(case.spec(), mode=case.mode, expert_owner=case.owner_tensor(),
                      config=A2AConfig(timeout_s=timeout_s, check_expert_ids=False),
                      device=device)


def run_case(case: SoakCase, rng: random.Random, device: torch.device, args, tally: Tally,
             deadline: float, target: int) -> None:
    """Eager rounds, then (on CUDA) a captured graph replayed until this case's time is up."""
    from vllm_a2a_plugin.errors import A2ADeviceError

    ranks = make_ranks(case, device, args.timeout_s)
    checker = Checker(case, device)
    mismatches = torch.zeros(len(KINDS), dtype=torch.int64, device=device)
    linear = _is_linear(case)
    cuda = device.type == "cuda"

    def plan() -> tuple[list[int], int]:
        counts = random_counts(rng, case.ep_size, case.capacity)
        return counts, random_runtime_max(rng, counts, case.capacity)

    def drain(counted: list[tuple[list[int], int, bool]]) -> bool:
        """Read counters and error records; account ``counted``; False on a device error."""
        try:
            ranks.synchronize()
        except A2ADeviceError as exc:
            tally.failures.append({"case": case.describe(), "device_error": str(exc)})
            ranks.recover()
            return False
        tally.add_mismatches(case, mismatches.tolist())
        mismatches.zero_()
        for counts, n, graph in counted:
            tally.add(case, counts, n, graph=graph, linear_owner=linear)
        return True

    try:
        eager = [plan() for _ in range(args.eager_rounds)]
        graph_plans = [plan() for _ in range(args.graph_rounds)] if cuda else []
        # The graph's plans run eagerly once first: warm-up outside capture, and checked.
        for counts, m in eager + graph_plans:
            soak_round(ranks, checker, case, counts, m, device, mismatches)
        if not drain([(c, 1, False) for c, _ in eager + graph_plans]) or not cuda:
            return
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            for counts, m in graph_plans:
                soak_round(ranks, checker, case, counts, m, device, mismatches)
        torch.cuda.current_stream(device).wait_stream(stream)
        tally.graphs += 1
        case_end = min(deadline, time.monotonic() + args.seconds_per_case)
        while time.monotonic() < case_end and tally.rounds < target:
            batch = max(1, min(args.sync_every,
                               -(-(target - tally.rounds) // len(graph_plans))))
            for _ in range(batch):
                graph.replay()
            if not drain([(c, batch, True) for c, _ in graph_plans]):
                return
        del graph
    finally:
        if cuda:
            torch.cuda.synchronize(device)
            ranks.workspace.release()


def machine(device: torch.device) -> dict:
    info = {"host": socket.gethostname(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def commit() -> str:
    # A2A_COMMIT first: the device tool's copy of the tree can carry a stale .git.
    found = os.environ.get("A2A_COMMIT", "")
    if found:
        return found
    try:
        found = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
    except OSError:
        found = ""
    return found if len(found) == 40 else "unknown"


def run_soak(args) -> dict:
    """Run the soak as ``args`` say; returns the result document (also written to ``--out``)."""
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda":
        from vllm_a2a_plugin import ops

        ops.require_kernels()  # a JIT build of the extension is not soak time
        torch.cuda.manual_seed(args.seed)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    modes = [m for m in args.modes.split(",") if m]
    tally = Tally()
    start = time.monotonic()
    deadline = start + args.minutes * 60
    error = None
    try:
        while tally.rounds < args.rounds and time.monotonic() < deadline:
            i = tally.cases
            # Every (P, dtype, mode) combination within the first 30 cases; the rest random.
            case = random_case(rng, ep_size=EP_SIZES[i % len(EP_SIZES)], modes=modes)
            case = SoakCase(**{**case.__dict__,
                               "dtype": _DTYPE_CYCLE[(i // len(EP_SIZES)) % 3],
                               "mode": modes[(i // (3 * len(EP_SIZES))) % len(modes)]})
            tally.cases += 1
            run_case(case, rng, device, args, tally, deadline, args.rounds)
            if tally.cases % 25 == 0:
                print(f"[soak] {time.monotonic() - start:.0f} s: {tally.cases} cases, "
                      f"{tally.rounds} rounds, {tally.total_mismatches()} mismatches, "
                      f"{len(tally.failures)} failures", file=sys.stderr, flush=True)
    except Exception as exc:  # noqa: BLE001 - recorded in the result, then re-raised
        error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        seconds = time.monotonic() - start
        doc = {
            "rounds": tally.rounds,
            "rank_rounds": tally.rank_rounds,
            "eager_rounds": tally.eager_rounds,
            "graph_replay_rounds": tally.graph_rounds,
            "graphs_captured": tally.graphs,
            "cases": tally.cases,
            "mismatches": tally.total_mismatches(),
            "mismatches_by_kind": dict(tally.mismatches),
            "device_errors": sum(1 for f in tally.failures if "device_error" in f),
            "failures": tally.failures[:20],
            "any_rank_zero_rounds": tally.any_rank_zero_rounds,
            "all_ranks_zero_rounds": tally.all_ranks_zero_rounds,
            "per_config": {name: dict(sorted(c.items())) for name, c in tally.per_config.items()},
            "seconds": round(seconds, 2),
            "rounds_per_second": round(tally.rounds / seconds, 1) if seconds else 0.0,
            "target_rounds": args.rounds,
            "target_reached": tally.rounds >= args.rounds,
            "error": error,
            "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
            "args": vars(args),
            "machine": machine(device),
            "commit": commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        doc["passed"] = (error is None and doc["target_reached"] and doc["mismatches"] == 0
                         and doc["device_errors"] == 0)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def main(argv=None) -> int:
    args = parse_args(argv)
    doc = run_soak(args)
    summary = {k: doc[k] for k in ("rounds", "rank_rounds", "graph_replay_rounds", "eager_rounds",
                                   "cases", "mismatches", "device_errors", "seconds",
                                   "rounds_per_second", "passed")}
    print(json.dumps(summary))
    return 0 if doc["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
