"""The one module that patches vLLM, so ``--all2all-backend a2a_one_sided`` works.

vLLM 0.32 and 0.33 have no registry for out-of-tree all2all backends (an
upstream proposal exists); until a release has one, these wrappers extend the
few vLLM functions that choose by backend name. Each wraps the original, never
copies it, and says which vLLM function it extends. Every patched function and
every name list below was read in both releases' wheels (0.32.0, 0.33.0): the
patched signatures and the lists are the same in both, so no patch depends on
the version; what does differ lives in :mod:`vllm_a2a_plugin.vllm.compat`.

Patched (and why):
  * ``vllm.config.parallel.ParallelConfig``: the ``all2all_backend`` field's
    Literal gains our name; the pydantic validator is rebuilt and the CLI
    kwargs cache cleared (design §6), so ``vllm serve --all2all-backend
    a2a_one_sided`` parses and configs validate. ``use_sequence_parallel_moe``
    (a name list in both releases) treats us like the other EP all2all
    backends: TP>1 with DP>1 shards tokens across TP ranks.
  * ``CudaCommunicator.__init__`` / ``CpuCommunicator.__init__``: build our
    manager instead of failing with "Unknown all2all backend" (CUDA) or
    silently falling back to all-gather/reduce-scatter (CPU); data parallelism
    without ``--enable-expert-parallel`` is refused with a message saying so.
  * ``fused_moe.all2all_utils.maybe_make_prepare_finalize`` (same signature in
    0.32 and 0.33): returns our prepare/finalize for our backend; rebound in
    every module that imported it by name.
  * ``VllmConfig.__post_init__``: with micro-batching on (``--enable-dbo``),
    its last check asserts that the backend is in a local list (CUDA:
    deepep_low_latency, deepep_high_throughput, nixl_ep). Our prepare/finalize
    runs under it (one workspace per micro-batch, the all-to-all on the comm
    stream: see prepare_finalize.py), so while ``__post_init__`` runs the
    backend reads as ``deepep_low_latency``, and ours again right after. Every
    other read of the name in ``__post_init__`` (ROCm DeepEP-HT DBO tweak,
    moonep graphs, ``set_splitting_ops_for_v1``'s DeepEP-HT branch) treats
    both names alike, checked in 0.32 and 0.33.

  * ``MultiprocExecutor._init_executor`` (``v1/executor/multiproc_executor.py``):
    before it starts the workers, an engine core (a child process) names its
    pid for them in ``VLLM_A2A_ENGINE_CORE_PID``: a worker that its peer
    watchdog ends after a lost peer ends that engine core too, which otherwise
    waits forever in its data-parallel all-reduce with a stopped peer's engine.
  * ``SyncMPClient.shutdown`` (``v1/engine/core_client.py``, the client of
    offline ``LLM``): when vLLM's engine-core monitor finds the engine core
    dead it marks the client dead and shuts it down, which stops the output
    thread without telling a caller blocked in ``get_output`` (the async
    client does put ``EngineDeadError`` on its queue). An engine core ended by
    our watchdog would leave ``LLM.generate`` waiting forever; after a
    shutdown of a dead engine the queue gets ``EngineDeadError``, so it raises.

Left alone on purpose (decisions for the other name checks of design §6, the
same code in 0.32 and 0.33 unless noted):
  * ``v1/worker/sentinel/gpu_worker_sentinel.py`` fault tolerance
    (``FT_BACKEND_SET``: deepep_low_latency, nixl_ep): it needs rank masking
    and buffer cleaning we do not offer; vLLM's ValueError says so.
  * CUDA-graph exclusions: ``config/compilation.py`` turns graphs off for
    DeepEP HT with DP>1 and ``config/vllm.py`` (0.33) for moonep: ours is
    graph-safe (epochs advance on the device), keep graphs on.
  * ``v1/worker/ubatch_utils.py``: DeepEP-HT-only branch, not us.
  * ``v1/engine/utils.py`` Ray "fill" pack strategy check (DeepEP needs EP
    ranks on one node): our manager itself refuses EP groups that span nodes.
  * ``lora/layers/fused_moe.py`` asserts allgather_reducescatter: LoRA MoE is
    not supported with us, vLLM's assertion says so.
  * ``fused_moe/runner/shared_experts.py`` ``_EPLB_OVERLAP_SAFE_BACKENDS``
    (allgather_reducescatter, deepep_v2, flashinfer_nvlink_one_sided): we are
    not in it, so with EPLB vLLM runs shared experts without overlap (safe
    default, unproven for us); without EPLB overlap stays on.
  * ``fused_moe/expert_map_manager.py`` round-robin placement: vLLM falls back
    to linear placement for all2all backends without routing tables, which is
    what our owner table assumes (prepare also verifies it).
  * ``config/kernel.py`` ``bind_passthrough_all2all_backend``: MoE backends
    that dispatch themselves (FlashInfer MoE-EP megakernels) reject any
    explicit all2all backend, ours included, with vLLM's own message.
  * 0.33's model-specific checks (``models/kimi_k3`` deepep_v2 shared-expert
    path, ``models/deepseek_v4/amd`` MegaMoE on MoRI, ``elastic_ep`` nixl_ep):
    they name other backends and never branch for an unknown one.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import threading
from typing import Literal, get_args

from vllm_a2a_plugin import BACKEND_NAME, envs
from vllm_a2a_plugin.import_hooks import when_imported
from vllm_a2a_plugin.vllm.compat import (  # noqa: F401  (re-exported)
    SUPPORTED_VLLM_SERIES,
    UnsupportedVllmVersionError,
    check_vllm_version,
)

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_installed = False

_CUDA_COMMUNICATOR = "vllm.distributed.device_communicators.cuda_communicator"
_CPU_COMMUNICATOR = "vllm.distributed.device_communicators.cpu_communicator"
_ALL2ALL_UTILS = "vllm.model_executor.layers.fused_moe.all2all_utils"
_PARALLEL_CONFIG = "vllm.config.parallel"
_VLLM_CONFIG = "vllm.config.vllm"
_MULTIPROC_EXECUTOR = "vllm.v1.executor.multiproc_executor"
_CORE_CLIENT = "vllm.v1.engine.core_client"
# A name vLLM's micro-batching check accepts on every platform (see _patch_vllm_config).
_MICRO_BATCHING_BACKEND_NAME = "deepep_low_latency"


def install() -> None:
    """Apply every patch now or when its module is imported (idempotent)."""
    global _installed
    with _lock:
        if _installed:
            return
        check_vllm_version()
        when_imported(_PARALLEL_CONFIG, _patch_parallel_config)
        when_imported(_VLLM_CONFIG, _patch_vllm_config)
        when_imported(_CUDA_COMMUNICATOR, _patch_communicator("CudaCommunicator"))
        when_imported(_CPU_COMMUNICATOR, _patch_communicator("CpuCommunicator"))
        when_imported(_ALL2ALL_UTILS, _patch_prepare_finalize_factory)
        when_imported(_MULTIPROC_EXECUTOR, _patch_multiproc_executor)
        when_imported(_CORE_CLIENT, _patch_sync_client_shutdown)
        if envs.single_rank_test_mode():
            from vllm_a2a_plugin.vllm import single_rank_mode

            when_imported(single_rank_mode.FUSED_MOE_CONFIG_MODULE,
                           single_rank_mode.patch_fused_moe_parallel_config)
        _installed = True


def _patch_multiproc_executor(module) -> None:
    """``MultiprocExecutor._init_executor`` (it starts the workers): names this
    process's pid for them when it is itself a child process (vLLM's engine
    core), so a worker whose watchdog ends it after a lost peer ends this engine
    core too, which may be blocked in its data-parallel all-reduce with the
    lost engine (``PeerWatchdog`` ``end_parent_pid``). Never in a user's main
    process (an engine core run in-process): that one is left alone.

    A patch of the executor, not a step of the plugin's loading: a forked engine
    core inherits vLLM's "plugins loaded" flag and loads none again."""
    executor = module.MultiprocExecutor
    original = executor._init_executor
    if getattr(original, "_a2a_wrapped", False):
        return

    @functools.wraps(original)
    def _init_executor(self, *args, **kwargs):
        import multiprocessing
        import os

        if multiprocessing.parent_process() is not None:
            os.environ[envs.ENGINE_CORE_PID] = str(os.getpid())
        return original(self, *args, **kwargs)

    _init_executor._a2a_wrapped = True
    executor._init_executor = _init_executor


