"""Pure-torch semantics of dispatch and combine: the oracle for every test.

* :func:`dispatch_reference` / :func:`combine_reference` take every rank's
  inputs in one process and return every rank's outputs, exactly as the kernels
  define them (design §4), plus a ``valid`` mask of the slots that carry a token.
* :class:`ReferenceAllToAll` runs the same semantics across processes over any
  ``torch.distributed`` backend (gloo on CPU), with the interface of
  :class:`~vllm_a2a_plugin.all_to_all.OneSidedAllToAll`. It is how the vLLM
  prepare/finalize runs on machines without our kernels (CPU CI).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from vllm_a2a_plugin.all_to_all import PHASE_BOTH, PHASE_SEND, DispatchResult
from vllm_a2a_plugin.errors import A2AInputError, A2AStateError
from vllm_a2a_plugin.padding import linear_expert_owner, padding_ids_for_ranks
from vllm_a2a_plugin.validation import (NO_EXPERT, check_dispatch_inputs,
                                        check_expert_ids_in_range, check_tensor, row_bytes)
from vllm_a2a_plugin.workspace import AllToAllSpec

# The reference computes on the host whatever the caller's default device is
# (vLLM builds models under `with torch.device("cuda")`).
_CPU = torch.device("cpu")


def _check_phases(phases: int, wait_name: str) -> None:
    if phases not in (PHASE_SEND, PHASE_BOTH):
        raise A2AInputError(f"phases must be PHASE_SEND or PHASE_BOTH, got {phases}; "
                            f"the wait phase is {wait_name}()")


@dataclass(frozen=True)
class ReferenceDispatch(DispatchResult):
    """A :class:`DispatchResult` plus ``valid``: ``[P * M]`` bool, slot carries a token."""

    valid: torch.Tensor | None = None


def dispatch_reference(
    *, xs: Sequence[torch.Tensor], topk_ids: Sequence[torch.Tensor],
    topk_weights: Sequence[torch.Tensor | None] | None = None,
    x_scales: Sequence[torch.Tensor | None] | None = None,
    extra_payloads: Sequence[Sequence[torch.Tensor]] | None = None,
    expert_owner: torch.Tensor, runtime_max_tokens: int | None = None,
) -> list[ReferenceDispatch]:
    """What every rank receives. Lists are indexed by rank (``P`` entries).

    Args:
        xs: ``[T_s, H]`` hidden states of each sender.
        topk_ids: ``[T_s, K]`` int32 global expert ids.
        topk_weights: ``[T_s, K]`` float32 or None (weights then read 0).
        x_scales: ``[T_s, C]`` float32 or None.
        extra_payloads: per sender, a sequence of ``[T_s, ...]`` tensors.
        expert_owner: ``[E]`` rank of every expert.
        runtime_max_tokens: ``M``; default ``max(T_s)``.

    Returns:
        Per receiving rank, tensors shaped as :class:`DispatchResult` with empty
        payload slots zero-filled, and ``valid`` marking real slots.
    """
    p = len(xs)
    owner = expert_owner.to("cpu", torch.int64)
    pads = padding_ids_for_ranks(owner, p)
    m = runtime_max_tokens if runtime_max_tokens is not None else max(
        (int(t.shape[0]) for t in topk_ids), default=0)
    k = topk_ids[0].shape[1]
    hidden = xs[0].shape[1]
    results = []
    for r in range(p):
        recv_ids = torch.full((p, m, k), pads[r], dtype=torch.int32, device=_CPU)
        recv_w = torch.zeros((p, m, k), dtype=torch.float32, device=_CPU)
        recv_x = torch.zeros((p, m, hidden), dtype=xs[0].dtype, device=_CPU)
        recv_scales = None
        if x_scales is not None and x_scales[0] is not None:
            recv_scales = torch.zeros((p, m, x_scales[0].shape[1]), dtype=torch.float32,
                                      device=_CPU)
        recv_extra = []
        if extra_payloads is not None:
            recv_extra = [torch.zeros((p, m, row_bytes(e)), dtype=torch.uint8, device=_CPU)
                          for e in extra_payloads[0]]
        valid = torch.zeros((p, m), dtype=torch.bool, device=_CPU)
        for s in range(p):
            ids = topk_ids[s].to("cpu", torch.int64)
            n = ids.shape[0]
            if n == 0:
                continue
            local = _owner_of(owner, ids) == r  # [n, K]
            recv_ids[s, :n] = torch.where(local, ids, torch.full_like(ids, pads[r])).to(torch.int32)
            if topk_weights is not None and topk_weights[s] is not None:
                recv_w[s, :n] = torch.where(local, topk_weights[s].cpu().float(), 0.0)
            sent = local.any(dim=1)
            valid[s, :n] = sent
            recv_x[s, :n][sent] = xs[s].cpu()[sent]
            if recv_scales is not None:
                recv_scales[s, :n][sent] = x_scales[s].cpu()[sent]
            for i, e in enumerate(extra_payloads[s] if extra_payloads is not None else ()):
                raw = e.cpu().contiguous().view(torch.uint8).reshape(n, row_bytes(e))
                recv_extra[i][s, :n][sent] = raw[sent]
        results.append(ReferenceDispatch(
            recv_x=recv_x.reshape(p * m, hidden),
            recv_x_scales=None if recv_scales is None else recv_scales.reshape(
                p * m, recv_scales.shape[-1]),
            recv_topk_ids=recv_ids.reshape(p * m, k),
            recv_topk_weights=recv_w.reshape(p * m, k),
            recv_extra=tuple(e.reshape(p * m, e.shape[-1]) for e in recv_extra),
            runtime_max_tokens=m,
            padding_id=pads[r],
            valid=valid.reshape(p * m),
        ))
    return results


def _owner_of(owner: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Owning rank of each id; -1 for ``NO_EXPERT`` slots (they go nowhere)."""
    return torch.where(ids == NO_EXPERT, torch.full_like(ids, -1), owner[ids.clamp_min(0)])


