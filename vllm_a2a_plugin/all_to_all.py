"""``OneSidedAllToAll``: dispatch/combine of one EP rank over our CUDA kernels.

State machine (host side, flashinfer's MoeAlltoAll pattern)::

    idle --dispatch--> dispatched --combine--> idle

with the split forms ``dispatch(..., phases=PHASE_SEND)`` then
``wait_dispatch()`` (and ``combine``/``wait_combine``) that let one
process drive several logical ranks on one GPU. Everything is enqueued on the
current CUDA stream, allocation-free once shapes repeat, without host syncs
(except the optional id check), so CUDA graphs can capture it.
"""

from __future__ import annotations

import ctypes
import time
import weakref
from dataclasses import dataclass

import torch

from vllm_a2a_plugin import ops
from vllm_a2a_plugin.config import A2AConfig
from vllm_a2a_plugin.errors import (
    A2ADeviceError,
    A2AExpertIdError,
    A2AInputError,
    A2AMismatchError,
    A2APeerLostError,
    A2AStateError,
    A2ATimeoutError,
)
from vllm_a2a_plugin.padding import linear_expert_owner, padding_ids_for_ranks
from vllm_a2a_plugin.validation import (check_dispatch_inputs, check_expert_ids_in_range,
                                        check_tensor, is_capturing)
from vllm_a2a_plugin.watchdog import AbortWord, process_abort_word, reason_text
from vllm_a2a_plugin.workspace import AllToAllSpec, Workspace

PHASE_SEND = ops.PHASE_SEND
PHASE_WAIT = ops.PHASE_WAIT
PHASE_BOTH = ops.PHASE_BOTH

# Indices into the int32[8] error record (csrc/launch.h ErrorField / ErrorStatus).
_ERR_STATUS, _ERR_RANK, _ERR_PEER, _ERR_PHASE, _ERR_EPOCH, _ERR_D0, _ERR_D1 = range(7)
_STATUS_TIMEOUT, _STATUS_MISMATCH, _STATUS_BAD_ID, _STATUS_PEER_LOST = 1, 2, 3, 4
# report_error() claims the record by writing -1, fills the fields, then the status.
_STATUS_WRITING = -1
_RECORD_WRITE_WAIT_S = 1.0
# A raised abort word with an empty record: a kernel of this rank that is
# waiting polls the word every ~20 us and then records where it stopped (phase,
# epoch); give it this long before reporting the loss without them.
_ABORT_RECORD_WAIT_S = 0.2
# The abort state of objects built without __init__ (benchmarks' CPU stand-ins).
_NEVER_ABORTED = ctypes.c_int32(0)
_PHASE_NAMES = {0: "dispatch", 1: "combine"}
# Receive views kept per runtime M; vLLM's M takes one value per CUDA-graph size
# (and any value in eager steps), so the cache is bounded.
_MAX_CACHED_VIEWS = 64


def _plain_cuda_tensors(x, topk_ids, topk_weights, x_scales) -> bool:
    """True when each argument is a plain CUDA ``torch.Tensor`` (optional ones may be
    None): what reaches the C++ op and is checked there. Class and device only, the
    cheapest attributes (~0.1 us each)."""
    tensor = torch.Tensor
    return (x.__class__ is tensor and x.is_cuda
            and topk_ids.__class__ is tensor and topk_ids.is_cuda
            and (topk_weights is None
                 or (topk_weights.__class__ is tensor and topk_weights.is_cuda))
            and (x_scales is None or (x_scales.__class__ is tensor and x_scales.is_cuda)))


def _plain_cuda_tensor(t) -> bool:
    """The same test for one tensor (combine's ``out``)."""
    return t.__class__ is torch.Tensor and t.is_cuda


@dataclass(frozen=True)
class DispatchResult:
    """What rank ``r`` received; every tensor is a view into its workspace.

    Frozen: one result per runtime ``M`` is built once and handed out again on
    every dispatch with that ``M`` (building the views costs more host time than
    the launch itself at small batches).

    Slot ``s * M + t`` holds token ``t`` of sender ``s`` (``M`` =
    ``runtime_max_tokens``); ``.view(ep_size, M, ...)`` gives the ``[P, M, ...]``
    form. Payload rows of slots that carry no token for this rank are
    unspecified; ``recv_topk_ids`` is fully defined: ids of experts this rank
    does not own, and every id of an empty slot, are ``padding_id``, with weight 0.

    Attributes:
        recv_x: ``[P * M, H]``, the dispatch dtype.
        recv_x_scales: ``[P * M, scale_cols]`` float32, or None.
        recv_topk_ids: ``[P * M, K]`` int32 global expert ids (sanitized).
        recv_topk_weights: ``[P * M, K]`` float32 (0 where padded).
        recv_extra: further payloads, ``[P * M, row_bytes]`` uint8 each (a tuple).
        runtime_max_tokens: ``M`` of this step.
        padding_id: the id padded slots carry on this rank.
    """

    recv_x: torch.Tensor
    recv_x_scales: torch.Tensor | None
    recv_topk_ids: torch.Tensor
    recv_topk_weights: torch.Tensor
    recv_extra: tuple[torch.Tensor, ...]
    runtime_max_tokens: int
    padding_id: int


