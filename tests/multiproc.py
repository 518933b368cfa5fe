"""One reusable multi-rank harness (pplx-kernels' distributed_utils pattern):
spawned processes, a free port, gloo on CPU, ``[rankN]`` log prefixes, cleanup
in ``finally``, and every failure re-raised in the parent with its traceback.

Under a launcher (``mpirun -np N python -m pytest ...`` or ``torchrun
--nproc-per-node N -m pytest ...``) every rank already is a process running the
same tests in the same order, so :func:`run_ranks` runs ``fn`` in this process
as the launcher's rank instead of spawning, with the store address agreed over
MPI (:mod:`vllm_a2a_plugin.testing.launcher`)."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable

import torch.multiprocessing as mp

from vllm_a2a_plugin.testing import launcher
from vllm_a2a_plugin.testing.serve import free_port


class _Prefixed:
    def __init__(self, stream, prefix: str):
        self.stream, self.prefix, self.at_line_start = stream, prefix, True

    def write(self, text: str) -> int:
        out = []
        for chunk in text.splitlines(keepends=True):
            if self.at_line_start:
                out.append(self.prefix)
            out.append(chunk)
            self.at_line_start = chunk.endswith("\n")
        self.stream.write("".join(out))
        return len(text)

    def flush(self):
        self.stream.flush()


def _entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple, errors) -> None:
    sys.stdout = _Prefixed(sys.stdout, f"[rank{rank}] ")
    sys.stderr = _Prefixed(sys.stderr, f"[rank{rank}] ")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK="0")
    try:
        fn(rank, world_size, port, *args)
    except BaseException:  # noqa: BLE001 - reported to the parent
        errors.put((rank, traceback.format_exc()))
        raise
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _run_launched(launch: launcher.Launch, fn: Callable, world_size: int, args: tuple) -> None:
    """This process is rank ``launch.rank`` of a launched job: run its share."""
    import torch.distributed as dist

    if launch.world_size != world_size:
        raise AssertionError(f"this test needs {world_size} ranks; the {launch.launcher} "
                             f"launch has {launch.world_size}")
    # A fresh store address per test: consecutive process groups never meet a
    # store that is still closing.
    launcher.export_env(launch, fresh=True)
    try:
        fn(launch.rank, world_size, int(os.environ["MASTER_PORT"]), *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable, world_size: int, *args, timeout_s: float = 300) -> None:
    """Run ``fn(rank, world_size, port, *args)`` in ``world_size`` processes.

    Under mpirun / torchrun, ``fn`` runs here as this process's rank (see the
    module docstring); ``timeout_s`` then is the launcher's business.
    """
    launch = launcher.detect()
    if launch is not None:
        _run_launched(launch, fn, world_size, args)
        return
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, errors))
             for r in range(world_size)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout_s)
        hung = [i for i, p in enumerate(procs) if p.is_alive()]
        failures = []
        while not errors.empty():
            failures.append(errors.get())
        if failures:
            report = "\n".join(f"--- rank {rank} failed:\n{tb}" for rank, tb in sorted(failures))
            raise AssertionError(report)
        if hung:
            raise AssertionError(f"ranks {hung} did not finish within {timeout_s} s")
        bad = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode != 0]
        if bad:
            raise AssertionError(f"ranks exited with codes {bad}")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
