"""vLLM all2all manager of the EP group: a thin adapter over :class:`AllToAllPool`.

vLLM's CUDA (or CPU) communicator of the EP group builds one manager; every MoE
layer's prepare/finalize asks it for an all-to-all that fits the layer
(:meth:`OneSidedAll2AllManager.all_to_all`). Workspace creation, reuse, growth,
the symmetric-memory / CUDA-IPC choice and the CPU reference all live in
:mod:`vllm_a2a_plugin.pool`, shared with the SGLang adapter; what is vLLM's here
is the base class, the settings read from our environment variables, and the
refusal of EP groups that span nodes.
"""

from __future__ import annotations

import torch
from vllm.distributed.device_communicators.base_device_communicator import All2AllManagerBase

from vllm_a2a_plugin import envs
from vllm_a2a_plugin.pool import MAX_MICRO_BATCHES, AllToAllPool
from vllm_a2a_plugin.workspace import AllToAllSpec


class OneSidedAll2AllManager(All2AllManagerBase):
    """The EP group's all-to-alls for vLLM.

    Args:
        cpu_group: the EP group's CPU (gloo) process group, from vLLM.
        device: this rank's device (CUDA for the kernels, CPU for the reference).
    """

    def __init__(self, cpu_group, tcp_store_group=None, *, device: torch.device | None = None):
        super().__init__(cpu_group, tcp_store_group)
        device = torch.device(device) if device is not None else torch.device("cpu")
        if device.type == "cuda" and self.internode:
            raise RuntimeError(
                "a2a_one_sided needs every EP rank on one NVLink domain (one node); this "
                f"EP group of {self.world_size} ranks spans nodes. Use another "
                "--all2all-backend for multi-node EP.")
        self.config = envs.engine_config()
        self.pool = AllToAllPool(cpu_group, device=device, config=self.config)
        self.device = self.pool.device

    def all_to_all(self, spec: AllToAllSpec, *, expert_owner: torch.Tensor | None = None,
                   micro_batch: int = 0):
        """The all-to-all for ``spec`` and ``micro_batch`` (see
        :meth:`AllToAllPool.all_to_all`)."""
        return self.pool.all_to_all(spec, expert_owner=expert_owner, micro_batch=micro_batch)

    def get_handle(self, kwargs):
        """vLLM's generic accessor: ``kwargs`` are :class:`AllToAllSpec` fields."""
        return self.all_to_all(AllToAllSpec(**kwargs))

    def recover(self) -> None:
        """Reset every workspace after a device error (collective; see
        :meth:`AllToAllPool.recover`)."""
        self.pool.recover()

    def destroy(self) -> None:
        """Free every workspace (vLLM calls this on shutdown)."""
        self.pool.destroy()


def ep_round_counts(_worker=None) -> dict:
    """This process's a2a_one_sided rounds, for ``LLM.collective_rpc``.

    Returns ``{"dp_rank", "ep_rank", "allocation", "all_to_alls", "dispatches",
    "combines", "dispatches_by_micro_batch", "prepare_calls", "finalize_calls",
    "overlapped_prepare_calls"}``: the kernels' device counters summed over
    every workspace (layers of one shape share one), the dispatches of each
    micro-batch's workspaces (``[micro-batch 0, micro-batch 1]``; the second
    only moves in steps vLLM split for dual-batch overlap), and the host calls
    of our prepare/finalize (under CUDA graphs those only count the capture;
    the device counters count every replay). ``_worker`` is the vLLM worker
    ``collective_rpc`` passes; unused.
    """
    from vllm.distributed.parallel_state import get_dp_group

    from vllm_a2a_plugin.vllm.prepare_finalize import host_call_counts

    manager = ep_manager()
    counts = {"dp_rank": get_dp_group().rank_in_group, "ep_rank": manager.rank,
              "allocation": manager.pool.allocation, "all_to_alls": 0, "dispatches": 0,
              "combines": 0}
    by_micro_batch = []
    for micro_batch in range(MAX_MICRO_BATCHES):
        micro_batch_dispatches = 0
        for a2a in manager.pool.all_to_alls(micro_batch):
            dispatches, combines = a2a.completed_rounds()
            counts["all_to_alls"] += 1
            counts["dispatches"] += dispatches
            counts["combines"] += combines
            micro_batch_dispatches += dispatches
        by_micro_batch.append(micro_batch_dispatches)
    counts["dispatches_by_micro_batch"] = by_micro_batch
    counts.update(host_call_counts())
    return counts


def ep_manager() -> OneSidedAll2AllManager:
    """The EP group's a2a_one_sided manager in this process.

    vLLM's communicator of the EP group holds it; an EP group of one rank (the
    test-only single-rank mode) has no communicator, so that one lives in
    :func:`~vllm_a2a_plugin.vllm.single_rank_mode.single_rank_manager`.
    """
    from vllm.distributed.parallel_state import get_ep_group

    group = get_ep_group()
    if group.world_size == 1:
        from vllm_a2a_plugin.vllm.single_rank_mode import single_rank_manager

        return single_rank_manager()
    manager = group.device_communicator.all2all_manager
    if not isinstance(manager, OneSidedAll2AllManager):
        raise RuntimeError(f"the EP group's all2all manager is {type(manager).__name__}, "
                           "not a2a_one_sided's")
    return manager
