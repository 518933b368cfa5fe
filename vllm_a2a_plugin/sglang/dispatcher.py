"""SGLang ``BaseDispatcher`` over our one-sided all-to-all (a thin adapter).

``dispatch`` sends this rank's tokens (bf16/fp16, or fp8 with 1x128 block
scales) to the EP ranks owning their experts and hands SGLang's MoE runner the
received slots in SGLang's STANDARD format: ``[ep_size * M, H]`` hidden states
and ``[ep_size * M, K]`` top-k ids and weights, where ``M`` (runtime max tokens)
is the same on every EP rank. Ids are converted exactly as SGLang's own
``StandardDispatcher`` converts them for the runner: local ids with ``-1`` for
experts of other ranks (Triton, DeepGEMM, ...), or global ids for runners that
keep them. Slots without work carry the padding id of design §5 (an expert of
another rank, never ``-1``; see :mod:`vllm_a2a_plugin.padding`) and weight 0,
so the conversion is a table lookup that never indexes with ``-1``.
``combine`` sums every token's partial results from the ranks it went to.

Workspaces come from :class:`~vllm_a2a_plugin.pool.AllToAllPool` (one per
process and EP group, shared by layers of one shape): on CUDA our kernels, on
CPU the reference all-to-all over the EP group's gloo group.

CUDA graphs: ``M`` comes from host values SGLang already holds (DP-attention
global token counts), the id check is off by default, and every buffer is
preallocated per layer, so capture sees no host sync and replays no allocation
beyond torch's caching allocator.

Two-batch overlap (``--enable-two-batch-overlap``): SGLang's TBO splits a step
into two micro-batches and drives each MoE layer through the two-stage
interface ``dispatch_a`` (send) / ``dispatch_b`` (wait) / ``combine_a`` /
``combine_b``, passing ``tbo_subbatch_index`` (0 or 1) to every call and
interleaving the micro-batches (``a_0, a_1, b_0, b_1, ...``). Where SGLang's
DeepEP-family dispatchers keep one inner dispatcher (one buffer) per
micro-batch, this one keeps one all-to-all (one workspace) per micro-batch,
requested from the pool at construction, so two rounds in flight never share
a workspace.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from sglang.srt.layers.moe.token_dispatcher.base import (
    BaseDispatcher,
    CombineInput,
    CombineInputFormat,
)
from sglang.srt.layers.moe.token_dispatcher.standard import (
    StandardDispatchOutput,
    _keeps_global_expert_ids,
)
from sglang.srt.layers.moe.topk import StandardTopKOutput, TopKOutput, TopKOutputChecker

from vllm_a2a_plugin import BACKEND_NAME, envs
from vllm_a2a_plugin.all_to_all import PHASE_BOTH, PHASE_SEND
from vllm_a2a_plugin.errors import A2AInputError, A2AStateError
from vllm_a2a_plugin.padding import linear_expert_owner
from vllm_a2a_plugin.pool import AllToAllPool
from vllm_a2a_plugin.validation import is_capturing
from vllm_a2a_plugin.workspace import AllToAllSpec

logger = logging.getLogger(__name__)

FP8_BLOCK = 128
FP8_MAX = 448.0  # largest finite float8_e4m3fn

# One pool per (EP group, device) in this process, created on first use.
_POOLS: dict[tuple[int, str], AllToAllPool] = {}


def pool_for(cpu_group, device: torch.device) -> AllToAllPool:
    """This process's :class:`AllToAllPool` of ``cpu_group`` on ``device``."""
    key = (id(cpu_group), str(device))
    pool = _POOLS.get(key)
    if pool is None:
        pool = _POOLS[key] = AllToAllPool(cpu_group, device=device, config=envs.engine_config())
    return pool


def destroy_pools() -> None:
    """Free every workspace of this process (collective over each EP group)."""
    for key in list(_POOLS):
        _POOLS.pop(key).destroy()


@dataclass(frozen=True)
class EpPlacement:
    """Where this dispatcher runs: the EP group and the DP-attention geometry.

    Attributes:
        cpu_group: the EP group's CPU (gloo) process group.
        rank, size: this rank and the EP group's size.
        device: this rank's device.
        attn_tp_size: attention-TP ranks per DP rank (each sends
            ``ceil(tokens / attn_tp_size)`` of its DP rank's tokens).
        max_tokens_per_rank: workspace capacity per rank and step.
    """

    cpu_group: object
    rank: int
    size: int
    device: torch.device
    attn_tp_size: int
    max_tokens_per_rank: int


