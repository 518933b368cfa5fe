"""``AllToAllPool``: the EP group's all-to-alls, shared by every engine adapter.

One pool per EP group per process. Each MoE layer asks it for an all-to-all
that fits the layer (:meth:`AllToAllPool.all_to_all`); layers of the same shape
share one workspace, because layers run one after another and each dispatch is
followed by its combine. The vLLM manager and the SGLang dispatcher are thin
adapters over this class: engine code never allocates workspaces itself.

Where the workspaces live:
  * CUDA, one GPU per rank: torch symmetric memory;
  * CUDA, several ranks sharing a GPU (symmetric memory refuses overlapping
    devices), or symmetric memory failing to rendezvous (some containers lack
    the rights to exchange its handles): CUDA IPC handles exported through
    torch (:meth:`Workspace.allocate_cuda_ipc`);
  * CPU: :class:`~vllm_a2a_plugin.reference.ReferenceAllToAll`, the kernels'
    semantics over the group's gloo collectives.

``VLLM_A2A_WORKSPACE`` (``auto``, ``symmetric``, ``cuda_ipc``) forces a path.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from vllm_a2a_plugin import envs, ops
from vllm_a2a_plugin.all_to_all import OneSidedAllToAll
from vllm_a2a_plugin.config import A2AConfig
from vllm_a2a_plugin.errors import A2AInputError
from vllm_a2a_plugin.reference import ReferenceAllToAll
from vllm_a2a_plugin.watchdog import DEFAULT_INTERVAL_S, AbortWord, PeerWatchdog
from vllm_a2a_plugin.workspace import AllToAllSpec, Workspace

logger = logging.getLogger(__name__)



# Micro-batches that may be in flight at once (vLLM's dual-batch overlap, SGLang's
# two-batch overlap): each has its own workspaces, so two rounds never share
# receive slots, flags or epochs.
MAX_MICRO_BATCHES = 2


def _shape_key(spec: AllToAllSpec, micro_batch: int) -> tuple:
    """What must match for two layers to share a workspace (all but capacity),
    and the micro-batch that owns it."""
    return (spec.hidden_size, spec.top_k, spec.num_experts, spec.dispatch_dtype,
            spec.scale_cols, spec.extra_payload_row_bytes, spec.combine_dtype, micro_batch)


class AllToAllPool:
    """Creates, reuses, grows and frees one EP group's all-to-alls.

    Args:
        cpu_group: the EP group's CPU (gloo) process group; every collective of
            allocation runs on it.
        device: this rank's device (CUDA: our kernels; CPU: the reference).
        config: launch and safety settings of every all-to-all handed out.

    Attributes:
        allocation: how workspaces were allocated: ``"symmetric"``,
            ``"cuda_ipc"``, ``"reference"``, or None before the first one.
    """

    def __init__(self, cpu_group, *, device: torch.device | str,
                 config: A2AConfig | None = None):
        import torch.distributed as dist

        self.cpu_group = cpu_group
        self.rank = dist.get_rank(cpu_group)
        self.world_size = dist.get_world_size(cpu_group)
        self.device = torch.device(device)
        self.use_kernels = self.device.type == "cuda"
        if self.use_kernels:
            ops.require_kernels()
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
        self.config = config or A2AConfig()
        self.allocation: str | None = None if self.use_kernels else "reference"
        self._all_to_alls: dict[tuple, tuple[AllToAllSpec, object]] = {}
        # Peer-loss detection (vllm_a2a_plugin/watchdog.py): one abort word for
        # every all-to-all of this pool; the watchdog starts with the first
        # workspace (a collective every rank reaches in the same order).
        self.abort: AbortWord | None = AbortWord() if self.use_kernels else None
        self.watchdog: PeerWatchdog | None = None

    def all_to_all(self, spec: AllToAllSpec, *, expert_owner: torch.Tensor | None = None,
                   micro_batch: int = 0):
        """The all-to-all for ``spec``: created once, reused, grown when a layer
        needs more tokens. Every EP rank calls this in the same order (same
        model), so collective (re)allocation stays in step.

        Args:
            spec: the layer's shape; ``spec.ep_size`` must be the group's size.
            expert_owner: ``[num_experts]`` int32 rank of every expert (default:
                linear placement); layers sharing a shape must share it.
            micro_batch: which of the step's micro-batches (``0`` or ``1``) the
                all-to-all serves. Each micro-batch gets its own workspace, so
                one micro-batch's round may be in flight while the other's is
                sent or waited for. Ask for every micro-batch an engine will use
                when the layer is built: allocation is collective, and a first
                request in the middle of a forward would allocate there.

        Returns:
            :class:`OneSidedAllToAll` (CUDA) or :class:`ReferenceAllToAll` (CPU).
        """
        if spec.ep_size != self.world_size:
            raise A2AInputError(
                f"layer asks for ep_size {spec.ep_size} but this EP group has "
                f"{self.world_size} ranks")
        if micro_batch not in range(MAX_MICRO_BATCHES):
            raise A2AInputError(
                f"micro_batch must be in [0, {MAX_MICRO_BATCHES}), got {micro_batch}")
        key = _shape_key(spec, micro_batch)
        existing = self._all_to_alls.get(key)
        if existing is not None:
            old_spec, a2a = existing
            if a2a.rank != self.rank:
                raise A2AInputError(
                    f"cached all-to-all belongs to EP rank {a2a.rank}, this is rank {self.rank}")
            if expert_owner is not None and not torch.equal(
                    expert_owner.to("cpu", torch.int32), a2a.expert_owner_cpu):
                raise A2AInputError(
                    "two layers of one shape route experts to different ranks; a2a_one_sided "
                    "shares one workspace (and owner table) per layer shape")
            if spec.max_tokens_per_rank <= old_spec.max_tokens_per_rank:
                return a2a
            spec = replace(spec, max_tokens_per_rank=max(spec.max_tokens_per_rank,
                                                         old_spec.max_tokens_per_rank))
            self._release(key)
        a2a = self._create(spec, expert_owner)
        self._all_to_alls[key] = (spec, a2a)
        return a2a

    def _create(self, spec: AllToAllSpec, expert_owner: torch.Tensor | None):
        if not self.use_kernels:
            return ReferenceAllToAll(spec, self.cpu_group, expert_owner=expert_owner,
                                     device=self.device,
                                     check_expert_ids=self.config.check_expert_ids)
        self._start_watchdog()
        workspace = self._allocate(spec)
        logger.info(
            "a2a_one_sided workspace (%s): %.1f MiB per rank (ep_size=%d, "
            "max_tokens_per_rank=%d, hidden=%d, top_k=%d, dispatch %s, combine %s)",
            self.allocation, workspace.nbytes_per_rank() / 2**20, spec.ep_size,
            spec.max_tokens_per_rank, spec.hidden_size, spec.top_k, spec.dispatch_dtype,
            spec.combine_dtype)
        return OneSidedAllToAll(workspace, self.rank, expert_owner=expert_owner,
                                config=self.config, abort=self.abort)

    def _start_watchdog(self) -> None:
        interval = envs.peer_interval_seconds(DEFAULT_INTERVAL_S)
        if self.watchdog is not None or interval == 0:
            return
        self.watchdog = PeerWatchdog.start_for_group(
            self.cpu_group, abort=self.abort, interval_s=interval,
            exit_after_s=(envs.peer_lost_exit_seconds() if self.config.peer_lost_exit_s is None
                          else self.config.peer_lost_exit_s),
            end_parent_pid=envs.engine_core_parent_pid())
        logger.info("a2a_one_sided: peer watchdog started (interval %.3g s)", interval)

    def _allocate(self, spec: AllToAllSpec) -> Workspace:
        """Allocate on the path chosen at the first allocation (the same on all ranks)."""
        if self.allocation is None:
            path, may_fall_back = self._choose_allocation()
            workspace = None
            if path == "symmetric" and may_fall_back:
                workspace = self._try_symmetric(spec)
                path = "symmetric" if workspace is not None else "cuda_ipc"
            self.allocation = path
            logger.info("a2a_one_sided: workspaces use %s allocation", path)
            if workspace is not None:
                return workspace
        if self.allocation == "symmetric":
            return Workspace.allocate_symmetric(spec, self.cpu_group, self.device)
        return Workspace.allocate_cuda_ipc(spec, self.cpu_group, self.device)

    def _choose_allocation(self) -> tuple[str, bool]:
        """(path, whether a failing symmetric rendezvous may fall back to CUDA IPC).

        ``VLLM_A2A_WORKSPACE`` set to a path forces it, failures included.
        """
        import torch.distributed as dist

        forced = envs.workspace_allocation()
        if forced != "auto":
            return forced, False
        uuids: list = [None] * self.world_size
        dist.all_gather_object(uuids, str(torch.cuda.get_device_properties(self.device).uuid),
                               group=self.cpu_group)
        if len(set(uuids)) < len(uuids):
            logger.info("a2a_one_sided: EP ranks share a GPU; torch symmetric memory refuses "
                        "that, so workspaces use CUDA IPC")
            return "cuda_ipc", False
        return "symmetric", True

    def _try_symmetric(self, spec: AllToAllSpec) -> Workspace | None:
        """Symmetric memory, or None on every rank when any rank failed to get it."""
        import torch.distributed as dist

        workspace, failure = None, ""
        try:
            workspace = Workspace.allocate_symmetric(spec, self.cpu_group, self.device)
        except Exception as exc:  # noqa: BLE001 - reported, then the IPC path is used
            failure = f"{type(exc).__name__}: {exc}"
        failures: list = [None] * self.world_size
        dist.all_gather_object(failures, failure, group=self.cpu_group)
        failed = {rank: why for rank, why in enumerate(failures) if why}
        if not failed:
            return workspace
        if workspace is not None:
            workspace.release()
        logger.warning("a2a_one_sided: torch symmetric memory failed on rank(s) %s (%s); "
                       "falling back to CUDA IPC workspaces", sorted(failed),
                       next(iter(failed.values())))
        return None

    def _release(self, key, *, wait_for_peers: bool = True) -> None:
        _, a2a = self._all_to_alls.pop(key)
        if isinstance(a2a, OneSidedAllToAll):
            torch.cuda.synchronize(self.device)
            if wait_for_peers:
                import torch.distributed as dist

                # Combine pulls partial results from peers' workspaces after our
                # own combine may have finished: free only once every rank's
                # work is done.
                dist.barrier(group=self.cpu_group)
            a2a.workspace.release()

    def failures(self) -> list:
        """The sticky errors of this rank's all-to-alls (empty when all are healthy)."""
        return [a2a.failure for a2a in self.all_to_alls()
                if getattr(a2a, "failure", None) is not None]

    def recover(self) -> None:
        """Make every all-to-all of the group usable again after a device error.

        Collective: every EP rank calls it (also ranks that saw no error), after
        its last launch of the failed step; ranks agree that one failed by
        exchanging :meth:`failures` (e.g. an all-reduce on ``cpu_group``).
        Workspaces are reset in place in creation order, the same on every rank
        (:meth:`OneSidedAllToAll.recover`: device sync, barrier, zeroed header,
        barrier), so buffers keep their addresses and captured CUDA graphs stay
        valid. A dead peer process cannot be recovered this way (the watchdog's
        rearm raises then); a peer that was stopped and resumed can: the abort
        word is cleared by the group together first.
        """
        if self.watchdog is not None:
            self.watchdog.rearm(self.cpu_group)
        for a2a in self.all_to_alls():
            if isinstance(a2a, OneSidedAllToAll):
                a2a.recover()

    def destroy(self) -> None:
        """Drop every workspace (engine shutdown).

        No barrier: at shutdown a peer may already be gone, and waiting for it
        would hang the exit. Peers still mapping our memory keep it alive (torch
        counts CUDA-IPC importers; symmetric memory frees with its handle).
        """
        if self.watchdog is not None:
            self.watchdog.stop(depart=True)  # leaving on purpose is not a loss
            self.watchdog = None
        for key in list(self._all_to_alls):
            self._release(key, wait_for_peers=False)

    def all_to_alls(self, micro_batch: int | None = None) -> list:
        """Every all-to-all handed out so far (for counters and tests), or
        those of one micro-batch."""
        return [a2a for key, (_, a2a) in self._all_to_alls.items()
                if micro_batch is None or key[-1] == micro_batch]
