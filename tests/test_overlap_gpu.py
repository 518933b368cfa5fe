"""Two micro-batches in flight at once, each on its own workspace (one GPU,
logical ranks): what dual-batch / two-batch overlap does with our kernels.

* split phases: micro-batch A's send, then B's, then compute, then both waits,
  for dispatch and for combine (the order SGLang's two-batch overlap and
  vLLM's recv hooks use);
* the comm-stream schedule of our vLLM prepare/finalize under DBO: each
  micro-batch's fused dispatch/combine on a comm stream behind the compute
  recorded so far, while the other micro-batch's compute runs on the compute
  stream; eager and captured in one CUDA graph.

Every round is checked against the pure-torch reference.
"""

from __future__ import annotations

import pytest
import torch

from tests.test_kernels_gpu import assert_dispatch_matches, expert_fn, make_inputs, to_gpu
from vllm_a2a_plugin import A2AConfig, AllToAllSpec, LocalRanks
from vllm_a2a_plugin.all_to_all import PHASE_SEND
from vllm_a2a_plugin.padding import linear_expert_owner
from vllm_a2a_plugin.reference import combine_reference, dispatch_reference, experts_reference

pytestmark = pytest.mark.gpu

SPEC = AllToAllSpec(ep_size=4, max_tokens_per_rank=48, hidden_size=2048, top_k=4,
                    num_experts=32, dispatch_dtype=torch.bfloat16)


def _stand_in_compute(size: int = 2048) -> torch.Tensor:
    """A GEMM that keeps the GPU busy between a send and its wait."""
    a = torch.randn((size, size), device="cuda", dtype=torch.bfloat16)
    return a @ a


class MicroBatch:
    """One micro-batch's inputs and expected results on ``ranks``."""

    def __init__(self, ranks: LocalRanks, gen: torch.Generator, counts: list[int]):
        self.ranks, self.counts = ranks, counts
        self.owner = linear_expert_owner(SPEC.num_experts, SPEC.ep_size)
        xs, ids, ws, _, _ = make_inputs(gen, SPEC, counts)
        self.cpu = (xs, ids, ws)
        self.xs, self.ids, self.ws = to_gpu(xs), to_gpu(ids), to_gpu(ws)
        self.m = max(counts)
        self.refs = dispatch_reference(xs=xs, topk_ids=ids, topk_weights=ws,
                                       expert_owner=self.owner, runtime_max_tokens=self.m)

    def send(self) -> None:
        for rank, a2a in enumerate(self.ranks.ranks):
            a2a.dispatch(self.xs[rank], self.ids[rank], self.ws[rank],
                         runtime_max_tokens=self.m, phases=PHASE_SEND)

    def wait(self) -> list:
        return [a2a.wait_dispatch() for a2a in self.ranks.ranks]

    def experts(self, results) -> list[torch.Tensor]:
        """Expert outputs written into each rank's combine input (zero-copy)."""
        per_rank = SPEC.num_experts // SPEC.ep_size
        ys = []
        for rank, got in enumerate(results):
            local = range(rank * per_rank, (rank + 1) * per_rank)
            y = experts_reference(got, expert_fn, local_experts=local,
                                  out_dtype=SPEC.combine_dtype)
            self.ranks.ranks[rank].combine_input().copy_(y)
            ys.append(y)
        return ys

    def check(self, results, ys, outs) -> None:
        assert_dispatch_matches(results, self.refs, SPEC)
        expected = combine_reference(ys=ys, topk_ids=self.ids, expert_owner=self.owner,
                                     runtime_max_tokens=self.m)
        for rank, (got, exp) in enumerate(zip(outs, expected)):
            assert got.shape == (self.counts[rank], SPEC.hidden_size)
            torch.testing.assert_close(got.float().cpu(), exp.float(), rtol=1e-5, atol=1e-5,
                                       msg=f"rank {rank} combine vs reference")


def _two_workspaces() -> tuple[LocalRanks, LocalRanks]:
    config = A2AConfig(timeout_s=10.0)
    first, second = LocalRanks(SPEC, config=config), LocalRanks(SPEC, config=config)
    assert first.workspace.buffers[0].data_ptr() != second.workspace.buffers[0].data_ptr()
    return first, second


