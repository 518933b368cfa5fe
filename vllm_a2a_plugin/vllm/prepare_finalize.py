"""vLLM modular-kernel prepare/finalize over our one-sided all-to-all.

Built from an already-built all-to-all (the manager's), standard activation
format: ``prepare`` quantises (unless the experts take unquantised input),
dispatches hidden states, scales, top-k ids and weights, and hands the experts
``[ep_size * M, ...]`` receive views whose top-k ids are *global* ids with the
padding id of seed 002 (never -1) wherever the slot has no work for this rank.
``finalize`` honours the experts' ``weight_and_reduce_impl`` (unreduced
``(M, topk, K)`` output is weighted and reduced straight into the workspace),
then combines into ``output``.

Dual-batch overlap (``--enable-dbo``): vLLM splits a step into two micro-batches
that run on two host threads taking turns, on one compute stream and one comm
stream. Each micro-batch has its own all-to-all (its own workspace: receive
slots, flags and epochs), picked by ``dbo_current_ubatch_id()``. Dispatch and
combine run in a *comm region*: record the compute so far, hand the host to
the other micro-batch (which enqueues its compute), then launch our fused
kernel on the comm stream behind that recorded point, and make the compute
stream wait for it. So one micro-batch's all-to-all runs on the GPU while the
other's attention or experts run, and nothing else changes: the kernels, the
launch arguments, the synchronous path of steps that are not split.
``VLLM_A2A_DBO_SCHEDULE=recv_hooks`` takes DeepEP-low-latency's pattern instead
(``prepare_async`` / ``finalize_async``: the send launch on the compute stream,
the wait launch handed to vLLM as a receive hook that the other micro-batch
runs after its own work): it hides waiting for peers, not the data movement.
"""

from __future__ import annotations

import contextlib
import logging
from typing import NamedTuple

import torch
import vllm.model_executor.layers.fused_moe.modular_kernel as mk
from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig, FusedMoEQuantConfig
from vllm.model_executor.layers.fused_moe.topk_weight_and_reduce import (
    TopKWeightAndReduceContiguous,
    TopKWeightAndReduceDelegate,
    TopKWeightAndReduceNoOP,
)
from vllm.model_executor.layers.fused_moe.utils import moe_kernel_quantize_input
from vllm.v1.worker.ubatching import (
    dbo_current_ubatch_id,
    dbo_enabled,
    dbo_maybe_run_recv_hook,
    dbo_switch_to_compute_sync,
    dbo_yield_and_switch_from_compute_to_comm,
)

from vllm_a2a_plugin import envs
from vllm_a2a_plugin.all_to_all import PHASE_SEND, DispatchResult
from vllm_a2a_plugin.errors import A2AInputError
from vllm_a2a_plugin.padding import expert_owner_from_maps, padding_expert_id
from vllm_a2a_plugin.validation import is_capturing
from vllm_a2a_plugin.pool import MAX_MICRO_BATCHES
from vllm_a2a_plugin.vllm.compat import (activation_scales_transposed,
                                         modular_kernel_has_supports_dbo)
from vllm_a2a_plugin.workspace import AllToAllSpec

logger = logging.getLogger(__name__)

FP8_BLOCK = 128

# Host calls of prepare/finalize in this process (every layer, every step that
# runs Python: eager steps and CUDA-graph captures, not graph replays);
# `overlapped_prepare_calls` counts those made inside a split (DBO) step.
_HOST_CALLS = {"prepare_calls": 0, "finalize_calls": 0, "overlapped_prepare_calls": 0}


def host_call_counts() -> dict[str, int]:
    return dict(_HOST_CALLS)


class DispatchLayout(NamedTuple):
    """How a layer's activations travel.

    Attributes:
        dtype: dtype of the dispatched hidden states.
        scale_cols: float32 scales per token sent beside them (0: none).
        quantize_after_dispatch: dynamic per-tensor fp8: one scale per rank's
            batch cannot describe tokens that arrive from several ranks, so the
            hidden states travel unquantised and the receiving rank quantises
            what it received with one scale (DeepEP's prepare does the same).
    """

    dtype: torch.dtype
    scale_cols: int
    quantize_after_dispatch: bool = False