def combine_reference(*, ys: Sequence[torch.Tensor], topk_ids: Sequence[torch.Tensor],
                      expert_owner: torch.Tensor, runtime_max_tokens: int,
                      out_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """``out_s[t] = sum over distinct owners r of topk_ids_s[t] of ys[r][s, t]``.

    Args:
        ys: per rank ``[P * M, H]`` (or ``[P, M, H]``) expert outputs.
        topk_ids: per rank ``[T_s, K]`` the ids that rank dispatched.
        runtime_max_tokens: ``M`` used at dispatch.

    Returns:
        Per rank ``[T_s, H]``, summed in float32, cast to ``out_dtype`` (default
        the dtype of ``ys``).
    """
    p = len(ys)
    m = runtime_max_tokens
    owner = expert_owner.to("cpu", torch.int64)
    hidden = ys[0].shape[-1]
    out_dtype = out_dtype or ys[0].dtype
    y3 = [y.detach().to("cpu").reshape(p, m, hidden).float() for y in ys]
    outs = []
    for s in range(p):
        ids = topk_ids[s].to("cpu", torch.int64)
        n = ids.shape[0]
        acc = torch.zeros((n, hidden), dtype=torch.float32, device=_CPU)
        if n:
            ranks = torch.arange(p, dtype=torch.int64, device=_CPU)
            # [n, p]: token t goes to rank r (NO_EXPERT slots, owner -1, go nowhere)
            targets = (_owner_of(owner, ids).unsqueeze(-1) == ranks).any(dim=1)
            for r in range(p):
                acc[targets[:, r]] += y3[r][s, :n][targets[:, r]]
        outs.append(acc.to(out_dtype))
    return outs


def experts_reference(recv: DispatchResult, expert_fn: Callable[[int, torch.Tensor], torch.Tensor],
                      *, local_experts: Sequence[int], out_dtype: torch.dtype) -> torch.Tensor:
    """What a rank's experts compute on received slots (weighted, reduced).

    ``y[slot] = sum_k w[slot, k] * expert_fn(id[slot, k], x[slot])`` over the
    slot's ids that are in ``local_experts``; padded ids contribute nothing.
    """
    x = recv.recv_x.float()
    ids = recv.recv_topk_ids.to(torch.int64)
    w = recv.recv_topk_weights
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in local_experts:
        hit = ids == e  # [slots, K]
        rows = hit.any(dim=1)
        if not bool(rows.any()):
            continue
        weight = (w * hit).sum(dim=1)[rows]
        y[rows] += weight[:, None] * expert_fn(e, x[rows]).float()
    return y.to(out_dtype)


def dense_moe_reference(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                        expert_fn: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """A plain single-device MoE: ``out[t] = sum_k w[t,k] * expert_fn(id[t,k], x[t])`` (fp32)."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    xf = x.float()
    ids = topk_ids.to(torch.int64)
    for e in torch.unique(ids).tolist():
        hit = ids == e
        rows = hit.any(dim=1)
        weight = (topk_weights.float() * hit).sum(dim=1)[rows]
        out[rows] += weight[:, None] * expert_fn(e, xf[rows]).float()
    return out


class ReferenceAllToAll:
    """Dispatch/combine over ``torch.distributed`` collectives, reference semantics.

    Same methods as :class:`OneSidedAllToAll` (``dispatch``, ``combine_input``,
    ``combine``, ``check_errors``), so engine adapters can run on machines
    without our kernels. Moves every rank's tokens to every rank (all-gather):
    for correctness and CPU tests, not for speed.

    The split forms (``phases=PHASE_SEND``, then :meth:`wait_dispatch` /
    :meth:`wait_combine`) keep the kernels' state machine: the collectives run
    in the send half (gloo has no one-sided sends) and the wait half hands out
    the result, so overlap schedules (two micro-batches, each with its own
    all-to-all, sent and waited for in interleaved order) run through the same
    adapter code on CPU as on GPU.
    """

    def __init__(self, spec: AllToAllSpec, group, *, expert_owner: torch.Tensor | None = None,
                 device: torch.device | str = "cpu", check_expert_ids: bool = True):
        import torch.distributed as dist

        self._dist = dist
        self.spec = spec
        self.group = group
        self.rank = dist.get_rank(group)
        if dist.get_world_size(group) != spec.ep_size:
            raise A2AInputError(
                f"group has {dist.get_world_size(group)} ranks but spec.ep_size is {spec.ep_size}")
        self.device = torch.device(device)
        owner = expert_owner if expert_owner is not None else linear_expert_owner(
            spec.num_experts, spec.ep_size)
        self.expert_owner = self.expert_owner_cpu = owner.to("cpu", torch.int32)
        self.padding_ids = padding_ids_for_ranks(self.expert_owner, spec.ep_size)
        self.padding_id = self.padding_ids[self.rank]
        self.check_expert_ids = check_expert_ids
        self._phase = "idle"
        self._topk_ids: torch.Tensor | None = None
        self._m = 0
        self._combine_buffer: torch.Tensor | None = None
        self._sent: object = None  # the split form's result, handed out by the wait half
        self._completed = [0, 0]  # dispatches, combines

    def _all_gather_rows(self, t: torch.Tensor, m: int) -> list[torch.Tensor]:
        """All-gather ``[T, ...]`` tensors padded to ``[m, ...]`` as raw bytes."""
        width = row_bytes(t)
        raw = t.detach().to("cpu").contiguous().view(torch.uint8).reshape(t.shape[0], width)
        padded = torch.zeros((m, width), dtype=torch.uint8, device=_CPU)
        padded[: raw.shape[0]] = raw
        gathered = [torch.empty_like(padded) for _ in range(self.spec.ep_size)]
        self._dist.all_gather(gathered, padded, group=self.group)
        return gathered

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor | None = None, *,
                 x_scales: torch.Tensor | None = None,
                 extra_payloads: tuple[torch.Tensor, ...] = (),
                 runtime_max_tokens: int | None = None,
                 phases: int = PHASE_BOTH) -> DispatchResult:
        if self._phase != "idle":
            raise A2AStateError(f"dispatch() called in state '{self._phase}'")
        _check_phases(phases, "wait_dispatch")
        m = self.spec.max_tokens_per_rank if runtime_max_tokens is None else int(runtime_max_tokens)
        check_dispatch_inputs(self.spec, x=x, topk_ids=topk_ids, topk_weights=topk_weights,
                              x_scales=x_scales, extra_payloads=tuple(extra_payloads),
                              runtime_max_tokens=m, device=self.device)
        if self.check_expert_ids:
            check_expert_ids_in_range(topk_ids, self.spec.num_experts)
        p, k = self.spec.ep_size, self.spec.top_k
        counts = torch.tensor([topk_ids.shape[0]], dtype=torch.int64, device=_CPU)
        all_counts = [torch.zeros(1, dtype=torch.int64, device=_CPU) for _ in range(p)]
        self._dist.all_gather(all_counts, counts, group=self.group)
        n = [int(c) for c in all_counts]

        def gather(t: torch.Tensor, dtype: torch.dtype, shape_tail: tuple[int, ...]):
            rows = self._all_gather_rows(t, m)
            return [r[: n[s]].contiguous().view(dtype).reshape(n[s], *shape_tail)
                    for s, r in enumerate(rows)]

        weights = topk_weights if topk_weights is not None else torch.zeros(
            topk_ids.shape, dtype=torch.float32, device=topk_ids.device)
        all_x = gather(x, self.spec.dispatch_dtype, (self.spec.hidden_size,))
        all_ids = gather(topk_ids, torch.int32, (k,))
        all_w = gather(weights, torch.float32, (k,))
        all_scales = None
        if x_scales is not None:
            all_scales = gather(x_scales, torch.float32, (self.spec.scale_cols,))
        all_extra = None
        if extra_payloads:
            per_payload = [gather(e, torch.uint8, (row,)) for e, row in
                           zip(extra_payloads, self.spec.extra_payload_row_bytes)]
            all_extra = [[pp[s] for pp in per_payload] for s in range(p)]
        mine = dispatch_reference(
            xs=all_x, topk_ids=all_ids, topk_weights=all_w, x_scales=all_scales,
            extra_payloads=all_extra, expert_owner=self.expert_owner, runtime_max_tokens=m,
        )[self.rank]
        self._m = m
        self._topk_ids = topk_ids
        self._phase = "dispatched"
        self._completed[0] += 1
        self._combine_buffer = torch.zeros((p * m, self.spec.hidden_size),
                                           dtype=self.spec.combine_dtype, device=self.device)
        moved = {name: getattr(mine, name).to(self.device)
                 for name in ("recv_x", "recv_x_scales", "recv_topk_ids", "recv_topk_weights")
                 if getattr(mine, name) is not None}
        result = dataclasses.replace(mine, recv_extra=tuple(e.to(self.device)
                                                            for e in mine.recv_extra), **moved)
        if phases == PHASE_SEND:
            self._phase, self._sent = "dispatch_sent", result
        return result

    def wait_dispatch(self) -> DispatchResult:
        """Second half of ``dispatch(..., phases=PHASE_SEND)``."""
        if self._phase != "dispatch_sent":
            raise A2AStateError(f"wait_dispatch() called in state '{self._phase}'; "
                                "call dispatch(..., phases=PHASE_SEND) first")
        result, self._sent, self._phase = self._sent, None, "dispatched"
        return result

    def combine_input(self) -> torch.Tensor:
        if self._phase != "dispatched" or self._combine_buffer is None:
            raise A2AStateError("combine_input() is only valid after dispatch()")
        return self._combine_buffer

    def combine(self, y: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
                phases: int = PHASE_BOTH) -> torch.Tensor:
        if self._phase != "dispatched":
            raise A2AStateError(f"combine() called in state '{self._phase}': call dispatch() first"
                                + (" and wait_dispatch()" if self._phase == "dispatch_sent"
                                   else ""))
        _check_phases(phases, "wait_combine")
        buffer = self.combine_input()
        if y is not None:
            y2 = y.reshape(-1, y.shape[-1])
            check_tensor(y2, "y", dtype=self.spec.combine_dtype, shape=tuple(buffer.shape),
                         device=self.device)
            if y2.data_ptr() != buffer.data_ptr():
                buffer.copy_(y2)
        p, m, h = self.spec.ep_size, self._m, self.spec.hidden_size
        gathered = self._all_gather_rows(buffer, p * m)
        ys = [g.view(self.spec.combine_dtype).reshape(p * m, h) for g in gathered]
        all_ids = [torch.zeros((0, self.spec.top_k), dtype=torch.int32, device=_CPU)] * p
        all_ids[self.rank] = self._topk_ids
        result = combine_reference(ys=ys, topk_ids=all_ids, expert_owner=self.expert_owner,
                                   runtime_max_tokens=m)[self.rank].to(self.device)
        if out is None:
            out = result
        else:
            check_tensor(out, "out", dtype=self.spec.combine_dtype, shape=tuple(result.shape),
                         device=self.device)
            out.copy_(result)
        self._topk_ids = None
        self._completed[1] += 1
        if phases == PHASE_SEND:
            self._phase, self._sent = "combine_sent", out
        else:
            self._phase = "idle"
        return out

    def wait_combine(self) -> torch.Tensor:
        """Second half of ``combine(..., phases=PHASE_SEND)``."""
        if self._phase != "combine_sent":
            raise A2AStateError(f"wait_combine() called in state '{self._phase}'; "
                                "call combine(..., phases=PHASE_SEND) first")
        out, self._sent, self._phase = self._sent, None, "idle"
        return out

    def check_errors(self) -> None:
        """Nothing runs asynchronously here, so nothing can be pending."""

    def completed_rounds(self) -> tuple[int, int]:
        """``(dispatches, combines)`` completed (see OneSidedAllToAll.completed_rounds)."""
        return self._completed[0], self._completed[1]

    @property
    def phase(self) -> str:
        return self._phase