def _patch_sync_client_shutdown(module) -> None:
    """``SyncMPClient.shutdown``: a dead engine core wakes ``get_output``.

    vLLM's monitor sets ``resources.engine_dead`` and then calls ``shutdown()``;
    the output thread exits without queueing anything, so a caller blocked in
    ``get_output`` (``LLM.generate``) would wait forever. After the original
    shutdown, a dead client's queue gets ``EngineDeadError``, which
    ``get_output`` raises. A normal shutdown (engine alive) is unchanged."""
    client_class = module.SyncMPClient
    original = client_class.shutdown
    if getattr(original, "_a2a_wrapped", False):
        return

    @functools.wraps(original)
    def shutdown(self, *args, **kwargs):
        # Read before the original: its resource cleanup marks every client
        # dead, also on a normal shutdown.
        resources = getattr(self, "resources", None)
        engine_was_dead = resources is not None and resources.engine_dead
        try:
            return original(self, *args, **kwargs)
        finally:
            outputs = getattr(self, "outputs_queue", None)
            if engine_was_dead and outputs is not None:
                outputs.put_nowait(module.EngineDeadError())

    shutdown._a2a_wrapped = True
    client_class.shutdown = shutdown


# ------------------------------------------------------------ ParallelConfig
def _patch_parallel_config(parallel_module) -> None:
    """Extends vllm.config.parallel.ParallelConfig.all2all_backend's Literal."""
    import pydantic.dataclasses

    config_cls = parallel_module.ParallelConfig
    field = config_cls.__dataclass_fields__["all2all_backend"]
    names = get_args(field.type)
    if BACKEND_NAME not in names:
        extended = Literal[(*names, BACKEND_NAME)]  # type: ignore[valid-type]
        field.type = extended
        config_cls.__annotations__["all2all_backend"] = extended
        parallel_module.All2AllBackend = extended
        # The validator baked the old Literal in at import; rebuild it.
        pydantic.dataclasses.rebuild_dataclass(config_cls, force=True)
        _extend_engine_args(extended)

    original = config_cls.use_sequence_parallel_moe
    if not getattr(original.fget, "_a2a_wrapped", False):
        # Wraps ParallelConfig.use_sequence_parallel_moe: like the built-in
        # one-sided backend, EP with TP>1 and DP>1 shards tokens across TP ranks.
        @functools.wraps(original.fget)
        def use_sequence_parallel_moe(self):
            if self.all2all_backend == BACKEND_NAME:
                return (self.enable_expert_parallel and self.tensor_parallel_size > 1
                        and self.data_parallel_size > 1)
            return original.fget(self)

        use_sequence_parallel_moe._a2a_wrapped = True
        config_cls.use_sequence_parallel_moe = property(use_sequence_parallel_moe)


