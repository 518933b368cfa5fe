"""``vllm-a2a`` (also ``python -m vllm_a2a_plugin``): is this machine ready, and
how much memory will the workspaces take?

* ``vllm-a2a doctor [--json]``: torch / CUDA / driver, whether the CUDA kernels
  are built (or why not, and the fix), visible GPUs and their peer access and
  NVLink links, real probes of torch symmetric memory and CUDA IPC (each in a
  child process with a time limit), the workspace path the pool would take,
  and the installed vLLM / SGLang / flashinfer with whether each is supported.
  Exit code 0 only when ready; every reason it is not is printed.
* ``vllm-a2a size --model <config.json | model dir> --ep N --max-tokens T
  [--dtype bf16|fp8] [--micro-batches 1|2] [--json]``: workspace bytes per
  rank and in total per distinct MoE shape, beside flashinfer's and DeepEP's
  buffers for the same configuration (:mod:`vllm_a2a_plugin.sizing`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field

PROBE_TIMEOUT_S = 180.0
# Compute capabilities the default build targets (VLLM_A2A_CUDA_ARCHS=90a;100a).
SUPPORTED_CAPABILITIES = {(9, 0): "Hopper (sm_90a)", (10, 0): "Blackwell (sm_100a)"}


@dataclass
class Report:
    """What ``doctor`` found: one entry per check, and every not-ready reason."""

    checks: dict = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return not self.reasons

    def as_dict(self) -> dict:
        return {"ready": self.ready, "reasons": self.reasons, "notes": self.notes,
                "checks": self.checks}


def _run(cmd: list[str], timeout: float = 20.0) -> tuple[int, str]:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return -1, f"{type(exc).__name__}: {exc}"
    return done.returncode, (done.stdout + done.stderr).strip()


def _check_torch(report: Report) -> bool:
    """torch, its CUDA and the driver; True when a CUDA GPU is usable."""
    import torch

    info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "driver": None}
    if shutil.which("nvidia-smi"):
        rc, out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        info["driver"] = out.splitlines()[0].strip() if rc == 0 and out else None
    report.checks["torch"] = info
    if torch.version.cuda is None:
        report.reasons.append(
            f"torch {torch.__version__} is a CPU build: the kernels need a CUDA build of torch "
            "(install the plugin with `bash scripts/install.sh`, which installs vLLM's CUDA torch)")
        return False
    if not torch.cuda.is_available():
        report.reasons.append(
            "no CUDA GPU is visible to torch (check CUDA_VISIBLE_DEVICES, the driver"
            f"{' ' + info['driver'] if info['driver'] else ''} and the container's GPU access)")
        return False
    return True


def _check_kernels(report: Report, gpu: bool) -> bool:
    """Whether this process can run our CUDA kernels, or why not and the fix."""
    import torch

    from vllm_a2a_plugin import ops

    info: dict = {}
    try:
        info["build_decision"] = ops.kernel_build_decision().reason
    except Exception as exc:  # noqa: BLE001 - e.g. VLLM_A2A_BUILD_KERNELS=yes with no toolkit
        info["build_decision"] = f"{type(exc).__name__}: {exc}"
    try:
        info["status"] = ops.kernel_status()
        info["built_with_cuda"] = bool(torch.ops.a2a_one_sided.built_with_cuda())
    except Exception as exc:  # noqa: BLE001 - reported as the reason
        info["status"] = f"{type(exc).__name__}: {exc}"
        info["built_with_cuda"] = False
    info["usable"] = bool(gpu and info["built_with_cuda"])
    report.checks["kernels"] = info
    if info["usable"]:
        return True
    if info["built_with_cuda"]:
        why = "they are built, but no CUDA GPU is visible"
    else:
        why = info["status"]
    fix = ("on a GPU machine with a complete CUDA toolkit (CUDA_HOME), reinstall "
           "(`pip install --no-build-isolation -e .`) or let the first use JIT-build them; "
           "VLLM_A2A_BUILD_KERNELS=yes builds them without a GPU")
    report.reasons.append(f"CUDA kernels not usable here: {why}. Fix: {fix}")
    return False


def _check_gpus(report: Report) -> list[dict]:
    import torch

    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        cap = (props.major, props.minor)
        gpus.append({"index": i, "name": props.name, "capability": f"{cap[0]}.{cap[1]}",
                     "memory_gib": round(props.total_memory / 2**30, 1),
                     "supported_arch": SUPPORTED_CAPABILITIES.get(cap)})
        if cap not in SUPPORTED_CAPABILITIES:
            report.reasons.append(
                f"GPU {i} ({props.name}) has compute capability {cap[0]}.{cap[1]}; the kernels "
                "are built for sm_90a (H100/H200) and sm_100a (B200): other GPUs are untested "
                "(VLLM_A2A_CUDA_ARCHS selects the build's architectures)")
    peers = {}
    for a in range(len(gpus)):
        for b in range(len(gpus)):
            if a != b:
                peers[f"{a}->{b}"] = bool(torch.cuda.can_device_access_peer(a, b))
    blocked = [pair for pair, ok in peers.items() if not ok]
    if blocked:
        report.reasons.append(
            f"GPU pairs without peer access: {', '.join(blocked)}; every EP rank writes into "
            "its peers' memory, so EP ranks must be GPUs with peer access (one NVLink domain)")
    topo = None
    if shutil.which("nvidia-smi") and len(gpus) > 1:
        rc, out = _run(["nvidia-smi", "topo", "-m"])
        topo = out if rc == 0 else None
    nvlink = _nvlink_pairs(topo) if topo else None
    if nvlink is not None and len(gpus) > 1:
        missing = [p for p in peers if p not in nvlink]
        if missing:
            report.notes.append(
                f"GPU pairs not linked by NVLink (nvidia-smi topo -m): {', '.join(missing)}; "
                "peer writes then cross PCIe, which works but is much slower")
    if len(gpus) == 1:
        report.notes.append(
            "one GPU: several EP ranks can share it (CUDA IPC workspaces; the tests and the "
            "engine check do this), but no traffic crosses NVLink")
    report.checks["gpus"] = {"devices": gpus, "peer_access": peers, "nvlink_pairs": nvlink,
                             "topology": topo}
    return gpus


def _nvlink_pairs(topo: str) -> list[str]:
    """``"a->b"`` for every GPU pair whose ``nvidia-smi topo -m`` cell is NV<n>."""
    lines = [line.split() for line in topo.splitlines() if line.strip()]
    if not lines:
        return []
    header = [h for h in lines[0] if h.startswith("GPU")]
    pairs = []
    for row in lines[1:]:
        if not row or not row[0].startswith("GPU") or row[0] not in header:
            continue
        a = header.index(row[0])
        for b, cell in enumerate(row[1:1 + len(header)]):
            if a != b and cell.startswith("NV"):
                pairs.append(f"{a}->{b}")
    return pairs


# Each probe runs in a child process: a failing rendezvous or a broken driver
# must not take the doctor down, and a hang ends at the time limit.
_SYMMETRIC_PROBE = textwrap.dedent("""
    import json, os, tempfile, torch, torch.distributed as dist
    import torch.distributed._symmetric_memory as symm_mem
    torch.cuda.set_device(0)
    store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    buf = symm_mem.empty(4096, dtype=torch.uint8, device="cuda:0")
    handle = symm_mem.rendezvous(buf, dist.group.WORLD)
    buf.fill_(7)
    torch.cuda.synchronize()
    ptrs = [int(p) for p in handle.buffer_ptrs]
    ok = ptrs[0] == buf.data_ptr() and int(buf.sum()) == 7 * 4096
    dist.destroy_process_group()
    print(json.dumps({"ok": ok, "detail": f"1-rank rendezvous, {len(ptrs)} peer pointer(s)"}))
