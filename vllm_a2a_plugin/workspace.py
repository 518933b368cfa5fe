"""Size, layout and allocation of the per-rank, peer-visible workspaces.

Size first: :class:`AllToAllSpec` says what one step may carry; the C++ layout
(``csrc/workspace_layout.h``, read through ``ops.workspace_layout``) turns it
into offsets; :class:`Workspace` allocates one buffer per rank and the table of
peer addresses the kernels write through.

Three allocations, same layout (design §8):
  * :meth:`Workspace.allocate_local`: all ``ep_size`` ranks live in this process
    on one GPU (tests, benchmarks on one GPU);
  * :meth:`Workspace.allocate_symmetric`: one rank per process, buffers from
    torch symmetric memory so peers map each other's workspaces;
  * :meth:`Workspace.allocate_cuda_ipc`: one rank per process, each buffer an
    ordinary CUDA allocation whose IPC handle torch exports (its own CUDA
    tensor sharing) and every peer opens. It works where symmetric memory does
    not: several ranks on one GPU (symmetric memory refuses overlapping
    devices) and containers that lack the rights symmetric memory needs to
    exchange handles.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm_a2a_plugin import ops
from vllm_a2a_plugin.errors import A2AInputError

DISPATCH_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn)
COMBINE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_LIMITS = {"max_ranks": 64, "max_payloads": 8, "max_top_k": 16, "max_experts": 4096}


def kernel_limits() -> dict[str, int]:
    """Limits compiled into the kernels (checked against C++ in the tests)."""
    return dict(_LIMITS)


@dataclass(frozen=True)
class AllToAllSpec:
    """What one dispatch/combine step may carry; sizes the workspace.

    Attributes:
        ep_size: number of EP ranks ``P`` (1..64).
        max_tokens_per_rank: capacity ``M``: most tokens any rank sends per step.
        hidden_size: elements per token of the hidden states ``H``.
        top_k: experts per token ``K`` (1..16).
        num_experts: global (physical) experts ``E``.
        dispatch_dtype: dtype of the dispatched hidden states.
        scale_cols: float32 scales per token sent beside the hidden states
            (e.g. ``H // 128`` for 1x128 block-quantised fp8), 0 for none.
        extra_payload_row_bytes: bytes per token of further payloads.
        combine_dtype: dtype of the experts' output and of combine's result.
    """

    ep_size: int
    max_tokens_per_rank: int
    hidden_size: int
    top_k: int
    num_experts: int
    dispatch_dtype: torch.dtype = torch.bfloat16
    scale_cols: int = 0
    extra_payload_row_bytes: tuple[int, ...] = ()
    combine_dtype: torch.dtype = torch.bfloat16

    def __post_init__(self) -> None:
        lim = _LIMITS
        if not 1 <= self.ep_size <= lim["max_ranks"]:
            raise A2AInputError(f"ep_size ({self.ep_size}) must be in [1, {lim['max_ranks']}]")
        if self.max_tokens_per_rank < 0:
            raise A2AInputError(
                f"max_tokens_per_rank ({self.max_tokens_per_rank}) must be >= 0"
            )
        if not 1 <= self.top_k <= lim["max_top_k"]:
            raise A2AInputError(f"top_k ({self.top_k}) must be in [1, {lim['max_top_k']}]")
        if not 1 <= self.num_experts <= lim["max_experts"]:
            raise A2AInputError(
                f"num_experts ({self.num_experts}) must be in [1, {lim['max_experts']}]"
            )
        if self.top_k > self.num_experts:
            raise A2AInputError(
                f"top_k ({self.top_k}) must not exceed num_experts ({self.num_experts})"
            )
        if self.dispatch_dtype not in DISPATCH_DTYPES:
            raise A2AInputError(
                f"dispatch_dtype must be one of {DISPATCH_DTYPES}, got {self.dispatch_dtype}"
            )
        if self.combine_dtype not in COMBINE_DTYPES:
            raise A2AInputError(
                f"combine_dtype must be one of {COMBINE_DTYPES}, got {self.combine_dtype}"
            )
        if self.hidden_size <= 0:
            raise A2AInputError(f"hidden_size ({self.hidden_size}) must be positive")
        for name, row in (("hidden states", self.x_row_bytes),
                          ("combine input", self.combine_row_bytes)):
            if row % 16:
                raise A2AInputError(
                    f"a token of {name} is {row} bytes (hidden_size {self.hidden_size}); "
                    "rows must be a multiple of 16 bytes"
                )
        if self.scale_cols < 0:
            raise A2AInputError(f"scale_cols ({self.scale_cols}) must be >= 0")
        for i, row in enumerate(self.extra_payload_row_bytes):
            if row <= 0 or row % 4:
                raise A2AInputError(
                    f"extra payload {i} has {row} bytes per token; must be a positive "
                    "multiple of 4"
                )
        if len(self.payload_row_bytes) > lim["max_payloads"]:
            raise A2AInputError(
                f"{len(self.payload_row_bytes)} payloads exceed the limit of "
                f"{lim['max_payloads']}"
            )

    @property
    def x_row_bytes(self) -> int:
        return self.hidden_size * self.dispatch_dtype.itemsize

    @property
    def combine_row_bytes(self) -> int:
        return self.hidden_size * self.combine_dtype.itemsize

    @property
    def payload_row_bytes(self) -> tuple[int, ...]:
        """Bytes per token of every dispatch payload, in payload order."""
        rows = [self.x_row_bytes]
        if self.scale_cols:
            rows.append(self.scale_cols * 4)
        return tuple(rows) + tuple(self.extra_payload_row_bytes)


@dataclass(frozen=True)
class WorkspaceLayout:
    """Byte offsets of one rank's workspace regions (computed by C++)."""

    header: int
    recv_topk_ids: int
    recv_topk_weights: int
    payloads: tuple[int, ...]
    combine: int
    total_bytes: int

    @classmethod
    def for_spec(cls, spec: AllToAllSpec) -> "WorkspaceLayout":
        values = ops.workspace_layout(
            ep_size=spec.ep_size,
            max_tokens_per_rank=spec.max_tokens_per_rank,
            top_k=spec.top_k,
            payload_row_bytes=list(spec.payload_row_bytes),
            combine_row_bytes=spec.combine_row_bytes,
        )
        n = len(spec.payload_row_bytes)
        return cls(
            header=values[0],
            recv_topk_ids=values[1],
            recv_topk_weights=values[2],
            payloads=tuple(values[3:3 + n]),
            combine=values[3 + n],
            total_bytes=values[4 + n],
        )


def _one_rank_per_process(spec: AllToAllSpec, group, device: torch.device | None
                          ) -> tuple[torch.device, WorkspaceLayout]:
    """What every one-rank-per-process allocation checks first: kernels present,
    ``group`` as large as ``spec.ep_size``; the device (default: current CUDA
    device) and the layout."""
    import torch.distributed as dist

    ops.require_kernels()
    if dist.get_world_size(group) != spec.ep_size:
        raise A2AInputError(
            f"group has {dist.get_world_size(group)} ranks but spec.ep_size is "
            f"{spec.ep_size}"
        )
    device = device or torch.device("cuda", torch.cuda.current_device())
    return device, WorkspaceLayout.for_spec(spec)


@dataclass
class Workspace:
    """Peer-visible buffers of the ranks this process drives.

    Attributes:
        spec, layout: what every buffer holds and where.
        peer_ptrs: ``[ep_size]`` device addresses of every rank's workspace as
            this process sees them (same layout everywhere).
        buffers: ``{rank: uint8 tensor [layout.total_bytes]}`` for local ranks.
        peer_mappings: what keeps peers' mappings alive when allocated
            across processes: torch's symmetric-memory handle, or the peers'
            opened CUDA IPC tensors (``{rank: tensor}``).
    """

    spec: AllToAllSpec
    layout: WorkspaceLayout
    peer_ptrs: list[int]
    buffers: dict[int, torch.Tensor]
    peer_mappings: object | None = None
    group: object | None = field(default=None, repr=False)

    @property
    def local_ranks(self) -> list[int]:
        return sorted(self.buffers)

    @property
    def device(self) -> torch.device:
        return next(iter(self.buffers.values())).device

    @classmethod
    def allocate_local(cls, spec: AllToAllSpec, device: torch.device | str | None = None
                       ) -> "Workspace":
        """All ``spec.ep_size`` ranks in this process, on one CUDA device."""
        ops.require_kernels()
        device = torch.device(device if device is not None else "cuda")
        layout = WorkspaceLayout.for_spec(spec)
        buffers = {
            rank: torch.zeros(layout.total_bytes, dtype=torch.uint8, device=device)
            for rank in range(spec.ep_size)
        }
        return cls(spec, layout, [buffers[r].data_ptr() for r in range(spec.ep_size)], buffers)

    @classmethod
    def allocate_symmetric(cls, spec: AllToAllSpec, group, device: torch.device | None = None
                           ) -> "Workspace":
        """One rank per process; collective over ``group`` (a torch ProcessGroup).

        Uses torch symmetric memory so every peer's workspace is mapped here.
        Zeroes this rank's buffer and barriers, so no peer can signal into a
        workspace that is not initialised yet.
        """
        import torch.distributed as dist
        import torch.distributed._symmetric_memory as symm_mem

        device, layout = _one_rank_per_process(spec, group, device)
        buffer = symm_mem.empty(layout.total_bytes, dtype=torch.uint8, device=device)
        handle = symm_mem.rendezvous(buffer, group)
        buffer.zero_()
        torch.cuda.synchronize(device)
        dist.barrier(group=group)
        rank = dist.get_rank(group)
        peer_ptrs = [int(p) for p in handle.buffer_ptrs]
        if peer_ptrs[rank] != buffer.data_ptr():
            raise RuntimeError("symmetric memory mapped this rank's buffer at another address")
        return cls(spec, layout, peer_ptrs, {rank: buffer}, handle, group)

    @classmethod
    def allocate_cuda_ipc(cls, spec: AllToAllSpec, group, device: torch.device | None = None
                          ) -> "Workspace":
        """One rank per process; collective over ``group`` (a gloo ProcessGroup).

        Each rank allocates its buffer, zeroes it, and all-gathers the CUDA IPC
        handle of it (``torch.multiprocessing.reductions``: the same mechanism
        torch uses to pass CUDA tensors between processes); every rank opens its
        peers' handles. Ranks may share a GPU. The peers' tensors are kept here:
        they hold the mappings open, and torch's IPC reference counting keeps an
        exporter's memory alive until every importer dropped it.
        """
        import torch.distributed as dist
        from torch.multiprocessing.reductions import reduce_tensor

        device, layout = _one_rank_per_process(spec, group, device)
        rank = dist.get_rank(group)
        buffer = torch.zeros(layout.total_bytes, dtype=torch.uint8, device=device)
        # No peer may map (and signal into) a buffer whose zeroing is still queued.
        torch.cuda.synchronize(device)
        rebuild, args = reduce_tensor(buffer)
        handles: list = [None] * spec.ep_size
        dist.all_gather_object(handles, args, group=group)
        peers: dict[int, torch.Tensor] = {}
        with torch.cuda.device(device):
            for peer, peer_args in enumerate(handles):
                if peer != rank:
                    peers[peer] = rebuild(*peer_args)
        peer_ptrs = [buffer.data_ptr() if r == rank else peers[r].data_ptr()
                     for r in range(spec.ep_size)]
        dist.barrier(group=group)  # every rank mapped every peer before anyone signals
        return cls(spec, layout, peer_ptrs, {rank: buffer}, peers, group)

    def buffer(self, rank: int) -> torch.Tensor:
        try:
            return self.buffers[rank]
        except KeyError:
            raise A2AInputError(
                f"rank {rank} is not local to this process (local ranks: {self.local_ranks})"
            ) from None

    def region(self, rank: int, offset: int, dtype: torch.dtype, shape: tuple[int, ...]
               ) -> torch.Tensor:
        """A typed view ``shape`` of ``dtype`` at ``offset`` in ``rank``'s buffer."""
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * dtype.itemsize
        raw = self.buffer(rank)[offset:offset + nbytes]
        return raw.view(dtype).view(shape)

    def nbytes_per_rank(self) -> int:
        return self.layout.total_bytes

    def release(self) -> None:
        """Drop the buffers (the memory returns to torch's allocator)."""
        self.buffers.clear()
        self.peer_ptrs = []
        self.peer_mappings = None

    def reinitialize(self) -> None:
        """Reset the protocol state of this process's buffers in place: collective.

        Zeroes the header (flags, epochs, block counters) of every local buffer,
        so every rank starts again at epoch 1; payload regions need no reset
        (a receiver reads a slot only after its sender's flag of that epoch).
        Buffers keep their addresses: peer tables and CUDA graphs stay valid.

        The rule that makes it safe against a stalled peer whose kernel is
        still spinning, or runs late and writes into the fresh header:
          1. every rank waits for all work on its device (each of our kernels
             ends, at the latest, when its timeout passes);
          2. barrier: now no rank has a kernel in flight that could write into
             a peer's workspace;
          3. each rank zeroes its own headers and waits for that;
          4. barrier: no rank signals a peer whose header is not zeroed yet.
        Every rank of ``group`` must call it, after its last launch of the
        failed step. With all ranks in this process (``allocate_local``, no
        group) steps 2 and 4 are nothing to wait for.
        """
        device = self.device
        torch.cuda.synchronize(device)
        if self.group is not None:
            import torch.distributed as dist

            dist.barrier(group=self.group)
        for buffer in self.buffers.values():
            buffer[self.layout.header:self.layout.recv_topk_ids].zero_()
        torch.cuda.synchronize(device)
        if self.group is not None:
            import torch.distributed as dist

            dist.barrier(group=self.group)