class _DispatchInputs(NamedTuple):
    """What one prepare sends (checked, quantised) and how to hand back the result."""

    all_to_all: object
    x: torch.Tensor
    ids: torch.Tensor
    weights: torch.Tensor
    scales: torch.Tensor | None
    x_scale: torch.Tensor | None
    m: int
    quantize_after: bool
    quant_config: FusedMoEQuantConfig


def dispatch_layout(hidden: int, quant_config: FusedMoEQuantConfig | None,
                    in_dtype: torch.dtype, defer_input_quant: bool) -> DispatchLayout:
    """How a layer's activations travel (see :class:`DispatchLayout`).

    bf16/fp16 activations travel as they are; fp8 1x128 block-quantised
    activations (DeepSeek-style checkpoints) travel as fp8 plus ``H / 128``
    scales; per-token fp8 as fp8 plus 1 scale; static per-tensor fp8 as fp8
    (the scale is the same on every rank); dynamic per-tensor fp8 (vLLM's
    ``quantization="fp8"``) unquantised, quantised after dispatch. Anything
    else is refused here, before a workspace is sized.
    """
    quant_dtype = None if quant_config is None or defer_input_quant else quant_config.quant_dtype
    if quant_dtype is None:
        if in_dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise A2AInputError(f"a2a_one_sided: unsupported activation dtype {in_dtype}")
        return DispatchLayout(in_dtype, 0)
    if quant_dtype == torch.float8_e4m3fn:
        if quant_config.block_shape is not None:
            if list(quant_config.block_shape)[-1] != FP8_BLOCK:
                raise A2AInputError(
                    f"a2a_one_sided: fp8 block shape {quant_config.block_shape} unsupported; "
                    f"activations must use 1x{FP8_BLOCK} blocks")
            if activation_scales_transposed(quant_config):
                raise A2AInputError(
                    "a2a_one_sided dispatches row-major [T, H/128] fp8 block scales; these "
                    "experts ask for transposed ones (FusedMoEQuantConfig.is_scale_transposed)")
            if hidden % FP8_BLOCK:
                raise A2AInputError(
                    f"a2a_one_sided: hidden size {hidden} must be divisible by {FP8_BLOCK} "
                    "for block-quantised fp8 dispatch")
            return DispatchLayout(torch.float8_e4m3fn, hidden // FP8_BLOCK)
        if quant_config.per_act_token_quant:
            return DispatchLayout(torch.float8_e4m3fn, 1)
        if quant_config.a1_scale is None:
            if in_dtype not in (torch.bfloat16, torch.float16, torch.float32):
                raise A2AInputError(f"a2a_one_sided: unsupported activation dtype {in_dtype}")
            return DispatchLayout(in_dtype, 0, quantize_after_dispatch=True)
        return DispatchLayout(torch.float8_e4m3fn, 0)
    raise A2AInputError(
        f"a2a_one_sided dispatches bf16/fp16 or fp8 (per-token, per-tensor, 1x128 blocks) "
        f"activations; got quant_dtype={quant_dtype!r}")


def quantize_received_per_tensor(recv: DispatchResult, quant_config: FusedMoEQuantConfig
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-tensor fp8 of what this rank received, one scale for all of it.

    Args:
        recv: this rank's dispatch result (unquantised ``recv_x [P * M, H]``).
        quant_config: the layer's per-tensor fp8 quantisation.

    Returns:
        ``([P * M, H]`` fp8, ``[1]`` float32 scale``)``. Rows of slots that carry
        no token for this rank hold whatever the buffer held; they are zeroed
        first so they cannot move the scale, and their padding ids keep the
        experts away from them.
    """
    x = recv.recv_x
    if x.shape[0] == 0:  # vLLM's quant kernels do not launch on [0, H]
        return (torch.empty(x.shape, dtype=quant_config.quant_dtype, device=x.device),
                torch.ones(1, dtype=torch.float32, device=x.device))
    carries_token = (recv.recv_topk_ids != recv.padding_id).any(dim=1, keepdim=True)
    x = torch.where(carries_token, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return moe_kernel_quantize_input(x, None, quant_config.quant_dtype,
                                     per_act_token_quant=False, block_shape=None)


def vllm_expert_owner(num_experts: int, ep_size: int) -> torch.Tensor:
    """``[num_experts]`` int32 EP rank of every (physical) expert, as vLLM places them.

    Built from vLLM's own ``determine_expert_map`` for every rank, so uneven
    splits (``E % EP`` extra experts on the first ranks) and EPLB's physical ids
    route exactly where vLLM put the weights. vLLM falls back to linear
    placement for every all2all backend that needs no round-robin routing
    tables (``determine_expert_placement_strategy``), ours included.
    """
    from vllm.model_executor.layers.fused_moe.expert_map_manager import determine_expert_map

    if ep_size == 1:
        return torch.zeros(num_experts, dtype=torch.int32, device="cpu")
    # determine_expert_map allocates on the default device; ours is a host table.
    with torch.device("cpu"):
        maps = [determine_expert_map(ep_size, rank, num_experts, "linear")[1]
                for rank in range(ep_size)]
    return expert_owner_from_maps(maps)


def quantize_for_dispatch(a1: torch.Tensor, quant_config: FusedMoEQuantConfig
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """vLLM's activation quantisation before dispatch, also on a rank with no tokens.

    Args:
        a1: ``[T, H]`` activations; ``T`` may be 0.
        quant_config: the layer's quantisation (fp8 per-token, 1x128 block, or
            static per-tensor with ``a1_scale``).

    Returns:
        ``([T, H]`` quantised, scales: ``[T, 1]`` / ``[T, H / 128]`` float32, or
        the static per-tensor scale).

    vLLM 0.32's dynamic per-token fp8 kernel fails to launch on ``[0, H]`` input
    (``CUDA error: invalid argument``, seen on an H100), and zero-token ranks
    are ours to support: an empty input gets empty outputs of the right dtypes
    and shapes without a launch.
    """
    if a1.shape[0] > 0:
        return moe_kernel_quantize_input(a1, quant_config.a1_scale, quant_config.quant_dtype,
                                         quant_config.per_act_token_quant,
                                         quant_config.block_shape)
    x = torch.empty(a1.shape, dtype=quant_config.quant_dtype, device=a1.device)
    if quant_config.a1_scale is not None:
        return x, quant_config.a1_scale
    cols = 1 if quant_config.per_act_token_quant else a1.shape[1] // quant_config.block_shape[1]
    return x, torch.empty((0, cols), dtype=torch.float32, device=a1.device)


class OneSidedPrepareAndFinalize(mk.FusedMoEPrepareAndFinalizeModular):
    """Prepare/finalize of one MoE layer on one EP rank.

    Args:
        manager: the EP group's :class:`OneSidedAll2AllManager`; it hands out the
            all-to-all (and workspace) for this layer's shape.
        moe: vLLM's layer config (hidden size, experts, top-k, dtype).
        quant_config: the layer's quantisation (decides the dispatch dtype).
        max_tokens_per_rank: workspace capacity (scheduler max_num_batched_tokens).
        input_dtype: set when the experts take unquantised activations.
        micro_batches: 2 when vLLM may split steps (dual-batch overlap): one
            all-to-all per micro-batch, all asked for now (allocation is
            collective and must not happen inside a forward).
    """

    def __init__(self, manager, moe: FusedMoEConfig, quant_config: FusedMoEQuantConfig | None,
                 *, max_tokens_per_rank: int, input_dtype: torch.dtype | None = None,
                 micro_batches: int = 1):
        super().__init__()
        if micro_batches not in range(1, MAX_MICRO_BATCHES + 1):
            raise A2AInputError(
                f"micro_batches must be 1 or {MAX_MICRO_BATCHES}, got {micro_batches}")
        self.manager = manager
        self.moe = moe
        self.quant_config = quant_config
        self.max_tokens_per_rank = max_tokens_per_rank
        self.micro_batches = micro_batches
        self.dbo_schedule = envs.dbo_schedule()
        self.num_dispatchers_ = manager.world_size
        self.num_experts = moe.num_experts
        self._expert_map_checked: int | None = None
        self._use_all_to_all(input_dtype)

    def _use_all_to_all(self, input_dtype: torch.dtype | None) -> None:
        moe = self.moe
        defer = input_dtype is not None
        self.layout = dispatch_layout(
            moe.hidden_dim, self.quant_config, input_dtype or moe.in_dtype, defer)
        combine_dtype = (moe.in_dtype if moe.in_dtype in (torch.bfloat16, torch.float16,
                                                          torch.float32) else torch.bfloat16)
        self.spec = AllToAllSpec(
            ep_size=self.manager.world_size, max_tokens_per_rank=self.max_tokens_per_rank,
            hidden_size=moe.hidden_dim, top_k=moe.experts_per_token, num_experts=moe.num_experts,
            dispatch_dtype=self.layout.dtype, scale_cols=self.layout.scale_cols,
            combine_dtype=combine_dtype)
        self.expert_owner = vllm_expert_owner(moe.num_experts, self.manager.world_size)
        self.all_to_alls = [
            self.manager.all_to_all(self.spec, expert_owner=self.expert_owner, micro_batch=i)
            for i in range(self.micro_batches)]

    @property
    def all_to_all(self):
        """The all-to-all of the running micro-batch (the only one outside DBO)."""
        if self.micro_batches == 1:
            return self.all_to_alls[0]
        return self.all_to_alls[dbo_current_ubatch_id()]

    @contextlib.contextmanager
    def _comm_region(self):
        """Runs the body on the comm stream while the other micro-batch computes.

        Outside a split step (or with one micro-batch) it runs the body where
        it is. Inside one: record this micro-batch's compute, let the other
        micro-batch's thread enqueue its work, switch to the comm stream behind
        the recorded point, run the body (our fused launch), then make the
        compute stream wait for it. Both micro-batches go through the same
        regions in the same order, so their threads yield equally often (vLLM's
        turn-taking needs that). Tensors made before the region are read on the
        comm stream; their memory is safe: everything enqueued on the compute
        stream after the region waits for it.
        """
        if self.micro_batches == 1 or not dbo_enabled():
            yield
            return
        dbo_yield_and_switch_from_compute_to_comm()
        try:
            yield
        finally:
            dbo_switch_to_compute_sync()

    def post_init_setup(self, fused_experts) -> None:
        """Experts that quantise themselves get unquantised activations dispatched."""
        if (fused_experts.expects_unquantized_inputs
                and self.spec.dispatch_dtype == torch.float8_e4m3fn):
            self._use_all_to_all(self.moe.in_dtype)

    @property
    def activation_format(self) -> mk.FusedMoEActivationFormat:
        return mk.FusedMoEActivationFormat.Standard

    def topk_indices_dtype(self) -> torch.dtype | None:
        return torch.int32

    def max_num_tokens_per_rank(self) -> int | None:
        return None

    def num_dispatchers(self) -> int:
        return self.num_dispatchers_

    def output_is_reduced(self) -> bool:
        return True

    def supports_async(self) -> bool:
        if self.micro_batches == 1:
            return False
        # The receive-hook schedule is vLLM's async path. The comm-stream one
        # is a synchronous prepare/finalize that 0.33 runs under DBO through
        # supports_dbo(); 0.32 has no supports_dbo() and asserts DBO off on the
        # synchronous path, so there the async entry points carry it. Only
        # where steps may be split: elsewhere the modular kernel's ordering
        # (shared experts, hooks) stays what it was.
        return self.dbo_schedule == "recv_hooks" or not modular_kernel_has_supports_dbo()

    def supports_dbo(self) -> bool:
        return True

    def _splits_with_hooks(self) -> bool:
        return self.micro_batches > 1 and self.dbo_schedule == "recv_hooks" and dbo_enabled()

    def prepare_async(self, a1: torch.Tensor, topk_weights: torch.Tensor,
                      topk_ids: torch.Tensor, num_experts: int, expert_map: torch.Tensor | None,
                      apply_router_weight_on_input: bool, quant_config: FusedMoEQuantConfig,
                      defer_input_quant: bool = False):
        """vLLM's async prepare: ``(hook, receiver)`` or a receiver alone.

        Receive-hook schedule in a split step: the send launch now, the wait
        launch in ``hook`` (vLLM hands it to the other micro-batch, which runs it
        after its own work), the received views from ``receiver``. Otherwise
        :meth:`prepare` runs now (comm-stream regions included) and the
        receiver hands out its result.
        """
        args = (a1, topk_weights, topk_ids, num_experts, expert_map,
                apply_router_weight_on_input, quant_config, defer_input_quant)
        if not self._splits_with_hooks():
            result = self.prepare(*args)
            return lambda: result
        send = self._dispatch_inputs(*args)
        send.all_to_all.dispatch(send.x, send.ids, send.weights, x_scales=send.scales,
                                 runtime_max_tokens=send.m, phases=PHASE_SEND)
        received: list[DispatchResult] = []

        def hook() -> None:
            received.append(send.all_to_all.wait_dispatch())

        return hook, lambda: self._prepare_result(send, received[0])

    def finalize_async(self, output: torch.Tensor, fused_expert_output: torch.Tensor,
                       topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                       apply_router_weight_on_input: bool,
                       weight_and_reduce_impl: mk.TopKWeightAndReduce):
        """vLLM's async finalize: ``(hook, receiver)``.

        Receive-hook schedule in a split step: first the other micro-batch's
        pending hook (its dispatch wait: it must be enqueued before that
        micro-batch resumes and reads its received rows, as DeepEP-LL's finalize
        does), then the combine's send launch; ``hook`` is the wait launch that
        writes ``output``. Otherwise :meth:`finalize` runs now and there is no hook.
        """
        args = (output, fused_expert_output, topk_weights, topk_ids,
                apply_router_weight_on_input, weight_and_reduce_impl)
        if not self._splits_with_hooks():
            self.finalize(*args)
            return None, lambda: None
        dbo_maybe_run_recv_hook()
        all_to_all = self._reduce_into_workspace(*args[1:])
        direct = self._combines_into(output)
        all_to_all.combine(out=output if direct else None, phases=PHASE_SEND)

        def hook() -> None:
            combined = all_to_all.wait_combine()
            if not direct:
                output.copy_(combined)

        return hook, lambda: None

    # ---------------------------------------------------------------- prepare
    def _runtime_max_tokens(self, num_tokens: int) -> int:
        """M of this step: the largest DP chunk (identical on every EP rank).

        Without DP metadata (no forward context, PCP only) every rank falls
        back to the workspace capacity, which is also identical everywhere.
        """
        from vllm.forward_context import get_forward_context, is_forward_context_available

        if self.spec.ep_size == 1:
            return num_tokens  # no peer to agree with: move only this step's tokens
        if is_forward_context_available():
            dp_metadata = get_forward_context().dp_metadata
            if dp_metadata is not None and dp_metadata.local_sizes is not None:
                runtime = max(dp_metadata.get_chunk_sizes_across_dp_rank())
                if runtime > self.spec.max_tokens_per_rank:
                    raise A2AInputError(
                        f"a DP rank has {runtime} tokens in this MoE call but the a2a_one_sided "
                        f"workspace holds {self.spec.max_tokens_per_rank} per rank "
                        "(scheduler max_num_batched_tokens)")
                if num_tokens > runtime:
                    raise A2AInputError(
                        f"this rank has {num_tokens} tokens but vLLM's DP metadata says the "
                        f"largest rank has {runtime}")
                return runtime
        return self.spec.max_tokens_per_rank

    def _check_expert_map(self, expert_map: torch.Tensor | None) -> None:
        """Once per map: our owner table must agree with vLLM's placement, and
        the padding id must be the seed-002 one (an expert another rank owns)."""
        if expert_map is None or is_capturing():
            return
        key = expert_map.data_ptr()
        if self._expert_map_checked == key:
            return
        rank = self.all_to_all.rank
        local_by_map = expert_map.detach().cpu() != -1
        local_by_owner = self.expert_owner.to(torch.int64) == rank
        if not torch.equal(local_by_map, local_by_owner):
            raise A2AInputError(
                f"EP rank {rank}: vLLM's expert_map places experts "
                f"{torch.nonzero(local_by_map).flatten().tolist()[:8]}... here, but a2a_one_sided "
                "routes by vLLM's linear placement "
                f"{torch.nonzero(local_by_owner).flatten().tolist()[:8]}...; use "
                "--expert-placement-strategy linear")
        pad = padding_expert_id(expert_map, self.num_experts)
        if pad != self.all_to_all.padding_id:
            raise A2AInputError(
                f"padding id {self.all_to_all.padding_id} disagrees with the expert map's {pad}")
        self._expert_map_checked = key

    def _dispatch_inputs(self, a1: torch.Tensor, topk_weights: torch.Tensor,
                         topk_ids: torch.Tensor, num_experts: int,
                         expert_map: torch.Tensor | None, apply_router_weight_on_input: bool,
                         quant_config: FusedMoEQuantConfig,
                         defer_input_quant: bool = False) -> "_DispatchInputs":
        """Everything prepare sends, checked and quantised (no launch)."""
        _HOST_CALLS["prepare_calls"] += 1
        if num_experts != self.num_experts:
            raise A2AInputError(f"num_experts {num_experts} != the layer's {self.num_experts}")
        self._check_expert_map(expert_map)
        if apply_router_weight_on_input:
            if topk_ids.shape[1] != 1:
                raise A2AInputError("apply_router_weight_on_input needs top_k == 1")
            # Not in place: a1 is the caller's hidden states.
            a1 = a1 * topk_weights.to(a1.dtype)
        quantize_after = self.layout.quantize_after_dispatch and not defer_input_quant
        if defer_input_quant or quant_config.quant_dtype is None or quantize_after:
            x, x_scale = a1, None
        else:
            x, x_scale = quantize_for_dispatch(a1, quant_config)
        scales = None
        if self.spec.scale_cols:
            scales = x_scale.to(torch.float32).reshape(x.shape[0], self.spec.scale_cols)
            scales = scales.contiguous()
        ids = topk_ids if topk_ids.dtype == torch.int32 else topk_ids.to(torch.int32)
        weights = topk_weights if topk_weights.dtype == torch.float32 else topk_weights.float()
        if self.micro_batches > 1 and dbo_enabled():
            _HOST_CALLS["overlapped_prepare_calls"] += 1
        return _DispatchInputs(
            all_to_all=self.all_to_all, x=x.contiguous(), ids=ids.contiguous(),
            weights=weights.contiguous(), scales=scales, x_scale=x_scale,
            m=self._runtime_max_tokens(x.shape[0]), quantize_after=quantize_after,
            quant_config=quant_config)

    @staticmethod
    def _prepare_result(send: "_DispatchInputs", result: DispatchResult) -> mk.PrepareResultType:
        """What prepare returns to the experts, from what this rank received."""
        if send.quantize_after:
            recv_x, recv_scale = quantize_received_per_tensor(result, send.quant_config)
            return recv_x, recv_scale, None, result.recv_topk_ids, result.recv_topk_weights
        recv_scale = result.recv_x_scales
        if recv_scale is None and send.x_scale is not None:
            recv_scale = send.x_scale  # per-tensor scale: the same on every rank
        return result.recv_x, recv_scale, None, result.recv_topk_ids, result.recv_topk_weights

    def prepare(self, a1: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                num_experts: int, expert_map: torch.Tensor | None,
                apply_router_weight_on_input: bool, quant_config: FusedMoEQuantConfig,
                defer_input_quant: bool = False) -> mk.PrepareResultType:
        send = self._dispatch_inputs(a1, topk_weights, topk_ids, num_experts, expert_map,
                                     apply_router_weight_on_input, quant_config,
                                     defer_input_quant)
        with self._comm_region():
            result = send.all_to_all.dispatch(send.x, send.ids, send.weights,
                                              x_scales=send.scales, runtime_max_tokens=send.m)
        return self._prepare_result(send, result)

    # --------------------------------------------------------------- finalize
    def allocate_fused_expert_output(self, shape, dtype, device, weight_and_reduce_impl):
        """Experts that reduce themselves write straight into the workspace."""
        if not isinstance(weight_and_reduce_impl, TopKWeightAndReduceNoOP):
            return None
        target = self.all_to_all.combine_input()
        if tuple(shape) == tuple(target.shape) and dtype == target.dtype and \
                torch.device(device) == target.device:
            return target
        return None

    def _reduce_into_workspace(self, fused_expert_output: torch.Tensor,
                               topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                               apply_router_weight_on_input: bool,
                               weight_and_reduce_impl: mk.TopKWeightAndReduce):
        """The experts' output weighted and reduced into this micro-batch's
        combine input (unless the experts wrote it there); its all-to-all."""
        _HOST_CALLS["finalize_calls"] += 1
        all_to_all = self.all_to_all
        y = all_to_all.combine_input()
        if isinstance(weight_and_reduce_impl, TopKWeightAndReduceDelegate):
            weight_and_reduce_impl = TopKWeightAndReduceContiguous()
        if fused_expert_output.data_ptr() != y.data_ptr():
            # Weights of padded slots are 0, so foreign experts contribute nothing.
            if (isinstance(weight_and_reduce_impl, TopKWeightAndReduceContiguous)
                    and y.device.type == "cpu"):
                _weight_and_reduce_cpu(y, fused_expert_output, topk_weights,
                                       apply_router_weight_on_input)
            else:
                weight_and_reduce_impl.apply(
                    output=y, fused_expert_output=fused_expert_output,
                    topk_weights=topk_weights, topk_ids=topk_ids,
                    apply_router_weight_on_input=apply_router_weight_on_input)
        return all_to_all

    def _combines_into(self, output: torch.Tensor) -> bool:
        """Whether combine can write ``output`` itself (else: ours, then a copy)."""
        return output.dtype == self.spec.combine_dtype and output.is_contiguous()

    def finalize(self, output: torch.Tensor, fused_expert_output: torch.Tensor,
                 topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                 apply_router_weight_on_input: bool,
                 weight_and_reduce_impl: mk.TopKWeightAndReduce) -> None:
        all_to_all = self._reduce_into_workspace(fused_expert_output, topk_weights, topk_ids,
                                                 apply_router_weight_on_input,
                                                 weight_and_reduce_impl)
        direct = self._combines_into(output)
        with self._comm_region():
            combined = all_to_all.combine(out=output if direct else None)
        if not direct:
            output.copy_(combined)


def _weight_and_reduce_cpu(y: torch.Tensor, fused: torch.Tensor, topk_weights: torch.Tensor,
                           apply_router_weight_on_input: bool) -> None:
    """TopKWeightAndReduceContiguous's math for CPU, where vLLM's moe_sum op
    (a CUDA build's compiled op) is missing: ``y = sum_k w[:, k] * fused[:, k]``."""
    fused = fused.view(y.shape[0], -1, y.shape[1]).float()
    if not apply_router_weight_on_input:
        fused = fused * topk_weights.view(y.shape[0], -1, 1).float()
    y.copy_(fused.sum(dim=1))


def make_prepare_finalize(moe: FusedMoEConfig, quant_config: FusedMoEQuantConfig | None, *,
                          all2all_manager=None, input_dtype: torch.dtype | None = None,
                          use_monolithic: bool = False) -> OneSidedPrepareAndFinalize:
    """What vLLM's factory returns for ``--all2all-backend a2a_one_sided``."""
    if use_monolithic:
        raise A2AInputError(
            "a2a_one_sided implements the modular prepare/finalize; the selected MoE "
            "experts are monolithic. Pick another --moe-backend or all2all backend.")
    if all2all_manager is None:
        from vllm_a2a_plugin.vllm.manager import ep_manager

        all2all_manager = ep_manager()
    from vllm.config import get_current_vllm_config_or_none

    config = get_current_vllm_config_or_none()
    # Like vLLM's one-sided backend: one MoE call carries up to the scheduler's
    # token budget per DP rank (0.32 has no DP chunking).
    max_tokens = (config.scheduler_config.max_num_batched_tokens
                  if config is not None else moe.max_num_tokens)
    # Steps may be split in two micro-batches (--enable-dbo, or --ubatch-size 2).
    micro_batches = config.parallel_config.num_ubatches \
        if config is not None and config.parallel_config.use_ubatching else 1
    if micro_batches > MAX_MICRO_BATCHES:
        raise A2AInputError(
            f"a2a_one_sided overlaps at most {MAX_MICRO_BATCHES} micro-batches; this config "
            f"splits steps into {micro_batches} (--ubatch-size)")
    return OneSidedPrepareAndFinalize(all2all_manager, moe, quant_config,
                                      max_tokens_per_rank=max_tokens, input_dtype=input_dtype,
                                      micro_batches=micro_batches)