def test_two_rounds_in_flight_with_compute_between_send_and_wait():
    gen = torch.Generator().manual_seed(7)
    ranks_a, ranks_b = _two_workspaces()
    for step, counts in enumerate(([5, 0, 17, 3], [48, 1, 0, 9], [0, 0, 2, 0])):
        a = MicroBatch(ranks_a, gen, counts)
        b = MicroBatch(ranks_b, gen, list(reversed(counts)))  # another M, other routing
        a.send()
        b.send()
        _stand_in_compute()
        got_a, got_b = a.wait(), b.wait()
        ys_a, ys_b = a.experts(got_a), b.experts(got_b)
        outs_a = [r.combine_output() for r in ranks_a.ranks]
        outs_b = [r.combine_output() for r in ranks_b.ranks]
        for r, out in zip(ranks_a.ranks, outs_a):
            r.combine(out=out, phases=PHASE_SEND)
        for r, out in zip(ranks_b.ranks, outs_b):
            r.combine(out=out, phases=PHASE_SEND)
        _stand_in_compute()
        outs_a = [r.wait_combine() for r in ranks_a.ranks]
        outs_b = [r.wait_combine() for r in ranks_b.ranks]
        ranks_a.synchronize()
        ranks_b.synchronize()
        a.check(got_a, ys_a, [o.clone() for o in outs_a])
        b.check(got_b, ys_b, [o.clone() for o in outs_b])
    # Each workspace counted its own rounds: three each, never each other's.
    assert ranks_a.ranks[0].completed_rounds() == (3, 3)
    assert ranks_b.ranks[0].completed_rounds() == (3, 3)


def _weighted_identity_experts(micro_batch: MicroBatch, results) -> list[torch.Tensor]:
    """Capturable experts: ``y = (sum_k w_k) * x``, i.e. every expert the identity.
    Slots of other ranks' experts carry weight 0, so this is exactly what the
    reference's experts compute with ``expert_fn(e, x) = x``, with no host sync."""
    ys = []
    for rank, got in enumerate(results):
        y = (got.recv_topk_weights.sum(dim=1, keepdim=True) * got.recv_x.float())
        y = y.to(SPEC.combine_dtype)
        micro_batch.ranks.ranks[rank].combine_input().copy_(y)
        ys.append(y)
    return ys


def _comm_stream_step(a: MicroBatch, b: MicroBatch, comm: torch.cuda.Stream):
    """vLLM DBO's order with our comm regions: each region makes the comm stream
    wait for the compute so far, runs the fused launches there, and makes the
    compute stream wait for it; the other micro-batch's compute is queued on the
    compute stream in between, so the two overlap on the GPU."""
    compute = torch.cuda.current_stream()

    def region(fn):
        comm.wait_stream(compute)
        with torch.cuda.stream(comm):
            result = fn()
        compute.wait_stream(comm)
        return result

    _stand_in_compute()  # A's attention
    got_a = region(lambda: a.ranks.dispatch(a.xs, a.ids, a.ws, runtime_max_tokens=a.m))
    _stand_in_compute()  # B's attention, beside A's dispatch
    got_b = region(lambda: b.ranks.dispatch(b.xs, b.ids, b.ws, runtime_max_tokens=b.m))
    ys_a = _weighted_identity_experts(a, got_a)  # beside B's dispatch
    outs_a = region(lambda: a.ranks.combine())
    ys_b = _weighted_identity_experts(b, got_b)  # beside A's combine
    outs_b = region(lambda: b.ranks.combine())
    return got_a, got_b, ys_a, ys_b, outs_a, outs_b


def test_comm_stream_schedule_eager_and_in_a_cuda_graph():
    gen = torch.Generator().manual_seed(11)
    ranks_a, ranks_b = _two_workspaces()
    comm = torch.cuda.Stream()
    counts_a, counts_b = [6, 0, 13, 2], [1, 4, 0, 13]
    a, b = MicroBatch(ranks_a, gen, counts_a), MicroBatch(ranks_b, gen, counts_b)
    got_a, got_b, ys_a, ys_b, outs_a, outs_b = _comm_stream_step(a, b, comm)
    torch.cuda.synchronize()
    a.check(got_a, [y.cpu() for y in ys_a], outs_a)
    b.check(got_b, [y.cpu() for y in ys_b], outs_b)

    # The same step captured once and replayed with new inputs copied into the
    # captured tensors (same token counts, other tokens and routing).
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.cuda.graph(graph, stream=side):
        captured = _comm_stream_step(a, b, comm)
    torch.cuda.current_stream().wait_stream(side)
    got_a, got_b, ys_a, ys_b, outs_a, outs_b = captured
    for _ in range(3):
        fresh_a, fresh_b = MicroBatch(ranks_a, gen, counts_a), MicroBatch(ranks_b, gen, counts_b)
        for old, new in ((a, fresh_a), (b, fresh_b)):
            for dst, src in zip(old.xs + old.ids + old.ws, new.xs + new.ids + new.ws):
                dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        fresh_a.check(got_a, [y.cpu() for y in ys_a], [o.clone() for o in outs_a])
        fresh_b.check(got_b, [y.cpu() for y in ys_b], [o.clone() for o in outs_b])
    ranks_a.synchronize()
    ranks_b.synchronize()