def quantize_fp8_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic 1x128 block fp8 quantisation (DeepSeek-V3 activations).

    Args:
        x: ``[T, H]`` bf16/fp16/fp32, ``H % 128 == 0``; ``T`` may be 0.

    Returns:
        ``[T, H]`` float8_e4m3fn and ``[T, H / 128]`` float32 scales
        (``x ~= q * scale`` per block).
    """
    tokens, hidden = x.shape
    blocks = x.float().view(tokens, hidden // FP8_BLOCK, FP8_BLOCK)
    amax = blocks.abs().amax(dim=-1)
    # Written into a fresh [T, H / 128] tensor: a reduction over zero rows can
    # carry stride 0, which byte views of the payload refuse.
    scales = torch.empty((tokens, hidden // FP8_BLOCK), dtype=torch.float32, device=x.device)
    torch.div(amax.clamp(min=1e-10), FP8_MAX, out=scales)
    q = (blocks / scales.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(tokens, hidden), scales


def dequantize_fp8_blocks(q: torch.Tensor, scales: torch.Tensor, *, out: torch.Tensor
                          ) -> torch.Tensor:
    """``out[t, b*128:(b+1)*128] = q[t, b*128:(b+1)*128] * scales[t, b]`` (in place)."""
    rows, hidden = q.shape
    blocks = q.view(rows, hidden // FP8_BLOCK, FP8_BLOCK).float() * scales.unsqueeze(-1)
    out.view(rows, hidden // FP8_BLOCK, FP8_BLOCK).copy_(blocks)
    return out


def runtime_max_tokens(num_tokens: int, dp_global_num_tokens: list[int] | None,
                       attn_tp_size: int, ep_size: int) -> int:
    """``M`` of one step, identical on every EP rank.

    With DP attention SGLang's global token counts (one per DP rank, the same
    list on every rank) give ``ceil(max / attn_tp_size)``: every EP source's
    share. Without them every EP rank holds the same tokens (SP attention, or
    one EP rank), so ``num_tokens`` is already rank-uniform. Mirrors SGLang's
    flashinfer dispatcher, which bakes the same value into CUDA graphs.
    """
    if dp_global_num_tokens is not None and len(dp_global_num_tokens) > 1:
        return math.ceil(max(dp_global_num_tokens) / attn_tp_size)
    if ep_size > 1 and _dp_attention_enabled():
        raise A2AInputError(
            f"{BACKEND_NAME}: DP attention is on but SGLang gave no per-DP-rank token "
            "counts, so the step's max tokens would differ between EP ranks")
    return num_tokens


def _dp_attention_enabled() -> bool:
    """DP attention per the runtime flag (set when SGLang initialises DP
    attention) or the published parallel config (set from the server args)."""
    from sglang.srt.layers.dp_attention import is_dp_attention_enabled
    from sglang.srt.runtime_context import get_parallel

    try:
        if is_dp_attention_enabled():
            return True
    except (ValueError, RuntimeError, AttributeError):  # nothing published (standalone use)
        pass
    try:
        return bool(get_parallel().attn_dp_enabled)
    except (ValueError, RuntimeError, AttributeError):
        return False


class OneSidedDispatcher(BaseDispatcher):
    """Dispatch/combine of one MoE layer on one EP rank.

    Args:
        placement: the EP group and geometry (:meth:`from_sglang` reads it from
            SGLang's parallel state).
        num_experts: global experts ``E`` (linear placement: rank ``r`` owns
            ``[r * E / P, (r + 1) * E / P)``, as SGLang's StandardDispatcher).
        hidden_size, top_k: the layer's ``H`` and ``K``.
        params_dtype: activation dtype (bf16/fp16/fp32); combine runs in it.
        runner_backend: SGLang's runner backend (decides local vs global ids).
        all_to_all: an already-built all-to-all of ``placement.rank`` (several
            logical ranks on one GPU: :class:`~vllm_a2a_plugin.LocalRanks`);
            default: this process's pool hands one out.
        dispatch_fp8: send fp8 with 1x128 block scales instead of
            ``params_dtype`` (for 128x128 block-fp8 checkpoints); the receiver
            dequantises into a preallocated buffer, since SGLang's STANDARD
            format carries hidden states in the activation dtype and the runner
            quantises them per 1x128 block again (near-lossless).
        micro_batches: 1, or 2 under SGLang's two-batch overlap: one all-to-all
            (workspace) per micro-batch, keyed by ``tbo_subbatch_index``.
        all_to_all: with ``micro_batches=2``, a sequence of two all-to-alls.
    """

    def __init__(self, placement: EpPlacement, *, num_experts: int, hidden_size: int,
                 top_k: int, params_dtype: torch.dtype = torch.bfloat16,
                 runner_backend=None, dispatch_fp8: bool = False, all_to_all=None,
                 micro_batches: int = 1):
        super().__init__()
        if micro_batches not in (1, 2):
            raise A2AInputError(f"micro_batches must be 1 or 2 (two-batch overlap), got "
                                f"{micro_batches}")
        if params_dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise A2AInputError(
                f"{BACKEND_NAME} dispatches bf16/fp16/fp32 activations (or fp8 1x128 blocks of "
                f"them); the layer's activation dtype is {params_dtype}")
        if num_experts % placement.size:
            raise A2AInputError(
                f"num_experts ({num_experts}) must be divisible by the EP size "
                f"({placement.size}): SGLang places E / EP experts on every rank")
        if dispatch_fp8 and hidden_size % FP8_BLOCK:
            raise A2AInputError(
                f"hidden size {hidden_size} must be divisible by {FP8_BLOCK} for 1x{FP8_BLOCK} "
                "block fp8 dispatch")
        self.placement = placement
        self.runner_backend = runner_backend
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.top_k = top_k
        self.params_dtype = params_dtype
        self.dispatch_fp8 = dispatch_fp8
        self.keeps_global_ids = _keeps_global_expert_ids(runner_backend)
        device = placement.device
        self.spec = AllToAllSpec(
            ep_size=placement.size, max_tokens_per_rank=placement.max_tokens_per_rank,
            hidden_size=hidden_size, top_k=top_k, num_experts=num_experts,
            dispatch_dtype=torch.float8_e4m3fn if dispatch_fp8 else params_dtype,
            scale_cols=hidden_size // FP8_BLOCK if dispatch_fp8 else 0,
            combine_dtype=params_dtype)
        self.expert_owner = linear_expert_owner(num_experts, placement.size)
        if all_to_all is None:
            # Collective: every EP rank builds its layers in the same order and
            # asks for the same micro-batches (both now, never lazily in a
            # forward, where ranks could diverge).
            pool = pool_for(placement.cpu_group, device)
            all_to_alls = tuple(pool.all_to_all(self.spec, expert_owner=self.expert_owner,
                                                micro_batch=index)
                                for index in range(micro_batches))
        else:
            all_to_alls = (tuple(all_to_all) if isinstance(all_to_all, (tuple, list))
                           else (all_to_all,))
            if len(all_to_alls) != micro_batches:
                raise A2AInputError(f"{micro_batches} micro-batch(es) need as many all-to-alls, "
                                    f"got {len(all_to_alls)}")
            for given in all_to_alls:
                if given.spec != self.spec:
                    raise A2AInputError(f"the given all-to-all carries {given.spec}, this "
                                        f"layer needs {self.spec}")
        if len({id(a2a) for a2a in all_to_alls}) != len(all_to_alls):
            raise A2AInputError("two micro-batches in flight need two workspaces; both got "
                                "the same all-to-all")
        self.micro_batches = micro_batches
        self.all_to_alls = all_to_alls
        self.all_to_all = all_to_alls[0]
        self.padding_id = self.all_to_all.padding_id
        # Global id -> this rank's local id, -1 for other ranks' experts; one
        # extra entry for the padding id E (used when this rank owns them all).
        owner = self.expert_owner.to(torch.int64)
        local_of = torch.full((num_experts + 1,), -1, dtype=torch.int32, device="cpu")
        mine = torch.nonzero(owner == placement.rank).flatten()
        local_of[mine] = torch.arange(mine.numel(), dtype=torch.int32, device="cpu")
        self.num_local_experts = int(mine.numel())
        self._local_id_of = local_of.to(device)
        slots = placement.size * placement.max_tokens_per_rank
        # Runner-side ids and dequantised hidden states, preallocated at capacity
        # and sliced per step (views: no allocation while serving).
        self._runner_ids = torch.empty((slots, top_k), dtype=torch.int32, device=device)
        self._dequantized = (torch.empty((slots, hidden_size), dtype=params_dtype, device=device)
                             if dispatch_fp8 else None)
        # Per micro-batch: tokens of the round in flight (None when idle). The
        # runner-side buffers above are shared by the micro-batches: a
        # micro-batch's runner reads them between its dispatch_b and combine_a,
        # which SGLang's TBO strategies run in one stage on one stream (the
        # other micro-batch's dispatch_b never falls inside; checked).
        self._dispatched_tokens: list[int | None] = [None] * micro_batches
        self._runner_owner: int | None = None

    @classmethod
    def from_sglang(cls, moe_runner_config, quant_method) -> "OneSidedDispatcher":
        """What SGLang's ``create_moe_dispatcher`` returns for our backend."""
        from sglang.srt.arg_groups.overrides import flashinfer_a2a_max_dispatch_tokens_per_rank
        from sglang.srt.distributed.parallel_state import get_moe_ep_group
        from sglang.srt.layers.moe.utils import is_tbo_enabled
        from sglang.srt.runtime_context import get_parallel, max_prefill_buffer_tokens

        if moe_runner_config.num_fused_shared_experts:
            raise A2AInputError(
                f"{BACKEND_NAME} routes experts by owner rank; fused shared experts need "
                "--disable-shared-experts-fusion (set automatically for this backend)")
        ep_group = get_moe_ep_group()
        device = torch.device("cuda", torch.cuda.current_device()) \
            if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda" and ep_group.world_size > torch.cuda.device_count():
            raise A2AInputError(
                f"{BACKEND_NAME} needs every EP rank on one NVLink domain (one node); this EP "
                f"group has {ep_group.world_size} ranks and the node {torch.cuda.device_count()} "
                "GPUs")
        # SGLang's shared bound for one-sided workspaces: the largest eager
        # prefill chunk and decode batch (SGLANG_FLASHINFER_NUM_MAX_DISPATCH_
        # TOKENS_PER_RANK overrides it, as for flashinfer's all-to-all).
        capacity = flashinfer_a2a_max_dispatch_tokens_per_rank(max_prefill_buffer_tokens())
        placement = EpPlacement(
            cpu_group=ep_group.cpu_group, rank=ep_group.rank_in_group,
            size=ep_group.world_size, device=device,
            attn_tp_size=get_parallel().attn_tp_size, max_tokens_per_rank=capacity)
        return cls(placement, num_experts=moe_runner_config.num_experts,
                   hidden_size=moe_runner_config.hidden_size, top_k=moe_runner_config.top_k,
                   params_dtype=moe_runner_config.params_dtype or torch.bfloat16,
                   runner_backend=moe_runner_config.runner_backend,
                   dispatch_fp8=dispatches_fp8(quant_method),
                   micro_batches=2 if is_tbo_enabled() else 1)

    # ---------------------------------------------------------------- dispatch
    def dispatch(self, hidden_states: torch.Tensor, topk_output: TopKOutput, *,
                 phases: int = PHASE_BOTH,
                 tbo_subbatch_index: int | None = None) -> StandardDispatchOutput | None:
        """Send ``[T, H]`` tokens with their top-k routing; ``T`` may be 0.

        ``phases=PHASE_SEND`` returns None; :meth:`dispatch_wait` then gives
        the output. SGLang calls the fused default, or, under two-batch overlap,
        :meth:`dispatch_a` / :meth:`dispatch_b`.

        Returns:
            STANDARD output: hidden states ``[P * M, H]`` (activation dtype),
            top-k weights ``[P * M, K]`` float32 (0 on padded slots) and ids
            ``[P * M, K]`` int32 in the runner's convention.
        """
        from sglang.srt.layers.dp_attention import get_dp_global_num_tokens

        index = self._micro_batch(tbo_subbatch_index)
        if TopKOutputChecker.format_is_bypassed(topk_output):
            topk_output = topk_output.to_standard()
        if not TopKOutputChecker.format_is_standard(topk_output):
            raise A2AInputError(
                f"{BACKEND_NAME} needs materialised top-k routing, got "
                f"{type(topk_output).__name__}")
        if hidden_states.dtype != self.params_dtype:
            raise A2AInputError(f"hidden states are {hidden_states.dtype}, the layer's "
                                f"activation dtype is {self.params_dtype}")
        if self._dispatched_tokens[index] is not None:
            raise A2AStateError(f"micro-batch {index}: dispatch() called again before its "
                                "combine()")
        num_tokens = hidden_states.shape[0]
        global_counts = get_dp_global_num_tokens()
        if tbo_subbatch_index is not None and global_counts is None:
            m = self._micro_batch_max_tokens(num_tokens)
        else:
            m = runtime_max_tokens(num_tokens, global_counts, self.placement.attn_tp_size,
                                   self.placement.size)
        if m > self.spec.max_tokens_per_rank:
            raise A2AInputError(
                f"this step needs {m} tokens per EP rank but the {BACKEND_NAME} workspace holds "
                f"{self.spec.max_tokens_per_rank} (SGLang's prefill/decode bound; raise "
                "SGLANG_FLASHINFER_NUM_MAX_DISPATCH_TOKENS_PER_RANK)")
        ids = topk_output.topk_ids
        ids = ids if ids.dtype == torch.int32 else ids.to(torch.int32)
        weights = topk_output.topk_weights
        weights = weights if weights.dtype == torch.float32 else weights.float()
        x, scales = hidden_states, None
        if self.dispatch_fp8:
            x, scales = quantize_fp8_blocks(hidden_states)
        all_to_all = self.all_to_alls[index]
        if phases == PHASE_SEND:
            all_to_all.dispatch(x.contiguous(), ids.contiguous(), weights.contiguous(),
                                x_scales=scales, runtime_max_tokens=m, phases=PHASE_SEND)
            self._dispatched_tokens[index] = num_tokens
            return None
        received = all_to_all.dispatch(
            x.contiguous(), ids.contiguous(), weights.contiguous(), x_scales=scales,
            runtime_max_tokens=m)
        self._dispatched_tokens[index] = num_tokens
        return self._standard_output(received, index)

    def dispatch_wait(self, *, tbo_subbatch_index: int | None = None) -> StandardDispatchOutput:
        """Second half of ``dispatch(..., phases=PHASE_SEND)``."""
        index = self._micro_batch(tbo_subbatch_index)
        return self._standard_output(self.all_to_alls[index].wait_dispatch(), index)

    # SGLang's two-stage interface (two-batch overlap; DeepEPDispatcher's names).
    def dispatch_a(self, hidden_states: torch.Tensor, topk_output: TopKOutput, *,
                   tbo_subbatch_index: int | None = None) -> None:
        """Launch micro-batch ``tbo_subbatch_index``'s send; :meth:`dispatch_b` waits."""
        self.dispatch(hidden_states, topk_output, phases=PHASE_SEND,
                      tbo_subbatch_index=tbo_subbatch_index)

    def dispatch_b(self, *, tbo_subbatch_index: int | None = None) -> StandardDispatchOutput:
        """Wait for micro-batch ``tbo_subbatch_index``'s slots: the runner's input."""
        return self.dispatch_wait(tbo_subbatch_index=tbo_subbatch_index)

    def _micro_batch(self, tbo_subbatch_index: int | None) -> int:
        # SGLang passes None outside overlapped steps (DeepEP's wrapper maps it to 0).
        index = 0 if tbo_subbatch_index is None else int(tbo_subbatch_index)
        if not 0 <= index < self.micro_batches:
            raise A2AInputError(
                f"micro-batch {tbo_subbatch_index} of a dispatcher built for "
                f"{self.micro_batches} (two-batch overlap was "
                f"{'on' if self.micro_batches == 2 else 'off'} when the model was built)")
        return index

    def _micro_batch_max_tokens(self, num_tokens: int) -> int:
        """``M`` of one TBO micro-batch, identical on every EP rank.

        SGLang publishes no per-DP-rank counts for TBO micro-batches (the
        children's ``global_num_tokens_cpu`` is None). Without DP attention the
        ranks split identical batches identically; under CUDA-graph capture
        every rank captures the same padded size; otherwise (eager, DP
        attention) the ranks agree on the largest count over the EP group's
        CPU group, as SGLang's own non-EP TBO path all-gathers its counts.
        """
        if self.placement.size == 1 or not _dp_attention_enabled() or is_capturing():
            return num_tokens
        import torch.distributed as dist

        count = torch.tensor([num_tokens], dtype=torch.int64, device="cpu")
        dist.all_reduce(count, op=dist.ReduceOp.MAX, group=self.placement.cpu_group)
        return int(count.item())

    def _standard_output(self, received, index: int) -> StandardDispatchOutput:
        if self._runner_owner is not None and self._runner_owner != index:
            raise A2AStateError(
                f"micro-batch {index}'s dispatch output requested while micro-batch "
                f"{self._runner_owner}'s is still in its runner (the runner-side buffers are "
                "shared: combine_a must come first)")
        self._runner_owner = index
        m = received.runtime_max_tokens
        slots = self.placement.size * m
        recv_x = received.recv_x
        if self.dispatch_fp8:
            recv_x = dequantize_fp8_blocks(recv_x, received.recv_x_scales,
                                           out=self._dequantized[:slots])
        if self.keeps_global_ids:
            runner_ids = received.recv_topk_ids  # padding id: another rank's expert
        else:
            # A lookup with ids that are always valid table indices (design §5).
            runner_ids = self._runner_ids[:slots]
            torch.index_select(self._local_id_of, 0, received.recv_topk_ids.view(-1),
                               out=runner_ids.view(-1))
        return StandardDispatchOutput(
            hidden_states=recv_x, hidden_states_scale=None,
            topk_output=StandardTopKOutput(received.recv_topk_weights, runner_ids, None))

    # ----------------------------------------------------------------- combine
    def combine(self, combine_input: CombineInput, *, phases: int = PHASE_BOTH,
                tbo_subbatch_index: int | None = None) -> torch.Tensor | None:
        """``[P * M, H]`` expert outputs (weighted, reduced) -> ``[T, H]`` of this rank.

        ``phases=PHASE_SEND`` returns None; :meth:`combine_wait` returns the
        output once every peer's partial results arrived.
        """
        index = self._micro_batch(tbo_subbatch_index)
        if combine_input.format != CombineInputFormat.STANDARD:
            raise A2AInputError(
                f"{BACKEND_NAME} combines SGLang's STANDARD format, got {combine_input.format}")
        tokens = self._dispatched_tokens[index]
        if tokens is None:
            raise A2AStateError(f"micro-batch {index}: combine() called before dispatch()")
        y = combine_input.hidden_states
        if y.dtype != self.params_dtype:
            y = y.to(self.params_dtype)
        # A fresh output: the caller keeps it past the next layer's combine,
        # which reuses this layer shape's all-to-all.
        out = torch.empty((tokens, self.hidden_size), dtype=self.params_dtype,
                          device=self.placement.device)
        self._dispatched_tokens[index] = None
        self._runner_owner = None
        # SGLang's runners allocate their output, so it is staged into the
        # workspace's combine region (one copy) before the kernels pull it.
        all_to_all = self.all_to_alls[index]
        if phases == PHASE_SEND:
            all_to_all.combine(y.contiguous(), out=out, phases=PHASE_SEND)
            return None
        return all_to_all.combine(y.contiguous(), out=out)

    def combine_wait(self, *, tbo_subbatch_index: int | None = None) -> torch.Tensor:
        """Second half of ``combine(..., phases=PHASE_SEND)``: ``[T, H]``."""
        return self.all_to_alls[self._micro_batch(tbo_subbatch_index)].wait_combine()

    def combine_a(self, combine_input: CombineInput, *,
                  tbo_subbatch_index: int | None = None) -> None:
        """Launch micro-batch ``tbo_subbatch_index``'s combine send; :meth:`combine_b` waits."""
        self.combine(combine_input, phases=PHASE_SEND, tbo_subbatch_index=tbo_subbatch_index)

    def combine_b(self, *, tbo_subbatch_index: int | None = None) -> torch.Tensor:
        """Micro-batch ``tbo_subbatch_index``'s combined ``[T, H]`` tokens."""
        return self.combine_wait(tbo_subbatch_index=tbo_subbatch_index)


def dispatches_fp8(quant_method) -> bool:
    """Whether a layer's experts take 1x128 block-fp8 activations (DeepSeek-V3 style).

    True for SGLang's ``Fp8MoEMethod`` with 128x128 weight blocks (not MXFP8,
    not FP4 experts): their runners quantise activations per 1x128 block, so
    the tokens can travel that way. NVFP4/MXFP4 methods are refused.
    """
    name = type(quant_method).__name__
    if "Fp4" in name or "fp4" in name.lower():
        raise A2AInputError(
            f"{BACKEND_NAME} dispatches bf16/fp16 or fp8 1x128-block activations; the layer's "
            f"quantisation method {name} needs FP4 dispatch")
    try:
        from sglang.srt.layers.quantization.fp8 import Fp8MoEMethod
    except ImportError:  # pragma: no cover - present in every supported SGLang
        return False
    if not isinstance(quant_method, Fp8MoEMethod) or getattr(quant_method, "use_mxfp8", False):
        return False
    if getattr(quant_method, "is_fp4_expert", False):
        return False
    block = getattr(quant_method.quant_config, "weight_block_size", None)
    return block is not None and list(block) == [FP8_BLOCK, FP8_BLOCK]