class OneSidedAllToAll:
    """Dispatch and combine for one EP rank over a :class:`Workspace`.

    Args:
        workspace: allocated workspace that holds ``rank``'s buffer.
        rank: this EP rank, ``0 <= rank < spec.ep_size``.
        expert_owner: ``[num_experts]`` int32 rank owning each expert; default
            vLLM's linear placement (``e // (E / P)``).
        config: launch and safety settings.
        abort: the abort word its kernels' waits poll (a lost peer: see
            :mod:`vllm_a2a_plugin.watchdog`); default the process's own
            (:func:`~vllm_a2a_plugin.watchdog.process_abort_word`). A pool
            gives every all-to-all of its group the pool's word.
    """

    _abort_state = _NEVER_ABORTED

    def __init__(self, workspace: Workspace, rank: int, *,
                 expert_owner: torch.Tensor | None = None,
                 config: A2AConfig | None = None,
                 abort: AbortWord | None = None):
        self.workspace = workspace
        self.spec: AllToAllSpec = workspace.spec
        self.rank = rank
        self.config = config or A2AConfig()
        self._buffer = workspace.buffer(rank)
        self.device = self._buffer.device
        spec = self.spec
        if expert_owner is None:
            expert_owner = linear_expert_owner(spec.num_experts, spec.ep_size)
        if expert_owner.dim() != 1 or expert_owner.numel() != spec.num_experts:
            raise A2AInputError(
                f"expert_owner must be [num_experts={spec.num_experts}], got "
                f"{list(expert_owner.shape)}"
            )
        owner_cpu = expert_owner.detach().to("cpu", torch.int64)
        if bool(((owner_cpu < 0) | (owner_cpu >= spec.ep_size)).any()):
            raise A2AInputError(f"expert_owner values must be ranks in [0, {spec.ep_size})")
        self.padding_ids = padding_ids_for_ranks(owner_cpu, spec.ep_size)
        self.padding_id = self.padding_ids[rank]
        self.expert_owner_cpu = owner_cpu.to(torch.int32)
        self._expert_owner = self.expert_owner_cpu.to(self.device)
        self._pad_ids = torch.tensor(self.padding_ids, dtype=torch.int32, device=self.device)
        self._sm_count = torch.cuda.get_device_properties(self.device).multi_processor_count
        most = ops.max_threads_per_block(self.device.index or 0)
        if most and self.config.threads_per_block > most:
            raise A2AInputError(
                f"threads_per_block ({self.config.threads_per_block}) exceeds what the kernels "
                f"can launch on this GPU ({most}: their registers per thread decide)")
        # Host memory the kernels write through a mapped address; named `cpu`
        # because a caller's `with torch.device("cuda")` would otherwise place it
        # on the GPU (and pinning that fails).
        self._error_record = torch.zeros(8, dtype=torch.int32, device="cpu", pin_memory=True)
        self._error_record_ptr = int(
            torch.ops.a2a_one_sided.error_record_device_address(self._error_record))
        # The status word read through ctypes: a plain host load, no tensor op, so
        # the check before every launch costs well under a microsecond.
        self._error_status = ctypes.c_int32.from_address(self._error_record.data_ptr())
        self.abort = abort if abort is not None else process_abort_word()
        self._abort_ptr = self.abort.device_address()
        self._abort_state = self.abort.state  # a ctypes view, read like the status
        self._failure: A2ADeviceError | None = None  # sticky: see check_errors()
        self._failure_raised = False
        self._phase = "idle"
        self._runtime_max_tokens = 0
        self._topk_ids: torch.Tensor | None = None
        self._dispatch_args = None
        self._combine_dst: torch.Tensor | None = None
        self._combine_out: torch.Tensor | None = None  # see combine_output
        self._combine_out_views: dict[int, torch.Tensor] = {}  # [:T] views of it, per T
        self._views_by_m: dict[int, DispatchResult] = {}
        self._combine_input_views: dict[int, torch.Tensor] = {}
        # Per-call host work, paid once here (eager steps pay it every call): the op
        # overloads (`.default` skips the packet's overload lookup) and the spec's
        # constant arguments. The input check is the planned op's (see dispatch).
        self._dispatch_op = torch.ops.a2a_one_sided.dispatch.default
        self._combine_op = torch.ops.a2a_one_sided.combine.default
        # The planned ops take only what changes per call; the rest lives in a
        # launch plan checked once in C++ (csrc/bindings.cpp, make_launch_plan).
        # Extra payloads keep the general ops (the planned dispatch sends x and
        # its scales only).
        self._dispatch_planned = torch.ops.a2a_one_sided.dispatch_planned.default
        self._combine_planned = torch.ops.a2a_one_sided.combine_planned.default
        self._use_plan = not spec.extra_payload_row_bytes
        self._plan = 0
        self._plan_for: tuple[object, object] | None = None  # (peer_ptrs, config) it was made for
        self._plan_finalizer: weakref.finalize | None = None
        self._payload_row_bytes = list(spec.payload_row_bytes)
        self._combine_row_bytes = spec.combine_row_bytes
        self._num_tokens = 0
        self._launch_config: A2AConfig | None = None
        self._launch_tail: tuple[int, int, int] = (0, 0, 0)

    # ------------------------------------------------------------------ views
    def _views(self, m: int) -> DispatchResult:
        """The receive views for runtime ``M`` = ``m``, built once per ``m``."""
        views = self._views_by_m.get(m)
        if views is None:
            if len(self._views_by_m) >= _MAX_CACHED_VIEWS:  # vLLM's M varies per step
                self._views_by_m.clear()
            views = self._views_by_m[m] = self._build_views(m)
        return views

    def _build_views(self, m: int) -> DispatchResult:
        spec, layout, ws = self.spec, self.workspace.layout, self.workspace
        slots = spec.ep_size * m
        payload_offsets = list(layout.payloads)
        recv_x = ws.region(self.rank, payload_offsets[0], spec.dispatch_dtype,
                           (slots, spec.hidden_size))
        next_payload = 1
        recv_scales = None
        if spec.scale_cols:
            recv_scales = ws.region(self.rank, payload_offsets[1], torch.float32,
                                    (slots, spec.scale_cols))
            next_payload = 2
        extra = tuple(
            ws.region(self.rank, off, torch.uint8, (slots, row))
            for off, row in zip(payload_offsets[next_payload:], spec.extra_payload_row_bytes)
        )
        return DispatchResult(
            recv_x=recv_x,
            recv_x_scales=recv_scales,
            recv_topk_ids=ws.region(self.rank, layout.recv_topk_ids, torch.int32,
                                    (slots, spec.top_k)),
            recv_topk_weights=ws.region(self.rank, layout.recv_topk_weights, torch.float32,
                                        (slots, spec.top_k)),
            recv_extra=extra,
            runtime_max_tokens=m,
            padding_id=self.padding_id,
        )

    def combine_input(self) -> torch.Tensor:
        """``[P * M, H]`` buffer (combine dtype) in this rank's workspace.

        Experts may write their reduced outputs here directly (zero-copy);
        valid between dispatch and combine.
        """
        if self._phase != "dispatched":
            raise A2AStateError("combine_input() is only valid after dispatch()")
        m = self._runtime_max_tokens
        view = self._combine_input_views.get(m)
        if view is None:  # kept per M, as the dispatch views (vLLM asks on every step)
            if len(self._combine_input_views) >= _MAX_CACHED_VIEWS:
                self._combine_input_views.clear()
            view = self._combine_input_views[m] = self.workspace.region(
                self.rank, self.workspace.layout.combine, self.spec.combine_dtype,
                (self.spec.ep_size * m, self.spec.hidden_size))
        return view

    # --------------------------------------------------------------- launches
    def _max_blocks(self) -> int:
        """Grid cap for both kernels; the C++ launcher sizes each grid to its work
        (tokens x row pieces) below it."""
        return self.config.max_blocks or 2 * self._sm_count

    def _launch_settings(self) -> tuple[int, int, int]:
        """``(max_blocks, threads_per_block, timeout_ns)`` of ``self.config``, rebuilt
        only when the config object changes (it is frozen; it can be replaced)."""
        config = self.config
        if config is not self._launch_config:
            self._launch_tail = (self._max_blocks(), config.threads_per_block, config.timeout_ns)
            self._launch_config = config
        return self._launch_tail

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor | None = None, *,
                 x_scales: torch.Tensor | None = None,
                 extra_payloads: tuple[torch.Tensor, ...] = (),
                 runtime_max_tokens: int | None = None,
                 phases: int = PHASE_BOTH,
                 check_expert_ids: bool | None = None) -> DispatchResult:
        """Send this rank's tokens to the ranks owning their experts.

        Args:
            x: ``[T, H]`` hidden states, ``spec.dispatch_dtype``. ``T`` may be 0.
            topk_ids: ``[T, K]`` int32 global expert ids in ``[0, E)``.
            topk_weights: ``[T, K]`` float32 router weights, or None (zeros).
            x_scales: ``[T, spec.scale_cols]`` float32 when the spec has scales.
            extra_payloads: further ``[T, ...]`` tensors, one per
                ``spec.extra_payload_row_bytes`` entry.
            runtime_max_tokens: ``M`` of this step; must be the same on every
                rank and ``>=`` every rank's ``T`` (vLLM: the max DP chunk
                size). Default: the workspace capacity.
            phases: ``PHASE_BOTH`` (one fused launch), or ``PHASE_SEND``
                followed later by :meth:`wait_dispatch`.
            check_expert_ids: host-side id range check (a device sync);
                default ``config.check_expert_ids``; never under graph capture.

        Returns:
            :class:`DispatchResult` views (complete once the wait phase ran).
        """
        self.check_errors()
        if phases not in (PHASE_SEND, PHASE_BOTH):
            raise A2AInputError(
                f"phases must be PHASE_SEND or PHASE_BOTH, got {phases}; "
                "the wait phase is wait_dispatch()")
        if self._phase != "idle":
            raise A2AStateError(
                f"dispatch() called in state '{self._phase}': each dispatch must be followed "
                "by combine() before the next dispatch"
            )
        m = self.spec.max_tokens_per_rank if runtime_max_tokens is None else int(runtime_max_tokens)
        if check_expert_ids is None:
            check_expert_ids = self.config.check_expert_ids
        # The planned op checks every argument in C++ before it launches (dtype, row
        # shape, rows, device, contiguity, M; csrc/bindings.cpp dispatch_planned), so
        # plain CUDA tensors need no check here: the Python check below runs only
        # when that one refuses, to raise with its message. Other arguments (tensor
        # subclasses such as FakeTensor, which never reach the C++ op, non-tensors,
        # other devices) take the Python check first.
        checked_by_op = (self._use_plan and not check_expert_ids and not extra_payloads
                         and _plain_cuda_tensors(x, topk_ids, topk_weights, x_scales))
        if not checked_by_op:
            self._check_dispatch_inputs(x, topk_ids, topk_weights, x_scales, extra_payloads, m)
            if check_expert_ids and not is_capturing():
                check_expert_ids_in_range(topk_ids, self.spec.num_experts)
        self._dispatch_args = (x, x_scales, extra_payloads, topk_ids, topk_weights)
        self._runtime_max_tokens = m
        self._topk_ids = topk_ids
        try:
            self._launch_dispatch(phases)
        except RuntimeError:
            self._finish_round()
            if checked_by_op:  # the op refused before launching: say why, in Python's words
                self._check_dispatch_inputs(x, topk_ids, topk_weights, x_scales, extra_payloads,
                                            m)
            raise
        self._num_tokens = topk_ids.shape[0]
        self._phase = "dispatched" if phases == PHASE_BOTH else "dispatch_sent"
        return self._views(m)

    def _check_dispatch_inputs(self, x, topk_ids, topk_weights, x_scales, extra_payloads,
                               m: int) -> None:
        check_dispatch_inputs(
            self.spec, x=x, topk_ids=topk_ids, topk_weights=topk_weights, x_scales=x_scales,
            extra_payloads=tuple(extra_payloads), runtime_max_tokens=m, device=self.device)

    def wait_dispatch(self) -> DispatchResult:
        """Second half of a split dispatch: wait until every sender's slots arrived."""
        self.check_errors()
        if self._phase != "dispatch_sent":
            raise A2AStateError(f"wait_dispatch() called in state '{self._phase}'; "
                                "call dispatch(..., phases=PHASE_SEND) first")
        self._launch_dispatch(PHASE_WAIT)
        self._phase = "dispatched"
        return self._views(self._runtime_max_tokens)

    def _launch_dispatch(self, phases: int) -> None:
        x, x_scales, extra_payloads, topk_ids, topk_weights = self._dispatch_args
        if self._use_plan:
            self._dispatch_planned(self._launch_plan(), self._buffer, x, x_scales, topk_ids,
                                   topk_weights, self._runtime_max_tokens, phases)
            return
        payloads = [x] + ([x_scales] if x_scales is not None else []) + list(extra_payloads)
        # peer_ptrs is read from the workspace on every call: Workspace.release()
        # replaces it, and the op then refuses instead of writing through stale pointers.
        self._dispatch_op(
            self._buffer, self.workspace.peer_ptrs, self.rank, payloads, topk_ids,
            topk_weights, self._expert_owner, self._pad_ids, self._error_record_ptr,
            self.spec.max_tokens_per_rank, self._runtime_max_tokens, self._combine_row_bytes,
            phases, *self._launch_settings(), self._abort_ptr)

    def _launch_plan(self) -> int:
        """The launch plan of the current workspace pointers and config.

        Made again when either object changes: ``Workspace.release()`` replaces
        ``peer_ptrs`` (the new plan then refuses, as the general op would, instead
        of keeping stale pointers), and a config may be replaced.
        """
        peer_ptrs, config = self.workspace.peer_ptrs, self.config
        made_for = self._plan_for
        if made_for is None or made_for[0] is not peer_ptrs or made_for[1] is not config:
            self._make_launch_plan(peer_ptrs, config)
        return self._plan

    def _make_launch_plan(self, peer_ptrs, config) -> None:
        self._free_launch_plan()
        spec = self.spec
        if len(peer_ptrs) != spec.ep_size:
            raise A2AStateError(
                f"the workspace has {len(peer_ptrs)} peer addresses for ep_size {spec.ep_size}: "
                "it was released (Workspace.release()); make a new workspace and all-to-all")
        # What every call's x, x_scales and combine output must be: dtype and row
        # shape (no rows: no memory).
        def like(cols: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.empty((0, cols), dtype=dtype, device=self.device)

        payload_like = [like(spec.hidden_size, spec.dispatch_dtype)]
        if spec.scale_cols:
            payload_like.append(like(spec.scale_cols, torch.float32))
        self._plan = int(torch.ops.a2a_one_sided.make_launch_plan(
            self._buffer, peer_ptrs, self.rank, self._expert_owner, self._pad_ids,
            self._error_record_ptr, spec.max_tokens_per_rank, spec.top_k, payload_like,
            like(spec.hidden_size, spec.combine_dtype), *self._launch_settings(),
            self._abort_ptr))
        self._plan_for = (peer_ptrs, config)
        # Freed with this object; at interpreter exit the process frees everything.
        self._plan_finalizer = weakref.finalize(
            self, torch.ops.a2a_one_sided.free_launch_plan, self._plan)
        self._plan_finalizer.atexit = False

    def _free_launch_plan(self) -> None:
        if self._plan_finalizer is not None:
            self._plan_finalizer()
        self._plan_finalizer = None
        self._plan_for = None
        self._plan = 0

    def combine(self, y: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
                phases: int = PHASE_BOTH) -> torch.Tensor:
        """Sum, for each of this rank's tokens, the partial results of its target ranks.

        Args:
            y: ``[P * M, H]`` (or ``[P, M, H]``) expert outputs of this rank,
                combine dtype, already weighted and reduced over local experts.
                None when the experts wrote into :meth:`combine_input` directly.
            out: ``[T, H]`` destination (combine dtype); when None, a view of
                one buffer this all-to-all keeps for every call (valid until its
                next combine; a CUDA graph may keep writing into it).
            phases: ``PHASE_BOTH``, or ``PHASE_SEND`` followed by :meth:`wait_combine`.

        Returns:
            ``out``: ``out[t] = sum over distinct target ranks r of y_r[rank, t]``.
        """
        self.check_errors()
        if phases not in (PHASE_SEND, PHASE_BOTH):
            raise A2AInputError(
                f"phases must be PHASE_SEND or PHASE_BOTH, got {phases}; "
                "the wait phase is wait_combine()")
        if self._phase != "dispatched":
            raise A2AStateError(
                f"combine() called in state '{self._phase}': call dispatch() first"
                + (" and wait_dispatch()" if self._phase == "dispatch_sent" else "")
            )
        if y is not None:
            self._stage_combine_input(y)
        # As in dispatch: the planned op checks a plain CUDA `out` itself (dtype,
        # shape, device, contiguity) before it launches.
        out_checked_by_op = self._use_plan and out is not None and _plain_cuda_tensor(out)
        if out_checked_by_op:
            self._combine_dst = out
        else:
            out = self._combine_dst = self.combine_output(out)
        try:
            self._launch_combine(phases)
        except RuntimeError:
            if out_checked_by_op:  # the op refused before launching: say why
                self.combine_output(out)
            raise
        if phases == PHASE_SEND:
            self._phase = "combine_sent"
        else:
            self._finish_round()
        return out

    def combine_output(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The ``[T, H]`` tensor combine will write: ``out`` checked, or a view of ours.

        Allocating here (not between launches) matters when several ranks share
        a process: an allocation can synchronise the device while a launched
        rank waits for one not yet launched.
        """
        if self._topk_ids is None:
            raise A2AStateError("combine_output() is only valid after dispatch()")
        num_tokens = self._num_tokens
        if out is not None:
            check_tensor(out, "out", dtype=self.spec.combine_dtype,
                         shape=(num_tokens, self.spec.hidden_size), device=self.device)
            return out
        # One buffer at capacity for every token count, never replaced: a CUDA
        # graph captured with out=None keeps the address it got, so the buffer must
        # outlive every graph. (A cache per count freed the old tensor when the
        # count changed, and a graph replayed after that wrote into freed memory.)
        # Its views are kept per token count, as the dispatch views are per M: a
        # slice costs ~1 us of host time on every call.
        view = self._combine_out_views.get(num_tokens)
        if view is None:
            if self._combine_out is None:
                self._combine_out = torch.empty(
                    (self.spec.max_tokens_per_rank, self.spec.hidden_size), device=self.device,
                    dtype=self.spec.combine_dtype)
            if len(self._combine_out_views) >= _MAX_CACHED_VIEWS:
                self._combine_out_views.clear()
            view = self._combine_out_views[num_tokens] = self._combine_out[:num_tokens]
        return view

    def wait_combine(self) -> torch.Tensor:
        """Second half of a split combine: wait for every peer, then reduce into ``out``."""
        self.check_errors()
        if self._phase != "combine_sent":
            raise A2AStateError(f"wait_combine() called in state '{self._phase}'; "
                                "call combine(..., phases=PHASE_SEND) first")
        self._launch_combine(PHASE_WAIT)
        out = self._combine_dst
        self._finish_round()
        return out

    def _launch_combine(self, phases: int) -> None:
        if self._use_plan:
            self._combine_planned(self._launch_plan(), self._buffer, self._topk_ids,
                                  self._combine_dst, self._runtime_max_tokens, phases)
            return
        self._combine_op(
            self._buffer, self.workspace.peer_ptrs, self.rank, self._topk_ids,
            self._expert_owner, self._combine_dst, self._error_record_ptr,
            self.spec.max_tokens_per_rank, self._runtime_max_tokens, self._payload_row_bytes,
            phases, *self._launch_settings(), self._abort_ptr)

    def _finish_round(self) -> None:
        self._phase = "idle"
        self._topk_ids = None
        self._dispatch_args = None

    def _stage_combine_input(self, y: torch.Tensor) -> None:
        target = self.combine_input()
        if y.dim() == 3:
            y = y.reshape(-1, y.shape[-1])
        check_tensor(y, "y", dtype=self.spec.combine_dtype, shape=tuple(target.shape),
                     device=self.device)
        if y.data_ptr() != target.data_ptr():
            target.copy_(y)

    # ----------------------------------------------------------------- errors
    def check_errors(self) -> None:
        """Raise if a kernel of this rank recorded an error, or a peer was lost;
        cheap, no CUDA call.

        Reads one word of the host-mapped error record and one of the abort
        word (raised by the peer watchdog: :class:`A2APeerLostError`). The first error is
        kept (sticky): from then on every call of this object (``dispatch``,
        ``combine``, their wait halves, this method) raises it again at once,
        without launching anything, until :meth:`recover`.
        """
        if self._failure is None and self._error_status.value == 0 and \
                self._abort_state.value == 0:
            return
        self._raise_failure()

    def _raise_failure(self) -> None:
        if self._failure is None:
            self._failure = self._read_error_record()
        if self._failure_raised:
            raise self._failure.again()
        self._failure_raised = True
        raise self._failure

    def _read_error_record(self) -> A2ADeviceError:
        """The recorded error; waits out a record still being written (status -1)."""
        if self._error_status.value == 0 and self._abort_state.value != 0:
            deadline = time.monotonic() + _ABORT_RECORD_WAIT_S
            while self._error_status.value == 0 and time.monotonic() < deadline:
                time.sleep(1e-3)
            if self._error_status.value == 0:
                return self._peer_lost_without_record()
        deadline = time.monotonic() + _RECORD_WRITE_WAIT_S
        while self._error_status.value == _STATUS_WRITING and time.monotonic() < deadline:
            time.sleep(1e-4)
        rec = [int(v) for v in self._error_record.tolist()]
        return error_from_record(rec, timeout_s=self.config.timeout_s,
                                 num_experts=self.spec.num_experts)

    def _peer_lost_without_record(self) -> A2APeerLostError:
        """The loss as the abort word tells it, when no kernel of this rank was
        waiting: the phase is the one this rank would run next, the epoch unknown (0)."""
        peer, reason = self.abort.lost() or (-1, 0)
        phase = 1 if self._phase in ("dispatched", "combine_sent") else 0
        rec = [_STATUS_PEER_LOST, self.rank, peer, phase, 0, reason, -1, 0]
        return error_from_record(rec, timeout_s=self.config.timeout_s,
                                 num_experts=self.spec.num_experts)

    @property
    def failure(self) -> A2ADeviceError | None:
        """The device error this object has seen (and keeps raising), or None.

        Only errors already read count; call :meth:`check_errors` (or
        :meth:`synchronize`) first to read the record. Engines exchange this
        across ranks to decide on a collective :meth:`recover`.
        """
        if self._failure is None and (self._error_status.value != 0
                                      or self._abort_state.value != 0):
            self._failure = self._read_error_record()
        return self._failure

    def synchronize(self) -> None:
        """Wait for this rank's queued work, then raise any recorded error."""
        torch.cuda.synchronize(self.device)
        self.check_errors()

    def recover(self, *, reinitialize_workspace: bool = True) -> None:
        """Make a failed (or healthy) all-to-all usable again: collective.

        Every rank of the group calls it, after its last dispatch/combine of the
        failed step, including ranks that saw no error (a late peer may have
        finished without one). It resets the protocol state of the workspace
        in place (:meth:`Workspace.reinitialize`: wait for this device's work,
        barrier, zero the epoch/flag header, barrier), then forgets this
        object's error and half-finished step. Buffers keep their addresses,
        so CUDA graphs captured before the failure replay correctly after it.

        A workspace holding several logical ranks (:class:`LocalRanks`) is
        reinitialised once for all of them: ``LocalRanks.recover()`` does that
        and calls this with ``reinitialize_workspace=False`` on every rank.

        Not recoverable this way: a peer process that died (the group itself
        must be rebuilt) and a CUDA error that poisoned the context (illegal
        address, trap): those need a new process. A raised abort word (a lost
        peer) must be cleared first, by the group together:
        ``AllToAllPool.recover()`` (``PeerWatchdog.rearm``), or
        ``LocalRanks.recover()`` for logical ranks.
        """
        if self.abort.raised:
            peer, reason = self.abort.lost()
            raise A2AStateError(
                f"EP rank {peer} was lost ({reason_text(reason)}) and this process's abort word "
                "is still raised: the group clears it together (AllToAllPool.recover(), or "
                "PeerWatchdog.rearm() on every rank) before recovering its all-to-alls")
        if reinitialize_workspace:
            if len(self.workspace.buffers) > 1:
                raise A2AStateError(
                    f"this workspace holds ranks {self.workspace.local_ranks} of one process: "
                    "recover them together with LocalRanks.recover() (or "
                    "Workspace.reinitialize(), then recover(reinitialize_workspace=False) "
                    "on each rank)")
            self.workspace.reinitialize()
        else:
            # The caller reinitialised the workspace; no kernel of ours is running.
            torch.cuda.synchronize(self.device)
        self._error_record.zero_()
        self._failure = None
        self._failure_raised = False
        self._combine_dst = None
        self._finish_round()

    def reset_error(self) -> None:
        """Forget a recorded error without touching the workspace.

        Only safe when the protocol is known to be in step on every rank (an
        expert-id error, which does not stop a round); after a timeout or a
        mismatch use :meth:`recover` on every rank.
        """
        self._error_record.zero_()
        self._failure = None
        self._failure_raised = False

    @property
    def phase(self) -> str:
        return self._phase

    def completed_rounds(self) -> tuple[int, int]:
        """``(dispatches, combines)`` this rank completed since its workspace was made
        (or last recovered: :meth:`recover` resets the epochs).

        Read from the epoch counters the kernels keep in the workspace header,
        so CUDA-graph replays count too (host-side call counters only see the
        capture). Waits for this rank's queued work: for tests and statistics,
        not for the hot path.
        """
        fields = ops.header_field_offsets()
        self.synchronize()
        counters = []
        for name in ("dispatch_epoch", "combine_epoch"):
            word = self._buffer[fields[name]:fields[name] + 4].view(torch.int32)
            counters.append(int(word.item()) & 0xFFFFFFFF)
        return counters[0], counters[1]


def error_from_record(rec: list[int], *, timeout_s: float,
                      num_experts: int | None = None) -> A2ADeviceError:
    """Turn the kernels' int32 error record into an exception with a plain message.

    Args:
        rec: the record's 8 words (csrc/launch.h ``ErrorField``).
        timeout_s: the configured timeout, quoted in timeout messages.
        num_experts: quoted in the expert-id message when given.
    """
    status = rec[_ERR_STATUS]
    rank, peer, epoch = rec[_ERR_RANK], rec[_ERR_PEER], rec[_ERR_EPOCH]
    phase = _PHASE_NAMES.get(rec[_ERR_PHASE], f"phase {rec[_ERR_PHASE]}")
    fields = dict(rank=rank, peer=peer, phase=phase, epoch=epoch, record=tuple(rec))
    recovery = (" This all-to-all now refuses work; call recover() on every rank "
                "(see OneSidedAllToAll.recover).")
    if status == _STATUS_TIMEOUT:
        return A2ATimeoutError(
            f"a2a_one_sided: rank {rank} timed out after {timeout_s:g} s in {phase} waiting "
            f"for peer {peer} (epoch {epoch}, its flag still read {rec[_ERR_D0]}). The peer "
            "died, hung, or made a different number of dispatch/combine calls." + recovery,
            **fields)
    if status == _STATUS_MISMATCH:
        return A2AMismatchError(
            f"a2a_one_sided: rank {rank} used runtime_max_tokens={rec[_ERR_D1]} in {phase} "
            f"but peer {peer} used {rec[_ERR_D0]} (epoch {epoch}); every rank must pass the "
            "same value in a step. The received slots of this step are garbage." + recovery,
            **fields)
    if status == _STATUS_BAD_ID:
        valid = f"[0, {num_experts})" if num_experts is not None else "[0, num_experts)"
        return A2AExpertIdError(
            f"a2a_one_sided: rank {rank} dispatched top-k id {rec[_ERR_D0]} for its token "
            f"{rec[_ERR_D1]}, outside {valid} and not -1 (the host-side id check was off; "
            "only the first bad id is recorded). The kernels skipped that top-k slot: no rank "
            "received it (every rank's recv_topk_ids holds its padding id there, weight 0) "
            "and combine left it out of the token's sum. The token's other, valid slots "
            "were delivered and combined as usual; a token with no valid slot reached no "
            "rank and combines to zeros. Mark a slot without an expert with -1 (as vLLM "
            "does for padding tokens), or enable check_expert_ids." + recovery,
            **fields)
    if status == _STATUS_PEER_LOST:
        waited = rec[_ERR_D1]
        waiting = (f" while waiting for peer {waited}" if waited >= 0
                   else " (no wait of this rank was running; epoch not recorded)")
        return A2APeerLostError(
            f"a2a_one_sided: EP rank {peer} was lost ({reason_text(rec[_ERR_D0])}); rank {rank} "
            f"stopped {phase} at epoch {epoch}{waiting}. Seen by the peer watchdog "
            "(VLLM_A2A_PEER_INTERVAL_S), not the device timeout. A process that is gone cannot "
            "rejoin: rebuild the group (restart the engine). A peer that was stopped and "
            "resumed can: call recover() on every rank (AllToAllPool.recover).",
            **fields)
    if status == _STATUS_WRITING:
        return A2ADeviceError(
            f"a2a_one_sided: rank {rank} started recording an error but the record was "
            "still incomplete after waiting; the kernel may have been aborted." + recovery,
            **fields)
    return A2ADeviceError(
        f"a2a_one_sided: rank {rank} recorded error status {status} in {phase} (peer {peer}, "
        f"epoch {epoch})." + recovery, **fields)