def _patch_vllm_config(vllm_module) -> None:
    """Wraps VllmConfig.__post_init__ past its micro-batching backend list."""
    config_cls = vllm_module.VllmConfig
    original = config_cls.__post_init__
    if getattr(original, "_a2a_wrapped", False):
        return

    @functools.wraps(original)
    def __post_init__(self, *args, **kwargs):
        parallel = self.parallel_config
        if parallel.all2all_backend != BACKEND_NAME or not parallel.use_ubatching:
            return original(self, *args, **kwargs)
        # object.__setattr__: no validation round trip for a name we put back.
        object.__setattr__(parallel, "all2all_backend", _MICRO_BATCHING_BACKEND_NAME)
        try:
            return original(self, *args, **kwargs)
        finally:
            object.__setattr__(parallel, "all2all_backend", BACKEND_NAME)

    __post_init__._a2a_wrapped = True
    config_cls.__post_init__ = __post_init__


def _extend_engine_args(extended) -> None:
    """EngineArgs mirrors the field; its CLI kwargs are cached per class."""
    arg_utils = sys.modules.get("vllm.engine.arg_utils")
    if arg_utils is None:
        return  # imported later, it reads the patched ParallelConfig then
    # arg_utils may be half-imported (it imports vllm.config, which brought us
    # here): then nothing is cached yet and EngineArgs is defined after this.
    engine_args = getattr(arg_utils, "EngineArgs", None)
    if engine_args is not None:
        engine_field = engine_args.__dataclass_fields__.get("all2all_backend")
        if engine_field is not None:
            engine_field.type = extended
    compute_kwargs = getattr(arg_utils, "_compute_kwargs", None)
    if compute_kwargs is not None:
        compute_kwargs.cache_clear()


