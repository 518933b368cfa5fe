"""Test-only engine mode: every MoE layer through our prepare/finalize at EP = 1.

vLLM calls an all2all backend only when expert parallelism spans several ranks
(``FusedMoEParallelConfig.use_all2all_kernels``: EP with DP > 1, PCP > 1 or
sequence parallelism), so on a one-GPU machine the engine never runs our
dispatch and combine. With ``VLLM_A2A_TEST_SINGLE_RANK_EP=1`` (read in
:mod:`vllm_a2a_plugin.envs`) and ``--enable-expert-parallel --all2all-backend
a2a_one_sided`` at DP = 1, this module makes vLLM treat the single rank as an
EP group of one that uses all2all kernels: every MoE layer then runs our
prepare (quantise, **our dispatch kernel**) -> vLLM's experts -> our finalize
(weight-and-reduce, **our combine kernel**) inside ``LLM(...)`` / ``vllm serve``,
under vLLM's model loading, torch.compile, CUDA-graph capture and chunked
prefill.

What it does not show: traffic between GPUs or processes (one rank sends only
to itself), DP lock-step, or idle DP ranks. Never set it in production: it
adds two copies per MoE layer for no benefit.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging

from vllm_a2a_plugin import BACKEND_NAME

logger = logging.getLogger(__name__)

FUSED_MOE_CONFIG_MODULE = "vllm.model_executor.layers.fused_moe.config"


def patch_fused_moe_parallel_config(module) -> None:
    """Wraps FusedMoEParallelConfig.make and .use_all2all_kernels (test mode only)."""
    cls = module.FusedMoEParallelConfig
    raw = inspect.getattr_static(cls, "make")  # a staticmethod in vLLM 0.32
    if getattr(raw.__func__, "_a2a_single_rank", False):
        return
    original_make = raw.__func__
    bind_class = isinstance(raw, classmethod)

    @functools.wraps(original_make)
    def make(*args, **kwargs):
        config = original_make(cls, *args, **kwargs) if bind_class else original_make(
            *args, **kwargs)
        if (config.all2all_backend == BACKEND_NAME and not config.use_ep
                and _expert_parallel_requested(args, kwargs)):
            # One GPU, DP = TP = 1: an EP group of one rank, as DP > 1 would make.
            config = dataclasses.replace(config, use_ep=True, ep_size=1, ep_rank=0,
                                         tp_size=1, tp_rank=0)
        return config

    make._a2a_single_rank = True
    cls.make = staticmethod(make)

    original_gate = cls.use_all2all_kernels.fget

    @functools.wraps(original_gate)
    def use_all2all_kernels(self):
        return original_gate(self) or (self.use_ep and self.all2all_backend == BACKEND_NAME)

    cls.use_all2all_kernels = property(use_all2all_kernels)
    logger.warning("a2a_one_sided TEST MODE (VLLM_A2A_TEST_SINGLE_RANK_EP=1): MoE layers use "
                   "our all-to-all at EP=1; for engine tests on one GPU only")


def _expert_parallel_requested(args, kwargs) -> bool:
    parallel = kwargs.get("vllm_parallel_config")
    if parallel is None:
        parallel = next((a for a in args if hasattr(a, "enable_expert_parallel")), None)
    return bool(parallel is not None and parallel.enable_expert_parallel)


@functools.cache
def single_rank_manager():
    """The all2all manager of an EP group of one rank (vLLM builds no device
    communicator, hence no manager, for a group of size 1)."""
    from vllm.distributed.parallel_state import get_ep_group

    from vllm_a2a_plugin.vllm.manager import OneSidedAll2AllManager

    group = get_ep_group()
    if group.world_size != 1:
        raise RuntimeError(f"single-rank test mode with an EP group of {group.world_size}")
    return OneSidedAll2AllManager(group.cpu_group, device=group.device)
