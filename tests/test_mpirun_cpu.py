"""Ranks started by ``mpirun`` (MPICH from the ``mpi`` extra) over gloo: the
launcher's environment gives rank and world, the store address is agreed over
MPI, and the multi-rank tests run each rank's share in the launched processes.

Skips where no ``mpirun`` is found, unless ``A2A_REQUIRE_MPIRUN=1`` (CI sets it
for the environments whose install brings MPICH): then a missing one fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 300


def _mpirun() -> str | None:
    beside = Path(sys.executable).parent / "mpirun"
    return str(beside) if beside.is_file() else shutil.which("mpirun")


def _require_mpirun() -> str:
    found = _mpirun()
    if found is None:
        if os.environ.get("A2A_REQUIRE_MPIRUN", "") not in ("", "0"):
            pytest.fail("A2A_REQUIRE_MPIRUN=1 but no mpirun beside this Python or on PATH "
                        "(install the mpi extra: pip install -e '.[mpi]')")
        pytest.skip("no mpirun beside this Python or on PATH (pip install -e '.[mpi]')")
    return found


def _mpi_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    # Open MPI refuses root without these (CI runs as root); MPICH ignores them.
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    return env


_WORKER = """
import json, torch, torch.distributed as dist
from vllm_a2a_plugin.testing import launcher
launch = launcher.detect()
launcher.init_process_group("gloo", launch)
ranks = [None] * dist.get_world_size()
dist.all_gather_object(ranks, (dist.get_rank(), launch.local_rank))
total = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(total)
import sys, pathlib
pathlib.Path(sys.argv[1], f"rank{dist.get_rank()}.json").write_text(json.dumps(
    {"launcher": launch.launcher, "rank": dist.get_rank(), "world": dist.get_world_size(),
     "ranks": ranks, "sum": total.item()}))
dist.destroy_process_group()
"""


def test_two_ranks_under_mpirun_form_a_gloo_group(tmp_path):
    mpirun = _require_mpirun()
    # Each rank writes its own file: mpirun forwards the ranks' stdout as one
    # stream, where two ranks' lines can run together.
    done = subprocess.run([mpirun, "-np", "2", sys.executable, "-c", _WORKER, str(tmp_path)],
                          cwd=ROOT, env=_mpi_env(), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    results = sorted((json.loads(f.read_text()) for f in tmp_path.glob("rank*.json")),
                     key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:
        assert r["launcher"] == "mpi" and r["world"] == 2
        assert r["ranks"] == [[0, 0], [1, 1]]
        assert r["sum"] == 3.0


def test_multirank_tests_run_their_ranks_in_the_mpirun_processes():
    """tests/test_pool_cpu.py's 2-rank test, each mpirun rank running its share."""
    mpirun = _require_mpirun()
    test = "tests/test_pool_cpu.py::test_pool_on_cpu_serves_the_reference"
    done = subprocess.run([mpirun, "-np", "2", sys.executable, "-m", "pytest", "-q",
                           "-p", "no:cacheprovider", test], cwd=ROOT, env=_mpi_env(),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert done.stdout.count("1 passed") == 2, done.stdout[-3000:]


def test_launch_detection_reads_each_launchers_variables():
    from vllm_a2a_plugin.testing.launcher import Launch, detect

    assert detect({}) is None
    assert detect({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == \
        Launch("torchrun", 1, 4, 1)
    assert detect({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "8",
                   "OMPI_COMM_WORLD_LOCAL_RANK": "3"}) == Launch("mpi", 3, 8, 3)
    assert detect({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0"}) == \
        Launch("mpi", 2, 4, 0)
    # After export_env() an MPI rank also carries torchrun's variables: MPI wins.
    assert detect({"PMI_RANK": "1", "PMI_SIZE": "2", "RANK": "1", "WORLD_SIZE": "2"}) == \
        Launch("mpi", 1, 2, 1)