# -------------------------------------------------------------- communicators
def _patch_communicator(class_name: str):
    def patch(module) -> None:
        """Wraps <Cuda|Cpu>Communicator.__init__ to build our all2all manager."""
        cls = getattr(module, class_name)
        original = cls.__init__
        if getattr(original, "_a2a_wrapped", False):
            return
        signature = inspect.signature(original)

        @functools.wraps(original)
        def __init__(self, *args, **kwargs):
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            wanted = bool(bound.arguments.get("use_all2all", False))
            parallel = _current_parallel_config()
            ours = parallel is not None and parallel.all2all_backend == BACKEND_NAME
            if ours:
                # Let vLLM build everything else; it must not pick a manager.
                bound.arguments["use_all2all"] = False
            original(*bound.args, **bound.kwargs)
            if ours:
                self.use_all2all = self.is_ep_communicator and wanted
                if self.use_all2all and not parallel.enable_expert_parallel:
                    # DP without EP would route MoE through the all-gather /
                    # reduce-scatter path, whose manager this is not: say so.
                    raise ValueError(
                        f"--all2all-backend {BACKEND_NAME} is an expert-parallel backend: add "
                        "--enable-expert-parallel, or use --all2all-backend "
                        "allgather_reducescatter for data parallelism without it")
                if self.use_all2all:
                    from vllm_a2a_plugin.vllm.manager import OneSidedAll2AllManager

                    self.all2all_manager = OneSidedAll2AllManager(
                        self.cpu_group, device=self.device)
                    logger.info("Using %s all2all manager.", OneSidedAll2AllManager.__name__)

        __init__._a2a_wrapped = True
        cls.__init__ = __init__

    return patch


def _current_parallel_config():
    """vLLM's ParallelConfig of the config being built, or None outside one."""
    from vllm.config import get_current_vllm_config_or_none

    config = get_current_vllm_config_or_none()
    return None if config is None else config.parallel_config


# ------------------------------------------------------------------- factory
def _patch_prepare_finalize_factory(module) -> None:
    """Wraps fused_moe.all2all_utils.maybe_make_prepare_finalize."""
    original = module.maybe_make_prepare_finalize
    if getattr(original, "_a2a_wrapped", False):
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def maybe_make_prepare_finalize(moe, quant_config, *args, **kwargs):
        parallel = moe.moe_parallel_config
        if parallel.all2all_backend == BACKEND_NAME and parallel.use_all2all_kernels:
            from vllm_a2a_plugin.vllm.prepare_finalize import make_prepare_finalize

            bound = signature.bind(moe, quant_config, *args, **kwargs)
            bound.apply_defaults()
            return make_prepare_finalize(
                moe, quant_config,
                all2all_manager=bound.arguments.get("all2all_manager"),
                input_dtype=bound.arguments.get("input_dtype"),
                use_monolithic=bool(bound.arguments.get("use_monolithic", False)),
            )
        return original(moe, quant_config, *args, **kwargs)

    maybe_make_prepare_finalize._a2a_wrapped = True
    module.maybe_make_prepare_finalize = maybe_make_prepare_finalize
    # Modules that already did `from ...all2all_utils import maybe_make_prepare_finalize`.
    for other in list(sys.modules.values()):
        namespace = getattr(other, "__dict__", None)
        if namespace is not None and namespace.get("maybe_make_prepare_finalize") is original:
            other.maybe_make_prepare_finalize = maybe_make_prepare_finalize
