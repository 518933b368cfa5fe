"""Our per-call Python of one eager dispatch + combine, on a CPU machine.

A stand-in for ``host_overhead.py``'s ``python_only_us`` where no GPU is at
hand: ``OneSidedAllToAll.dispatch`` and ``.combine`` (state checks, input
checks, views, the output view) with the op calls replaced by no-ops, on CPU
tensors. An all-to-all cannot be built without CUDA (pinned, device-mapped
error record; CUDA workspace), so this one is assembled field by field from a
CPU workspace, and the tests for CUDA tensors get CPU stand-ins of the same
cost (``is_cpu`` for ``is_cuda``), so CPU tensors take the path CUDA tensors
take. Timing: wall clock (``time.perf_counter``) over ``--iters`` round trips,
median of ``--repeats``. Since it sets private fields, it breaks loudly
(AttributeError) when the hot path reads one it does not set: add it here
(``tests/test_bench_helpers.py`` runs it).

    python3 benchmarks/python_overhead_cpu.py                      # this tree
    python3 benchmarks/python_overhead_cpu.py --tree /tmp/old      # another checkout's package

``--tree`` measures another checkout's ``vllm_a2a_plugin`` with this script
(e.g. ``git worktree add /tmp/old b94a46a``; trees from before launch plans are
not supported). ``--plot PNG RESULT.json...`` draws saved results side by side,
one bar group per commit, one dot per run.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent


def build(spec, torch, stack: contextlib.ExitStack):
    """A one-rank OneSidedAllToAll over CPU buffers, launches replaced by no-ops;
    the CPU stand-ins stay in place until ``stack`` closes."""
    from vllm_a2a_plugin import all_to_all as a2a_module
    from vllm_a2a_plugin.config import A2AConfig
    from vllm_a2a_plugin.padding import linear_expert_owner, padding_ids_for_ranks
    from vllm_a2a_plugin.workspace import Workspace, WorkspaceLayout

    layout = WorkspaceLayout.for_spec(spec)
    buffer = torch.zeros(layout.total_bytes, dtype=torch.uint8, device="cpu")
    workspace = Workspace(spec, layout, [buffer.data_ptr()], {0: buffer})
    a2a = object.__new__(a2a_module.OneSidedAllToAll)
    owner = linear_expert_owner(spec.num_experts, 1).to(torch.int64)
    error_record = torch.zeros(8, dtype=torch.int32, device="cpu")
    no_launch = lambda *args: None  # noqa: E731
    fields = dict(
        workspace=workspace, spec=spec, rank=0, config=A2AConfig(check_expert_ids=False),
        _buffer=buffer, device=buffer.device, padding_ids=padding_ids_for_ranks(owner, 1),
        expert_owner_cpu=owner.to(torch.int32), _expert_owner=owner.to(torch.int32),
        _sm_count=132, _error_record=error_record, _error_record_ptr=1,
        _error_status=ctypes.c_int32.from_address(error_record.data_ptr()),
        _failure=None, _failure_raised=False, _phase="idle", _runtime_max_tokens=0,
        _topk_ids=None, _dispatch_args=None, _combine_dst=None, _combine_out=None,
        _combine_out_views={}, _views_by_m={}, _combine_input_views={},
        _dispatch_op=no_launch, _combine_op=no_launch, _dispatch_planned=no_launch,
        _combine_planned=no_launch, _use_plan=True, _plan=1, _plan_finalizer=None,
        _payload_row_bytes=list(spec.payload_row_bytes),
        _combine_row_bytes=spec.combine_row_bytes, _num_tokens=0, _launch_config=None,
        _launch_tail=(0, 0, 0))
    fields["padding_id"] = fields["padding_ids"][0]
    fields["_pad_ids"] = torch.tensor(fields["padding_ids"], dtype=torch.int32, device="cpu")
    fields["_plan_for"] = (workspace.peer_ptrs, fields["config"])
    for name, value in fields.items():
        setattr(a2a, name, value)
    if hasattr(a2a_module, "_plain_cuda_tensors"):
        tensor = torch.Tensor

        def plain_cpu_tensors(x, ids, weights, scales) -> bool:  # the same reads, CPU
            return (x.__class__ is tensor and x.is_cpu and ids.__class__ is tensor and ids.is_cpu
                    and (weights is None or (weights.__class__ is tensor and weights.is_cpu))
                    and (scales is None or (scales.__class__ is tensor and scales.is_cpu)))

        stack.enter_context(mock.patch.object(a2a_module, "_plain_cuda_tensors",
                                              plain_cpu_tensors))
        stack.enter_context(mock.patch.object(a2a_module, "_plain_cuda_tensor",
                                              lambda t: t.__class__ is tensor and t.is_cpu))
    else:  # trees with the Python fast check: the same check, is_cpu for is_cuda
        from vllm_a2a_plugin.validation import DispatchInputFastCheck

        class CpuFastCheck(DispatchInputFastCheck):
            def passes(self, x, ids, weights, scales, extras, m) -> bool:
                if extras or self._has_extras:
                    return False
                t = torch.Tensor
                if (ids.__class__ is not t or ids.dtype is not torch.int32 or not ids.is_cpu
                        or ids.get_device() != -1 or not ids.is_contiguous()):
                    return False
                shape = ids.shape
                if len(shape) != 2 or shape[1] != self._top_k:
                    return False
                n = shape[0]
                if not n <= m <= self._capacity:
                    return False
                if (x.__class__ is not t or x.dtype is not self._x_dtype
                        or x.shape != (n, self._hidden) or not x.is_cpu
                        or x.get_device() != -1 or not x.is_contiguous()):
                    return False
                if weights is not None and (
                        weights.__class__ is not t or weights.dtype is not torch.float32
                        or weights.shape != (n, self._top_k) or not weights.is_cpu
                        or weights.get_device() != -1 or not weights.is_contiguous()):
                    return False
                if self._scale_cols:
                    return (scales is not None and scales.__class__ is t
                            and scales.dtype is torch.float32
                            and scales.shape == (n, self._scale_cols) and scales.is_cpu
                            and scales.get_device() == -1 and scales.is_contiguous())
                return scales is None

        a2a._fast_check = CpuFastCheck(spec, torch.device("cpu"))
    return a2a


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tree", default=str(ROOT), help="checkout whose vllm_a2a_plugin to time")
    p.add_argument("--iters", type=int, default=20000)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", default=None, help="also write the result here")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="instead of measuring, plot the RESULT files given after the options")
    p.add_argument("results", nargs="*", help="with --plot: JSON files this script wrote")
    args = p.parse_args(argv)
    if args.plot:
        plot([json.loads(Path(f).read_text()) for f in args.results], Path(args.plot))
        return
    sys.path.insert(0, str(Path(args.tree).resolve()))
    import torch

    from vllm_a2a_plugin.workspace import AllToAllSpec

    # DeepSeek-V3's shape, fp8 dispatch with 1x128 scales, 1 token (decode).
    spec = AllToAllSpec(ep_size=1, max_tokens_per_rank=1, hidden_size=7168, top_k=8,
                        num_experts=256, dispatch_dtype=torch.float8_e4m3fn, scale_cols=56)
    with contextlib.ExitStack() as stack:
        result = measure(args, torch, spec, build(spec, torch, stack))
    print(f"our Python per round trip (CPU stand-in, no launches): "
          f"{result['python_us_per_round_trip']} us (min {result['python_us_per_round_trip_min']}); "
          f"with combine(out=...) {result['python_us_out_given']} us")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


def measure(args, torch, spec, a2a) -> dict:
    x = torch.zeros((1, 7168), dtype=torch.float8_e4m3fn, device="cpu")
    scales = torch.zeros((1, 56), dtype=torch.float32, device="cpu")
    ids = torch.zeros((1, 8), dtype=torch.int32, device="cpu")
    weights = torch.zeros((1, 8), dtype=torch.float32, device="cpu")
    out = torch.empty((1, 7168), dtype=spec.combine_dtype, device="cpu")

    def timed(combine_kwargs: dict) -> list[float]:
        per_round_trip = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            for _ in range(args.iters):
                a2a.dispatch(x, ids, weights, x_scales=scales, runtime_max_tokens=1)
                a2a.combine(**combine_kwargs)
            per_round_trip.append((time.perf_counter() - start) / args.iters * 1e6)
        return per_round_trip

    timed({})  # warm-up
    ours, given = timed({}), timed({"out": out})
    median = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    result = {"tree": str(Path(args.tree).resolve()), "commit": _commit(Path(args.tree)),
              "cpu": _cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
              "method": "wall clock, median of repeats", "iters": args.iters,
              "python_us_per_round_trip": round(median(ours), 2),
              "python_us_per_round_trip_min": round(min(ours), 2),
              "python_us_out_given": round(median(given), 2)}
    return result


def _commit(tree: Path) -> str:
    """The tree's commit, with "+changes" when what is measured (the package, csrc)
    has uncommitted changes."""
    def git(*cmd: str) -> str:
        proc = subprocess.run(["git", "-C", str(tree), *cmd], capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--untracked-files=no", "--", "vllm_a2a_plugin", "csrc")
    return commit + ("+changes" if changed else "")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def plot(results: list[dict], png: Path) -> None:
    """Runs grouped by commit (in the order first seen): median bar, one dot per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trees = list(dict.fromkeys(r["commit"] for r in results))
    keys = (("python_us_per_round_trip", "combine()"), ("python_us_out_given", "combine(out=...)"))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.38
    for k, (key, label) in enumerate(keys):
        for i, tree in enumerate(trees):
            values = sorted(r[key] for r in results if r["commit"] == tree)
            x = i + (k - 0.5) * width
            ax.bar(x, values[len(values) // 2], width, color=f"C{k}",
                   label=label if i == 0 else None)
            ax.plot([x] * len(values), values, "k.", markersize=4)
    ax.set_xticks(range(len(trees)), trees)
    ax.set_ylabel("us per round trip (wall clock)")
    first = results[0]
    ax.set_title(f"Our Python per eager dispatch + combine, no launches\n"
                 f"CPU stand-in, {first['cpu']} ({first['cores']} cores), torch {first['torch']}",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


if __name__ == "__main__":
    main()