""")

_IPC_PROBE = textwrap.dedent("""
    import json, torch, torch.multiprocessing as mp

    def child(q_in, q_out):
        t = q_in.get()                    # opened here through its CUDA IPC handle
        q_out.put(int(t.sum()))
        t.fill_(3)                        # written back through the mapping
        torch.cuda.synchronize()
        q_out.put("written")

    if __name__ == "__main__":
        ctx = mp.get_context("spawn")
        q_in, q_out = ctx.Queue(), ctx.Queue()
        t = torch.full((1024,), 5, dtype=torch.int32, device="cuda:0")
        torch.cuda.synchronize()
        p = ctx.Process(target=child, args=(q_in, q_out))
        p.start()
        q_in.put(t)
        seen = q_out.get(timeout=120)
        q_out.get(timeout=120)
        torch.cuda.synchronize()
        ok = seen == 5 * 1024 and int(t.sum()) == 3 * 1024
        p.join(60)
        print(json.dumps({"ok": ok and p.exitcode == 0,
                          "detail": f"child read {seen}, parent reads {int(t.sum())} after "
                                    f"the child's write, child exit {p.exitcode}"}))
""")


def _probe(name: str, code: str, timeout: float = PROBE_TIMEOUT_S) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, f"{name}_probe.py")
        with open(script, "w") as f:
            f.write(code)
        # Our kernels use no NVLink multicast, so the probe must not depend on it
        # (and some hosts must keep it off).
        env = {**os.environ, "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NCCL_NVLS_ENABLE": "0"}
        try:
            done = subprocess.run([sys.executable, script], capture_output=True, text=True,
                                  timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"ok": False, "detail": f"no answer within {timeout:.0f} s"}
    last = done.stdout.strip().splitlines()[-1:] if done.stdout.strip() else []
    try:
        result = json.loads(last[0]) if last else None
    except json.JSONDecodeError:
        result = None
    if done.returncode != 0 or result is None:
        err = [line for line in done.stderr.strip().splitlines() if line.strip()]
        return {"ok": False, "detail": f"exit {done.returncode}: "
                                       f"{err[-1] if err else 'no output'}"}
    return result


def _check_workspace_paths(report: Report, gpu: bool) -> None:
    from vllm_a2a_plugin import envs

    try:
        forced = envs.workspace_allocation()
    except ValueError as exc:
        report.reasons.append(str(exc))
        forced = "auto"
    if not gpu:
        report.checks["workspace"] = {
            "forced": forced, "symmetric_memory": None, "cuda_ipc": None, "path": None,
            "why": "not probed: no CUDA GPU"}
        return
    symmetric = _probe("symmetric", _SYMMETRIC_PROBE)
    ipc = _probe("cuda_ipc", _IPC_PROBE)
    # The pool's choice (pool.AllToAllPool._choose_allocation): a forced path is
    # used as is; else symmetric memory when every EP rank has its own GPU,
    # CUDA IPC when ranks share one or symmetric memory fails to rendezvous.
    if forced != "auto":
        path = forced
        why = f"VLLM_A2A_WORKSPACE={forced}"
        works = symmetric["ok"] if forced == "symmetric" else ipc["ok"]
        if not works:
            report.reasons.append(f"VLLM_A2A_WORKSPACE={forced}, but that path fails here "
                                  f"({(symmetric if forced == 'symmetric' else ipc)['detail']})")
    elif symmetric["ok"]:
        path = "symmetric"
        why = ("symmetric memory with one EP rank per GPU; CUDA IPC when ranks share a GPU"
               if ipc["ok"] else "symmetric memory (CUDA IPC fails here: ranks must not "
                                 "share a GPU)")
    elif ipc["ok"]:
        path = "cuda_ipc"
        why = "symmetric memory fails here, so the pool falls back to CUDA IPC"
    else:
        path = None
        why = "neither torch symmetric memory nor CUDA IPC works here"
        report.reasons.append(
            f"no way to share workspaces between processes: symmetric memory "
            f"({symmetric['detail']}) and CUDA IPC ({ipc['detail']}) both fail (containers "
            "need the rights to share GPU memory between processes, e.g. --ipc=host)")
    report.checks["workspace"] = {"forced": forced, "symmetric_memory": symmetric,
                                  "cuda_ipc": ipc, "path": path, "why": why}


def _installed_version(dist_name: str, module: str | None = None) -> str | None:
    """The installed version: package metadata, else (a package on PYTHONPATH
    without metadata, e.g. an unpacked bundle) the module's ``__version__``,
    read in a child process (importing an engine takes seconds and state)."""
    import importlib.util
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist_name)
    except PackageNotFoundError:
        pass
    if module is None or importlib.util.find_spec(module) is None:
        return None
    rc, out = _run([sys.executable, "-c", f"import {module}; print({module}.__version__)"],
                   timeout=PROBE_TIMEOUT_S)
    lines = out.splitlines()
    return lines[-1].strip() if rc == 0 and lines else None


def _check_engines(report: Report) -> None:
    from vllm_a2a_plugin.sglang.hooks import SUPPORTED_SGLANG_VERSIONS
    from vllm_a2a_plugin.vllm.compat import TESTED_VLLM, vllm_series

    vllm_v = _installed_version("vllm", "vllm")
    sglang_v = _installed_version("sglang", "sglang")
    flashinfer_v = _installed_version("flashinfer-python", "flashinfer")
    engines = {
        "vllm": {"version": vllm_v, "supported": vllm_v is not None
                 and vllm_series(vllm_v) in TESTED_VLLM,
                 "supported_versions": [f"{s}.x (tested {v})" for s, v in TESTED_VLLM.items()]},
        "sglang": {"version": sglang_v, "supported": sglang_v is not None
                   and sglang_v.split("+")[0] in SUPPORTED_SGLANG_VERSIONS,
                   "supported_versions": list(SUPPORTED_SGLANG_VERSIONS)},
        "flashinfer": {"version": flashinfer_v, "wanted_by_vllm": _flashinfer_pin()},
    }
    report.checks["engines"] = engines
    for name in ("vllm", "sglang"):
        e = engines[name]
        if e["version"] is not None and not e["supported"]:
            report.reasons.append(
                f"{name} {e['version']} is installed but not supported (supported: "
                f"{', '.join(e['supported_versions'])})")
    if vllm_v is None and sglang_v is None:
        report.reasons.append(
            "neither vLLM nor SGLang is installed: install vllm==0.33.0 (`bash "
            "scripts/install.sh`) or sglang==0.5.23 (`bash scripts/install_sglang.sh`)")
    fi = engines["flashinfer"]
    if vllm_v and fi["wanted_by_vllm"] and fi["version"] != fi["wanted_by_vllm"]:
        report.notes.append(
            f"flashinfer {fi['version']} installed, vLLM {vllm_v} pins {fi['wanted_by_vllm']} "
            "(only vLLM's own flashinfer backends use it; ours does not)")


def _flashinfer_pin() -> str | None:
    from importlib.metadata import PackageNotFoundError, requires

    try:
        for req in requires("vllm") or []:
            head = req.split(";")[0].replace(" ", "")
            if head.startswith("flashinfer-python=="):
                return head.split("==", 1)[1]
    except PackageNotFoundError:
        return None
    return None


def doctor(*, probes: bool = True) -> Report:
    """Every check; ``probes=False`` skips the child-process probes."""
    report = Report()
    gpu = _check_torch(report)
    _check_kernels(report, gpu)
    if gpu:
        _check_gpus(report)
    _check_workspace_paths(report, gpu and probes)
    _check_engines(report)
    return report


def _print_doctor(report: Report) -> None:
    c = report.checks
    t = c["torch"]
    print(f"torch {t['torch']}, CUDA {t['torch_cuda'] or 'none (CPU build)'}, driver "
          f"{t['driver'] or 'not found'}, GPU visible: {t['cuda_available']}")
    k = c["kernels"]
    print(f"kernels: {'usable' if k['usable'] else 'NOT usable'}: {k['status']}")
    for g in c.get("gpus", {}).get("devices", []):
        print(f"GPU {g['index']}: {g['name']}, sm {g['capability']}, {g['memory_gib']} GiB"
              f"{'' if g['supported_arch'] else ' (untested architecture)'}")
    peers = c.get("gpus", {}).get("peer_access")
    if peers:
        print(f"peer access: {sum(peers.values())}/{len(peers)} pairs; NVLink pairs: "
              f"{c['gpus']['nvlink_pairs']}")
    w = c["workspace"]
    for name in ("symmetric_memory", "cuda_ipc"):
        if w[name] is not None:
            print(f"{name}: {'works' if w[name]['ok'] else 'FAILS'} ({w[name]['detail']})")
    print(f"workspace path: {w['path'] or 'none'} ({w['why']})")
    for name, e in c["engines"].items():
        extra = (f", supported: {e['supported']}" if "supported" in e
                 else f", vLLM pins {e['wanted_by_vllm']}")
        print(f"{name}: {e['version'] or 'not installed'}{extra}")
    for note in report.notes:
        print(f"note: {note}")
    if report.ready:
        print("READY")
    else:
        print(f"NOT READY ({len(report.reasons)} reason{'s' if len(report.reasons) > 1 else ''}):")
        for reason in report.reasons:
            print(f"  - {reason}")


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB"


def _size(args) -> int:
    from vllm_a2a_plugin import sizing

    shapes = sizing.moe_shapes(sizing.load_config(args.model))
    sizes = sizing.size_report(shapes, ep_size=args.ep, max_tokens=args.max_tokens,
                               dtype=args.dtype, micro_batches=args.micro_batches)
    if args.json:
        print(json.dumps({"ep_size": args.ep, "max_tokens": args.max_tokens,
                          "dtype": args.dtype, "micro_batches": args.micro_batches,
                          "shapes": sizing.report_as_dict(sizes)}, indent=1))
        return 0
    print(f"EP {args.ep}, max tokens per rank {args.max_tokens} (vLLM: "
          f"--max-num-batched-tokens), dispatch {args.dtype}, {args.micro_batches} "
          "micro-batch(es); one workspace per distinct MoE shape, shared by its layers")
    head = ("hidden", "experts", "top_k", "MoE layers", "ours/rank", "ours total",
            "flashinfer/rank", "DeepEP LL/rank", "DeepEP NVL/rank")
    rows = [head]
    for s in sizes:
        rows.append((str(s.shape.hidden_size), str(s.shape.num_experts), str(s.shape.top_k),
                     str(s.shape.num_moe_layers or "?"), _fmt_bytes(s.ours_per_rank),
                     _fmt_bytes(s.ours_total), _fmt_bytes(s.flashinfer_per_rank),
                     _fmt_bytes(s.deepep_low_latency_per_rank),
                     _fmt_bytes(s.deepep_normal_nvl_per_rank)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for r in rows:
        print("  ".join(cell.rjust(w) for cell, w in zip(r, widths)))
    print(textwrap.fill(
        "ours: the C++ workspace layout (header + P*T slots of top-k ids and weights, "
        "dispatch rows and combine rows), x2 with --micro-batches 2. flashinfer: "
        "moe_a2a_get_workspace_size_per_rank (flashinfer 0.7.2) for the same payloads, one "
        "micro-batch. DeepEP LL: Buffer.get_low_latency_rdma_size_hint with T tokens per "
        "rank (vLLM sizes it with its DP chunk, VLLM_MOE_DP_CHUNK_SIZE, not T). DeepEP NVL: "
        "Config.get_nvl_buffer_size_hint with its default 20 SMs (ring buffers, independent "
        "of T; vLLM's DeepEP managers allocate VLLM_DEEPEP_BUFFER_SIZE_MB, 1 GiB, instead).",
        100))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-a2a", description="vllm-a2a-plugin: readiness check and memory sizing")
    sub = parser.add_subparsers(dest="command", required=True)
    doc = sub.add_parser("doctor", help="is this machine ready to run the kernels?")
    doc.add_argument("--json", action="store_true", help="print one JSON object")
    doc.add_argument("--no-probes", action="store_true",
                     help="skip the symmetric-memory and CUDA IPC probes (child processes)")
    size = sub.add_parser("size", help="workspace memory for a model, beside flashinfer/DeepEP")
    size.add_argument("--model", required=True, help="config.json or a folder holding one")
    size.add_argument("--ep", type=int, required=True, help="expert-parallel ranks")
    size.add_argument("--max-tokens", type=int, required=True,
                      help="most tokens one rank sends per step (vLLM: max_num_batched_tokens)")
    size.add_argument("--dtype", choices=("bf16", "fp8"), default="bf16",
                      help="dispatch dtype: bf16, or fp8 with 1x128 block scales")
    size.add_argument("--micro-batches", type=int, choices=(1, 2), default=1,
                      help="2 with vLLM --enable-dbo / SGLang --enable-two-batch-overlap")
    size.add_argument("--json", action="store_true", help="print JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "doctor":
        report = doctor(probes=not args.no_probes)
        if args.json:
            print(json.dumps(report.as_dict(), indent=1))
        else:
            _print_doctor(report)
        return 0 if report.ready else 1
    try:
        return _size(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"vllm-a2a size: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
