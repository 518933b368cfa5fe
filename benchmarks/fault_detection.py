"""How fast a lost peer stops every survivor, over many injected faults (one GPU).

P logical ranks on one GPU (:class:`LocalRanks`, concurrent mode: each rank's
kernels on their own stream, all in flight, as on separate GPUs). In every
fault a victim rank never launches its part of a round, so the survivors'
kernels spin on its flags, with ``--queued`` further rounds queued behind on
each survivor's stream; then the victim is lost:

* ``stall_dispatch`` / ``stall_combine``: the victim is a logical rank whose
  heartbeat stops (``LocalRanks.lose_rank``): the path of a stuck peer.
* ``kill`` / ``stop``: the victim's heartbeat is beaten by a separate process
  (a small Python process mapping the same shared segment) that is SIGKILLed /
  SIGSTOPped. That process runs no GPU work (it is about to die or stop
  anyway): what is measured is a real process death or stop seen by this
  process's native watchdog, and the survivors' kernels leaving.

Per fault: ``detect`` = fault -> abort word raised (host clock, polled);
``exit`` = abort -> every survivor stream idle (the waiting round and every
round queued behind it); ``total`` = their sum. Checked each time: every
survivor's error is ``A2APeerLostError`` naming the victim (``errors_bad``),
no stream still busy 5 s later (``hangs``), a round checked against the
reference after ``recover()`` (``wrong``), CUDA memory and process RSS after
each recover (growth from the first fault to the last).

    python benchmarks/fault_detection.py --faults 100 --interval 0.25 \\
        --json out/faults.json --plot out/faults.png

The watchdog's interval (``--interval``) sets ``detect`` for heartbeat faults
(stall, stop): a heartbeat must stand still that long, counted from its last
beat, which came up to one tick (interval / 10) before the fault, so ``detect``
lies between interval - tick and interval + tick; a killed process is seen on
the next tick.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")

import torch  # noqa: E402

from vllm_a2a_plugin import A2AConfig, AllToAllSpec, LocalRanks  # noqa: E402
from vllm_a2a_plugin.errors import A2APeerLostError  # noqa: E402
from vllm_a2a_plugin.padding import linear_expert_owner  # noqa: E402
from vllm_a2a_plugin.reference import combine_reference, dispatch_reference  # noqa: E402
from vllm_a2a_plugin.watchdog import PeerWatchdog, _create_segment  # noqa: E402

KINDS = ("stall_dispatch", "stall_combine", "kill", "stop")
HANG_S = 5.0

# A peer process that only beats its heartbeat: maps the segment, writes its pid
# and state into its slot (csrc/watchdog.h WatchdogSlot: heartbeat u64 at 0, pid
# i64 at 8, state u32 at 16; slots of 64 bytes after a 64-byte group line), then
# increments the heartbeat every tick. Aligned 8-byte stores: whole on x86/Arm.
_VICTIM = r"""
import mmap, os, struct, sys, time
path, rank, tick = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
fd = os.open(path, os.O_RDWR)
m = mmap.mmap(fd, 0)
os.close(fd)
off = 64 + 64 * rank
# A beat before the slot says alive: the watchdog then sees it fresh, however
# long this process took to start.
beat = struct.unpack_from("<Q", m, off)[0] + 1
struct.pack_into("<Q", m, off, beat)
struct.pack_into("<q", m, off + 8, os.getpid())
struct.pack_into("<I", m, off + 16, 1)
while True:
    beat += 1
    struct.pack_into("<Q", m, off, beat)
    time.sleep(tick)
