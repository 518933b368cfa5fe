"""Start a process group under torchrun or mpirun alike (benchmarks, multi-rank tests).

``torchrun`` sets ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` and the store's
``MASTER_ADDR`` / ``MASTER_PORT``. ``mpirun`` sets only its own variables:
Open MPI ``OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK}``, MPICH / Intel MPI (Hydra)
``PMI_RANK`` / ``PMI_SIZE`` / ``MPI_LOCALRANKID``; the store address is then
chosen by rank 0 and sent to every rank over MPI (mpi4py, the ``mpi`` extra),
or taken from ``MASTER_ADDR`` / ``MASTER_PORT`` when the user set both.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

_MPI_VARS = (  # (rank, size, local rank) per MPI family
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    ("PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK"),
)


@dataclass(frozen=True)
class Launch:
    """Where this process sits in a launched job.

    Attributes:
        launcher: ``"torchrun"`` or ``"mpi"``.
        rank, world_size, local_rank: from the launcher's environment.
    """

    launcher: str
    rank: int
    world_size: int
    local_rank: int


def detect(environ: dict | None = None) -> Launch | None:
    """The launch this process belongs to, or None when started on its own."""
    env = os.environ if environ is None else environ
    # MPI first: export_env() sets torchrun's variables in MPI ranks too.
    for rank_var, size_var, local_var in _MPI_VARS:
        if rank_var in env and size_var in env:
            local = env.get(local_var)
            return Launch("mpi", int(env[rank_var]), int(env[size_var]),
                          int(local) if local is not None else int(env[rank_var]))
    if "RANK" in env and "WORLD_SIZE" in env:
        return Launch("torchrun", int(env["RANK"]), int(env["WORLD_SIZE"]),
                      int(env.get("LOCAL_RANK", "0")))
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def store_address(launch: Launch, *, fresh: bool = False) -> tuple[str, int]:
    """``(MASTER_ADDR, MASTER_PORT)`` every rank of ``launch`` agrees on.

    torchrun: its own. MPI: rank 0 picks a free port (a new one each call when
    ``fresh``, so consecutive process groups never meet a closing store) and
    broadcasts it with its address (127.0.0.1 when every rank runs on its
    host). Without mpi4py, ``MASTER_ADDR`` and ``MASTER_PORT`` must be set.
    """
    env = os.environ
    if launch.launcher == "torchrun" or (not fresh and "MASTER_ADDR" in env
                                         and "MASTER_PORT" in env):
        if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
            raise RuntimeError(f"{launch.launcher} launch without MASTER_ADDR/MASTER_PORT")
        return env["MASTER_ADDR"], int(env["MASTER_PORT"])
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise RuntimeError(
            "started by mpirun, but mpi4py is not importable to agree on the store address "
            f"({exc}): pip install 'vllm-a2a-plugin[mpi]' (mpi4py + mpich), or set "
            "MASTER_ADDR and MASTER_PORT for every rank") from None
    comm = MPI.COMM_WORLD
    if comm.Get_size() != launch.world_size:
        raise RuntimeError(f"MPI says {comm.Get_size()} ranks, the environment "
                           f"{launch.world_size}")
    hosts = comm.allgather(socket.gethostname())
    if comm.Get_rank() == 0:
        host = "127.0.0.1" if len(set(hosts)) == 1 else socket.gethostbyname(hosts[0])
        chosen = (host, _free_port())
    else:
        chosen = None
    return comm.bcast(chosen, root=0)


def export_env(launch: Launch, *, fresh: bool = False) -> None:
    """Set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``
    so ``init_process_group(init_method="env://")`` works the same as under
    torchrun (collective over MPI ranks when they must agree on an address)."""
    addr, port = store_address(launch, fresh=fresh)
    os.environ.update(RANK=str(launch.rank), WORLD_SIZE=str(launch.world_size),
                      LOCAL_RANK=str(launch.local_rank), MASTER_ADDR=addr,
                      MASTER_PORT=str(port))


def init_process_group(backend: str, launch: Launch, **kwargs) -> None:
    """``torch.distributed.init_process_group`` for a torchrun or mpirun launch."""
    import torch.distributed as dist

    export_env(launch)
    dist.init_process_group(backend, rank=launch.rank, world_size=launch.world_size, **kwargs)
