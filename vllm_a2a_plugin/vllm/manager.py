"""vLLM all2all manager owning the EP group's one-sided all-to-all workspaces.

vLLM's CUDA (or CPU) communicator of the EP group builds one manager; every MoE
layer's prepare/finalize asks it for an all-to-all that fits the layer
(:meth:`OneSidedAll2AllManager.all_to_all`). Layers of the same shape share one
workspace: layers run one after another and each dispatch is followed by its
combine, so one workspace per distinct shape is enough.

On a machine where our CUDA kernels can run, workspaces live in torch symmetric
memory across the EP ranks; elsewhere (CPU) the manager hands out
:class:`~vllm_a2a_plugin.reference.ReferenceAllToAll`, the same semantics over
the EP group's gloo collectives.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
from vllm.distributed.device_communicators.base_device_communicator import All2AllManagerBase

from vllm_a2a_plugin import envs, ops
from vllm_a2a_plugin.all_to_all import OneSidedAllToAll
from vllm_a2a_plugin.config import A2AConfig
from vllm_a2a_plugin.errors import A2AInputError
from vllm_a2a_plugin.reference import ReferenceAllToAll
from vllm_a2a_plugin.workspace import AllToAllSpec, Workspace

logger = logging.getLogger(__name__)


def _shape_key(spec: AllToAllSpec) -> tuple:
    """What must match for two layers to share a workspace (all but capacity)."""
    return (spec.hidden_size, spec.top_k, spec.num_experts, spec.dispatch_dtype,
            spec.scale_cols, spec.extra_payload_row_bytes, spec.combine_dtype)


class OneSidedAll2AllManager(All2AllManagerBase):
    """Creates, reuses, grows and frees the EP group's all-to-all workspaces.

    Args:
        cpu_group: the EP group's CPU (gloo) process group, from vLLM.
        device: this rank's device (CUDA for the kernels, CPU for the reference).
    """

    def __init__(self, cpu_group, tcp_store_group=None, *, device: torch.device | None = None):
        super().__init__(cpu_group, tcp_store_group)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.use_kernels = self.device.type == "cuda"
        if self.use_kernels:
            ops.require_kernels()
            if self.internode:
                raise RuntimeError(
                    "a2a_one_sided needs every EP rank on one NVLink domain (one node); this "
                    f"EP group of {self.world_size} ranks spans nodes. Use another "
                    "--all2all-backend for multi-node EP.")
        self.config = A2AConfig(timeout_s=envs.timeout_seconds(120.0),
                                check_expert_ids=envs.check_expert_ids(False))
        self._all_to_alls: dict[tuple, tuple[AllToAllSpec, object]] = {}

    def all_to_all(self, spec: AllToAllSpec, *, expert_owner: torch.Tensor | None = None):
        """The all-to-all for ``spec``: created once, reused, grown when a layer
        needs more tokens. Every EP rank calls this in the same order (same model),
        so collective (re)allocation stays in step."""
        if spec.ep_size != self.world_size:
            raise A2AInputError(
                f"layer asks for ep_size {spec.ep_size} but this EP group has "
                f"{self.world_size} ranks")
        key = _shape_key(spec)
        existing = self._all_to_alls.get(key)
        if existing is not None:
            old_spec, a2a = existing
            if a2a.rank != self.rank:
                raise A2AInputError(
                    f"cached all-to-all belongs to EP rank {a2a.rank}, this is rank {self.rank}")
            if spec.max_tokens_per_rank <= old_spec.max_tokens_per_rank:
                return a2a
            spec = replace(spec, max_tokens_per_rank=max(spec.max_tokens_per_rank,
                                                         old_spec.max_tokens_per_rank))
            self._release(key)
        a2a = self._create(spec, expert_owner)
        self._all_to_alls[key] = (spec, a2a)
        return a2a

    def get_handle(self, kwargs):
        """vLLM's generic accessor: ``kwargs`` are :class:`AllToAllSpec` fields."""
        return self.all_to_all(AllToAllSpec(**kwargs))

    def _create(self, spec: AllToAllSpec, expert_owner: torch.Tensor | None):
        if not self.use_kernels:
            return ReferenceAllToAll(spec, self.cpu_group, expert_owner=expert_owner,
                                     device=self.device,
                                     check_expert_ids=self.config.check_expert_ids)
        workspace = Workspace.allocate_symmetric(spec, self.cpu_group, self.device)
        logger.info(
            "a2a_one_sided workspace: %.1f MiB per rank (ep_size=%d, max_tokens_per_rank=%d, "
            "hidden=%d, top_k=%d, dispatch %s, combine %s)",
            workspace.nbytes_per_rank() / 2**20, spec.ep_size, spec.max_tokens_per_rank,
            spec.hidden_size, spec.top_k, spec.dispatch_dtype, spec.combine_dtype)
        return OneSidedAllToAll(workspace, self.rank, expert_owner=expert_owner,
                                config=self.config)

    def _release(self, key) -> None:
        _, a2a = self._all_to_alls.pop(key)
        if isinstance(a2a, OneSidedAllToAll):
            if self.use_kernels:
                torch.cuda.synchronize(self.device)  # no kernel may still use it
            a2a.workspace.release()

    def destroy(self) -> None:
        """Free every workspace (vLLM calls this on shutdown)."""
        for key in list(self._all_to_alls):
            self._release(key)