"""


@dataclass
class FaultResult:
    kind: str
    victim: int
    detect_ms: float
    exit_ms: float
    total_ms: float
    hang: bool
    errors_ok: bool
    error: str
    wrong: bool
    cuda_bytes: int
    rss_bytes: int


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class FaultRig:
    """P logical ranks, their streams and a seeded generator; injects one fault
    at a time and recovers after it.

    Args:
        ep_size: logical ranks P (>= 2).
        interval_s: the watchdog's interval.
        queued: rounds queued behind the stuck one on every survivor.
        seed: inputs and victims.
    """

    def __init__(self, *, ep_size: int = 4, interval_s: float = 0.25, queued: int = 2,
                 seed: int = 0):
        self.spec = AllToAllSpec(ep_size=ep_size, max_tokens_per_rank=8, hidden_size=256,
                                 top_k=2, num_experts=4 * ep_size)
        # The device timeout far above any detection: only the abort ends a wait.
        self.ranks = LocalRanks(self.spec, mode="concurrent",
                                config=A2AConfig(timeout_s=60.0, check_expert_ids=False))
        self.interval_s = interval_s
        self.queued = queued
        self.gen = torch.Generator().manual_seed(seed)
        self.rng = random.Random(seed)
        self.owner = linear_expert_owner(self.spec.num_experts, ep_size)
        self.streams = [torch.cuda.Stream() for _ in range(ep_size)]
        self.outs = [torch.empty((self.spec.max_tokens_per_rank, self.spec.hidden_size),
                                 dtype=self.spec.combine_dtype, device="cuda")
                     for _ in range(ep_size)]

    # ------------------------------------------------------------- inputs
    def _inputs(self):
        spec, gen = self.spec, self.gen
        counts = [int(torch.randint(0, spec.max_tokens_per_rank + 1, (1,), generator=gen))
                  for _ in range(spec.ep_size)]
        counts[0] = max(counts[0], 1)
        ids = [torch.stack([torch.randperm(spec.num_experts, generator=gen)[:spec.top_k]
                            for _ in range(n)]).to(torch.int32) if n else
               torch.empty((0, spec.top_k), dtype=torch.int32) for n in counts]
        xs = [torch.randn((n, spec.hidden_size), generator=gen).to(spec.dispatch_dtype)
              for n in counts]
        ws = [torch.rand((n, spec.top_k), generator=gen) for n in counts]
        return counts, xs, ids, ws

    def checked_round(self) -> bool:
        """One dispatch + combine of every rank against the reference; True if exact."""
        counts, xs, ids, ws = self._inputs()
        m = max(counts)
        cuda = [[t.cuda() for t in group] for group in (xs, ids, ws)]
        results = self.ranks.dispatch(*cuda, runtime_max_tokens=m)
        self.ranks.synchronize()
        refs = dispatch_reference(xs=xs, topk_ids=ids, topk_weights=ws,
                                  expert_owner=self.owner, runtime_max_tokens=m)
        ok = all(torch.equal(got.recv_topk_ids.cpu(), ref.recv_topk_ids)
                 and torch.equal(got.recv_x.cpu()[ref.valid], ref.recv_x[ref.valid])
                 for got, ref in zip(results, refs))
        ys = [torch.randn(tuple(a2a.combine_input().shape), generator=self.gen)
              .to(self.spec.combine_dtype) for a2a in self.ranks.ranks]
        outs = self.ranks.combine([y.cuda() for y in ys])
        self.ranks.synchronize()
        want = combine_reference(ys=ys, topk_ids=ids, expert_owner=self.owner,
                                 runtime_max_tokens=m)
        return ok and all(torch.equal(o.cpu(), w) for o, w in zip(outs, want))

    # -------------------------------------------------------------- a fault
    def _launch_survivors(self, kind: str, victim: int) -> list[int]:
        """Survivors' launches: the round the victim never joins, then the queued ones."""
        counts, xs, ids, ws = self._inputs()
        m = max(counts)
        cuda = [[t.cuda() for t in group] for group in (xs, ids, ws)]
        ranks = self.ranks.ranks
        survivors = [r for r in range(self.spec.ep_size) if r != victim]
        if kind.endswith("combine"):  # a complete dispatch first; the victim skips combine
            self.ranks.dispatch(*cuda, runtime_max_tokens=m)
            self.ranks.synchronize()
        current = torch.cuda.current_stream()
        for r in survivors:
            stream = self.streams[r]
            stream.wait_stream(current)
            with torch.cuda.stream(stream):
                out = self.outs[r][:counts[r]]
                if not kind.endswith("combine"):
                    ranks[r].dispatch(cuda[0][r], cuda[1][r], cuda[2][r], runtime_max_tokens=m)
                ranks[r].combine(out=out)
                for _ in range(self.queued):
                    ranks[r].dispatch(cuda[0][r], cuda[1][r], cuda[2][r], runtime_max_tokens=m)
                    ranks[r].combine(out=out)
        return survivors

    def _start_victim_process(self, victim: int):
        """A separate process beating ``victim``'s heartbeat; this process's watchdog
        watches it (and beats the survivors')."""
        path = _create_segment(self.spec.ep_size)
        survivors = [r for r in range(self.spec.ep_size) if r != victim]
        watchdog = PeerWatchdog(segment_path=path, num_ranks=self.spec.ep_size,
                                my_ranks=survivors, abort=self.ranks.abort,
                                interval_s=self.interval_s)
        proc = subprocess.Popen([sys.executable, "-c", _VICTIM, path, str(victim),
                                 str(self.interval_s / 10)])
        deadline = time.monotonic() + 30
        while watchdog.alive_ranks() < self.spec.ep_size:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                watchdog.stop(depart=False)
                raise RuntimeError("the victim process never started beating")
            time.sleep(0.002)
        os.unlink(path)
        return watchdog, proc

    def inject(self, kind: str) -> FaultResult:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        victim = self.rng.randrange(self.spec.ep_size)
        abort = self.ranks.abort
        proc = watchdog = None
        if kind in ("kill", "stop"):
            watchdog, proc = self._start_victim_process(victim)
        else:
            watchdog = self.ranks.start_watchdog(self.interval_s)
        survivors = self._launch_survivors(kind, victim)
        time.sleep(self.rng.uniform(0.0, 0.02))  # the waits are spinning by now
        t_fault = time.monotonic()
        if kind == "kill":
            os.kill(proc.pid, signal.SIGKILL)  # a zombie until reaped below: /proc says 'Z'
        elif kind == "stop":
            os.kill(proc.pid, signal.SIGSTOP)
        else:
            self.ranks.lose_rank(victim)
        deadline = t_fault + 3 * self.interval_s + HANG_S
        while not abort.raised and time.monotonic() < deadline:
            pass
        t_abort = time.monotonic()
        streams = [self.streams[r] for r in survivors]
        hang_at = t_abort + HANG_S
        while not all(s.query() for s in streams) and time.monotonic() < hang_at:
            pass
        t_done = time.monotonic()
        hang = not abort.raised or not all(s.query() for s in streams)
        errors_ok, error = True, ""
        for r in survivors:
            err = self.ranks.ranks[r].failure
            if not (isinstance(err, A2APeerLostError) and err.peer == victim):
                errors_ok, error = False, f"rank {r}: {type(err).__name__}: {err}"
                break
            error = error or str(err)
        if proc is not None:
            proc.kill()
            proc.wait()
        if hang:  # nothing sane to recover: report and stop
            return FaultResult(kind, victim, (t_abort - t_fault) * 1e3, float("nan"),
                               float("nan"), True, errors_ok, error, False, 0, 0)
        torch.cuda.synchronize()
        if kind in ("kill", "stop"):
            watchdog.stop(depart=False)
            abort.clear()
        else:
            self.ranks.lose_rank(victim, False)
        self.ranks.recover()
        wrong = not self.checked_round()
        return FaultResult(kind, victim, (t_abort - t_fault) * 1e3, (t_done - t_abort) * 1e3,
                           (t_done - t_fault) * 1e3, False, errors_ok, error[:300], wrong,
                           torch.cuda.memory_allocated(), _rss_bytes())

    def close(self) -> None:
        self.ranks.close()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summarize(results: list[FaultResult]) -> dict:
    """Per kind: p50/p99/max of detect, exit and total (ms), and the counts."""
    summary = {}
    for kind in KINDS:
        rows = [r for r in results if r.kind == kind]
        if not rows:
            continue
        done = [r for r in rows if not r.hang]
        entry = {"faults": len(rows), "hangs": sum(r.hang for r in rows),
                 "errors_bad": sum(not r.errors_ok for r in rows),
                 "wrong": sum(r.wrong for r in rows)}
        for metric in ("detect_ms", "exit_ms", "total_ms"):
            values = [getattr(r, metric) for r in done]
            entry[metric] = {"p50": _percentile(values, 50), "p99": _percentile(values, 99),
                             "max": max(values) if values else float("nan")}
        if len(done) >= 2:
            entry["cuda_bytes_growth"] = done[-1].cuda_bytes - done[0].cuda_bytes
            entry["rss_bytes_growth"] = done[-1].rss_bytes - done[0].rss_bytes
        summary[kind] = entry
    return summary


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["faults"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for kind in KINDS:
        detect = sorted(r["detect_ms"] for r in rows if r["kind"] == kind and not r["hang"])
        exits = sorted(r["exit_ms"] for r in rows if r["kind"] == kind and not r["hang"])
        if not detect:
            continue
        frac = [(i + 1) / len(detect) for i in range(len(detect))]
        axes[0].step(detect, frac, where="post", label=f"{kind} (n={len(detect)})")
        axes[1].step(exits, frac, where="post", label=kind)
    interval_ms = report["interval_s"] * 1e3
    axes[0].axvline(interval_ms, color="gray", linestyle=":", label="interval")
    axes[0].axvline(interval_ms - interval_ms / 10, color="gray", linestyle="--",
                    label="interval - tick (last beat before the fault)")
    axes[0].set_xlabel("fault -> abort word raised (ms)")
    axes[1].set_xlabel("abort -> every survivor stream idle (ms)")
    axes[1].axvline(50, color="red", linestyle=":", label="50 ms target")
    for ax in axes:
        ax.set_ylabel("fraction of faults")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Lost-peer detection, {report['device']}, P={report['ep_size']}, "
                 f"interval {report['interval_s']:g} s, {report['queued']} rounds queued")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faults", type=int, default=100, help="faults per kind")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--interval", type=float, default=0.25, help="watchdog interval (s)")
    parser.add_argument("--ep-size", type=int, default=4)
    parser.add_argument("--queued", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    parser.add_argument("--plot")
    args = parser.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    rig = FaultRig(ep_size=args.ep_size, interval_s=args.interval, queued=args.queued,
                   seed=args.seed)
    results: list[FaultResult] = []
    interrupted = False

    def _stop_on_term(signum, frame):  # `timeout` sends SIGTERM: keep what was measured
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop_on_term)
    try:
        if not rig.checked_round():
            raise RuntimeError("a healthy round before any fault was wrong")
        for kind in kinds:
            start = time.monotonic()
            for _ in range(args.faults):
                result = rig.inject(kind)
                results.append(result)
                if result.hang:
                    print(f"HANG in {kind}: {result}", flush=True)
                    break
            print(f"{kind}: {args.faults} faults in {time.monotonic() - start:.1f} s", flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print(f"interrupted after {len(results)} faults; writing what was measured", flush=True)
    finally:
        rig.close()
    report = {
        "device": torch.cuda.get_device_name(),
        "ep_size": args.ep_size, "interval_s": args.interval, "queued": args.queued,
        "faults_per_kind_asked": args.faults, "interrupted": interrupted,
        "command": "python benchmarks/fault_detection.py " + " ".join(argv or sys.argv[1:]),
        "torch": torch.__version__, "commit": os.environ.get("A2A_COMMIT", "unknown"),
        "timing": "host clock (time.monotonic): fault injected -> abort word seen raised "
                  "(detect), -> every survivor stream idle by Stream.query (exit)",
        "summary": summarize(results),
        "faults": [asdict(r) for r in results],
    }
    print(json.dumps(report["summary"], indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.plot:
        plot(report, args.plot)
    return report


if __name__ == "__main__":
    main()
