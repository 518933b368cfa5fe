"""Fault injection on the GPU: no hang, a named error, fail fast, recover.

One GPU, P logical ranks (design §8): a rank is stalled by a sleep kernel on its
own stream before its launch, skips a combine, disagrees on the runtime max
tokens, or sends ids out of range with the host check off; NaN / Inf payloads
must pass bit for bit. Each fault: the process survives, the error names rank,
peer and phase, every later call refuses at once (sticky), and after
``recover()`` the same objects run correct rounds. The multi-process variants
(one rank per process: torch symmetric memory on two GPUs, CUDA IPC with two
processes on one GPU) run the stall-and-recover story across processes.

Timeouts are short (0.2 s) so the whole file takes well under two minutes.
"""

from __future__ import annotations

import contextlib
import faulthandler
import sys
import time

import pytest
import torch

from benchmarks.fault_detection import KINDS, FaultRig
from benchmarks.soak_reference import Checker, SoakCase, generate_round
from tests.data import random_token_counts
from tests.multiproc import run_ranks
from tests.test_kernels_gpu import make_inputs, run_round, to_gpu
from vllm_a2a_plugin import A2AConfig, AllToAllSpec, LocalRanks, ops
from vllm_a2a_plugin.all_to_all import PHASE_SEND
from vllm_a2a_plugin.errors import (
    A2AExpertIdError,
    A2AMismatchError,
    A2APeerLostError,
    A2AStateError,
    A2ATimeoutError,
)
from vllm_a2a_plugin.padding import linear_expert_owner

pytestmark = pytest.mark.gpu

TIMEOUT_S = 0.2
STALL_S = 4 * TIMEOUT_S
# torch.cuda._sleep counts SM clock cycles. No GPU we run on clocks its SMs above
# 2.1 GHz (H100 / H200 boost 1.98), so this many cycles per second sleep at least
# that long (longer at lower clocks, which only makes a stall more certain).
_MAX_SM_HZ = 2.1e9


def stall(seconds: float) -> None:
    """Keep the current stream busy for at least ``seconds`` (a spinning kernel)."""
    torch.cuda._sleep(int(seconds * _MAX_SM_HZ))


def small_spec(p: int = 4, **changes) -> AllToAllSpec:
    fields = dict(ep_size=p, max_tokens_per_rank=8, hidden_size=256, top_k=2,
                  num_experts=4 * p)
    fields.update(changes)
    return AllToAllSpec(**fields)


@contextlib.contextmanager
def stacks_if_stuck(seconds: float):
    """In a child process: if the block still runs after ``seconds``, print every
    thread's Python stack to stderr (the parent's captured output) and go on
    (exit=False: the test's own deadline still decides). Set well below that
    deadline so a hang says where it is. ``sys.__stderr__``: faulthandler needs
    a real file descriptor, and run_ranks wraps ``sys.stderr`` in a prefixer."""
    faulthandler.dump_traceback_later(seconds, exit=False, file=sys.__stderr__)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def put_before_exit(out, message) -> None:
    """Put ``message`` on a multiprocessing queue and wait until it is in the pipe.

    ``Queue.put`` only hands the message to a feeder thread; a process that then
    ends with ``os._exit`` (no interpreter teardown, so no feeder join) drops it.
    Closes the queue: the last message this process sends."""
    out.put(message)
    out.close()
    out.join_thread()


def epochs(ranks: LocalRanks) -> list[tuple[int, int]]:
    """Every rank's (dispatch, combine) epoch, read from its workspace header."""
    torch.cuda.synchronize()
    fields = ops.header_field_offsets()
    found = []
    for rank in range(ranks.spec.ep_size):
        buf = ranks.workspace.buffer(rank)
        found.append(tuple(int(buf[fields[n]:fields[n] + 4].view(torch.int32).item())
                           for n in ("dispatch_epoch", "combine_epoch")))
    return found


def launch_each_rank(ranks: LocalRanks, work, *, stalled_rank: int | None = None,
                     stall_s: float = 0.0, skip_rank: int | None = None) -> None:
    """``work(rank)`` on one stream per rank, all in flight together (as separate
    GPUs run them); ``stalled_rank``'s stream first sleeps ``stall_s``;
    ``skip_rank`` does not call ``work`` at all."""
    current = torch.cuda.current_stream()
    streams = [torch.cuda.Stream() for _ in ranks.ranks]
    for rank, stream in enumerate(streams):
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            if rank == stalled_rank:
                stall(stall_s)
            if rank != skip_rank:
                work(rank)
    for stream in streams:
        current.wait_stream(stream)


def step_inputs(spec: AllToAllSpec, gen: torch.Generator, counts: list[int]):
    xs, ids, ws, _, _ = make_inputs(gen, spec, counts)
    return to_gpu(xs), to_gpu(ids), to_gpu(ws)


def assert_refuses_at_once(ranks: LocalRanks, error_type, expect_rank: int, expect_peer: int,
                           expect_phase: str, inputs) -> None:
    """The group refuses new work with the original error, launching nothing."""
    before = epochs(ranks)
    xs, ids, ws = inputs
    start = time.monotonic()
    with pytest.raises(error_type, match="raised again") as info:
        ranks.dispatch(xs, ids, ws)
    with pytest.raises(error_type):
        ranks.combine()
    elapsed = time.monotonic() - start
    assert elapsed < TIMEOUT_S / 4, f"refusing took {elapsed:.3f} s"
    err = info.value
    assert (err.rank, err.peer, err.phase) == (expect_rank, expect_peer, expect_phase)
    assert epochs(ranks) == before, "a refused call launched a kernel"


def recover_and_check(ranks: LocalRanks, gen: torch.Generator, rounds: int = 3) -> None:
    ranks.recover()
    assert ranks.failures() == {}
    assert all(e == (0, 0) for e in epochs(ranks))
    assert all(a2a.phase == "idle" for a2a in ranks.ranks)
    for _ in range(rounds):
        run_round(ranks, gen, random_token_counts(gen, ranks.spec.ep_size, 8))
    assert all(e == (rounds, rounds) for e in epochs(ranks))


def test_rank_stalled_in_dispatch():
    spec = small_spec(4)
    ranks = LocalRanks(spec, mode="concurrent", config=A2AConfig(timeout_s=TIMEOUT_S))
    gen = torch.Generator().manual_seed(1)
    run_round(ranks, gen, [3, 2, 0, 8])  # healthy: epoch 1
    xs, ids, ws = step_inputs(spec, gen, [4, 1, 0, 6])

    def dispatch(rank):
        ranks.ranks[rank].dispatch(xs[rank], ids[rank], ws[rank], runtime_max_tokens=6,
                                   check_expert_ids=False)

    launch_each_rank(ranks, dispatch, stalled_rank=1, stall_s=STALL_S)
    with pytest.raises(A2ATimeoutError) as info:
        ranks.synchronize()
    assert "rank 0 timed out after 0.2 s in dispatch waiting for peer 1 (epoch 2" in str(
        info.value)
    failures = ranks.failures()
    # Rank 1 ran late: its peers' flags were up, so it finished without an error.
    assert sorted(failures) == [0, 2, 3]
    for rank, err in failures.items():
        assert (err.rank, err.peer, err.phase, err.epoch) == (rank, 1, "dispatch", 2)
    assert_refuses_at_once(ranks, A2ATimeoutError, 0, 1, "dispatch", (xs, ids, ws))
    with pytest.raises(A2ATimeoutError) as info:  # each failed rank's object refuses too
        ranks.ranks[3].combine()
    assert (info.value.rank, info.value.peer) == (3, 1)
    recover_and_check(ranks, gen)


def test_rank_stalled_in_combine():
    spec = small_spec(4)
    ranks = LocalRanks(spec, mode="concurrent", config=A2AConfig(timeout_s=TIMEOUT_S))
    gen = torch.Generator().manual_seed(2)
    xs, ids, ws = step_inputs(spec, gen, [5, 0, 3, 2])
    ranks.dispatch(xs, ids, ws)
    ranks.synchronize()
    ys = [torch.randn(a2a.combine_input().shape, device="cuda").to(spec.combine_dtype)
          for a2a in ranks.ranks]
    outs = [a2a.combine_output() for a2a in ranks.ranks]  # no allocation between launches
    launch_each_rank(ranks, lambda r: ranks.ranks[r].combine(ys[r], out=outs[r]),
                     stalled_rank=2, stall_s=STALL_S)
    with pytest.raises(A2ATimeoutError) as info:
        ranks.synchronize()
    assert (info.value.rank, info.value.peer, info.value.phase) == (0, 2, "combine")
    failures = ranks.failures()
    assert sorted(failures) == [0, 1, 3]
    for rank, err in failures.items():
        assert (err.rank, err.peer, err.phase, err.epoch) == (rank, 2, "combine", 1)
    assert_refuses_at_once(ranks, A2ATimeoutError, 0, 2, "combine", (xs, ids, ws))
    recover_and_check(ranks, gen)


def test_rank_skips_a_combine():
    spec = small_spec(4)
    ranks = LocalRanks(spec, mode="concurrent", config=A2AConfig(timeout_s=TIMEOUT_S))
    gen = torch.Generator().manual_seed(3)
    xs, ids, ws = step_inputs(spec, gen, [2, 7, 1, 0])
    ranks.dispatch(xs, ids, ws)
    outs = [a2a.combine_output() for a2a in ranks.ranks]
    start = time.monotonic()
    launch_each_rank(ranks, lambda r: ranks.ranks[r].combine(out=outs[r]), skip_rank=3)
    with pytest.raises(A2ATimeoutError):
        ranks.synchronize()
    assert time.monotonic() - start < 10 * TIMEOUT_S, "no hang: the waits gave up"
    failures = ranks.failures()
    assert sorted(failures) == [0, 1, 2]
    assert {(e.peer, e.phase) for e in failures.values()} == {(3, "combine")}
    assert ranks.ranks[3].phase == "dispatched"  # the rank that skipped is mid-step
    assert_refuses_at_once(ranks, A2ATimeoutError, 0, 3, "combine", (xs, ids, ws))
    recover_and_check(ranks, gen)


def test_ranks_disagree_on_runtime_max_tokens():
    spec = small_spec(3)
    ranks = LocalRanks(spec, config=A2AConfig(timeout_s=TIMEOUT_S))
    gen = torch.Generator().manual_seed(4)
    xs, ids, ws = step_inputs(spec, gen, [4, 3, 4])
    for rank, m in enumerate([4, 4, 6]):  # rank 2 pads to 6, the others to 4
        ranks.ranks[rank].dispatch(xs[rank], ids[rank], ws[rank], runtime_max_tokens=m,
                                   phases=PHASE_SEND)
    for a2a in ranks.ranks:
        a2a.wait_dispatch()
    with pytest.raises(A2AMismatchError,
                       match="rank 0 used runtime_max_tokens=4 in dispatch but peer 2 used 6"):
        ranks.synchronize()
    failures = ranks.failures()
    assert sorted(failures) == [0, 1, 2]
    assert (failures[1].peer, failures[1].phase) == (2, "dispatch")
    assert failures[2].peer in (0, 1) and "rank 2 used runtime_max_tokens=6" in str(failures[2])
    with pytest.raises(A2AMismatchError, match="raised again"):
        ranks.combine()
    recover_and_check(ranks, gen)


# -1 is not among them: it means "no expert for this slot" (vLLM's padding tokens)
# and is skipped without an error (tests/test_kernels_gpu.py).
@pytest.mark.parametrize("bad_id", [-2, 16, 1 << 20])
@pytest.mark.parametrize("which", ["one_slot", "every_slot"])
def test_ids_out_of_range_with_the_host_check_off(bad_id, which):
    """Captured in a CUDA graph (no host check can run there, as in vLLM's graphs):
    the bad slot is skipped, the token's valid slots are delivered and combined,
    the error names the rank, the id and the token."""
    p, experts, hidden = 2, 16, 256
    spec = small_spec(p, num_experts=experts, hidden_size=hidden)
    ranks = LocalRanks(spec, config=A2AConfig(timeout_s=2.0, check_expert_ids=False))
    case = SoakCase(ep_size=p, capacity=8, hidden=hidden, top_k=2, num_experts=experts,
                    dtype="bf16", owner=tuple(linear_expert_owner(experts, p).tolist()),
                    mode="split")
    checker = Checker(case, "cuda")
    torch.manual_seed(5)
    inputs = generate_round(case, [3, 2], 3, "cuda")
    outputs = torch.zeros((p, 3, hidden), dtype=torch.bfloat16, device="cuda")

    def step():
        results = ranks.dispatch(inputs.per_rank(inputs.x), inputs.per_rank(inputs.topk_ids),
                                 inputs.per_rank(inputs.topk_weights), runtime_max_tokens=3)
        ranks.combine(list(inputs.y), outs=inputs.per_rank(outputs))
        return results

    step()  # warm-up with valid ids
    ranks.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        results = step()
    if which == "one_slot":
        inputs.topk_ids[0, 1, 1] = bad_id
    else:
        inputs.topk_ids[0, 1, :] = bad_id
    graph.replay()
    with pytest.raises(A2AExpertIdError) as info:
        ranks.synchronize()
    err = info.value
    assert (err.rank, err.peer, err.phase) == (0, -1, "dispatch")
    assert err.record[5:7] == (bad_id, 1)
    assert (f"rank 0 dispatched top-k id {bad_id} for its token 1, outside [0, {experts})"
            in str(err))
    assert "other, valid slots were delivered" in str(err)
    assert sorted(ranks.failures()) == [0]
    expected = checker.expected_dispatch(inputs)
    counts = (checker.dispatch_mismatches(results, inputs, expected)
              + checker.combine_mismatches(outputs, inputs, expected))
    assert counts.tolist() == [0] * 5, counts.tolist()
    if which == "one_slot":  # the valid slot of token 1 reached its owner
        owner = int(checker.owner[inputs.topk_ids[0, 1, 0].long()])
        assert bool(expected.slot_valid[owner, 0, 1])
        assert torch.equal(results[owner].recv_x[1], inputs.x[0, 1])
    else:  # no valid slot: no rank got it, and it combined to zeros
        assert not bool(expected.slot_valid[:, 0, 1].any())
        assert not bool(outputs[0, 1].any())
    with pytest.raises(A2AExpertIdError, match="raised again"):
        ranks.dispatch(inputs.per_rank(inputs.x), inputs.per_rank(inputs.topk_ids))
    del graph
    recover_and_check(ranks, torch.Generator().manual_seed(6), rounds=2)


_BF16_SPECIALS = [0x7FC0, 0x7FC1, 0xFFFF, 0x7F80, 0xFF80, 0x8000, 0x0001, 0x807F]
_FP8_SPECIALS = [0x7F, 0xFF, 0x80, 0x01, 0x7E, 0xFE]


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp8"])
def test_nan_and_inf_pass_through_bit_exact(dtype):
    p, hidden = 3, 256
    case = SoakCase(ep_size=p, capacity=6, hidden=hidden, top_k=3, num_experts=12, dtype=dtype,
                    owner=(0, 1, 2, 2, 1, 0, 0, 0, 1, 2, 1, 2), mode="split")
    ranks = LocalRanks(case.spec(), expert_owner=case.owner_tensor(),
                       config=A2AConfig(timeout_s=2.0))
    checker = Checker(case, "cuda")
    torch.manual_seed(7)
    inputs = generate_round(case, [6, 4, 5], 6, "cuda")
    x_bits = inputs.x.view(torch.uint8 if dtype == "fp8" else torch.int16)
    specials = _FP8_SPECIALS if dtype == "fp8" else _BF16_SPECIALS
    if dtype == "fp16":
        specials = [0x7E00, 0x7E01, 0xFFFF, 0x7C00, 0xFC00, 0x8000, 0x0001, 0x83FF]
    values = torch.tensor([v - (1 << 16) if v >= 1 << 15 and dtype != "fp8" else v
                           for v in specials], dtype=x_bits.dtype, device="cuda")
    for s in range(p):  # every sender, several tokens, NaN payloads and signs included
        x_bits[s, :3, :len(specials)] = values
        x_bits[s, 2, -len(specials):] = values
    special_f32 = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 1e-45],
                               device="cuda")
    inputs.topk_weights[:, :2, :2] = special_f32[:2]
    if inputs.x_scales is not None:
        inputs.x_scales[:, 1, :1] = special_f32[:1]
        inputs.x_scales[:, 0, :] = special_f32[torch.arange(inputs.x_scales.shape[-1]) % 5]
    # Combine inputs: NaN and +-Inf (no subnormals: the kernels' fast-math sum flushes them).
    inputs.y[:, :, 0] = float("nan")
    inputs.y[:, :, 1] = float("inf")
    inputs.y[0, :, 2] = float("-inf")
    outputs = torch.zeros((p, 6, hidden), dtype=case.combine_dtype, device="cuda")
    results = ranks.dispatch(inputs.per_rank(inputs.x), inputs.per_rank(inputs.topk_ids),
                             inputs.per_rank(inputs.topk_weights),
                             x_scales=inputs.per_rank(inputs.x_scales) if case.scale_cols
                             else None, runtime_max_tokens=6)
    ranks.combine(list(inputs.y), outs=inputs.per_rank(outputs))
    ranks.synchronize()  # no device error
    expected = checker.expected_dispatch(inputs)
    counts = (checker.dispatch_mismatches(results, inputs, expected)
              + checker.combine_mismatches(outputs, inputs, expected))
    assert counts.tolist() == [0] * 5, counts.tolist()
    # Spelled out for one received special row: the bits are the sender's bits.
    r, s, t = (int(v) for v in torch.nonzero(expected.slot_valid[:, :, :3])[0])
    got = results[r].recv_x[s * 6 + t].view(x_bits.dtype)
    assert torch.equal(got[:len(specials)], values)
    real = inputs.token_valid  # every real token has a target: NaN and +Inf columns survive
    assert bool(outputs[:, :, 0][real].isnan().all())
    assert bool((outputs[:, :, 1][real] == float("inf")).all())
    assert ranks.failures() == {}


def test_graph_captured_before_a_failure_replays_after_recover():
    """vLLM captures dispatch/combine in CUDA graphs; recover() resets the workspace
    in place, so those graphs stay valid."""
    from vllm_a2a_plugin.reference import combine_reference, dispatch_reference

    p, m, hidden, k, e = 2, 8, 256, 2, 8
    spec = small_spec(p, hidden_size=hidden, num_experts=e)
    ranks = LocalRanks(spec, config=A2AConfig(timeout_s=TIMEOUT_S, check_expert_ids=False))
    owner = linear_expert_owner(e, p)
    gen = torch.Generator().manual_seed(9)
    counts = [m, 5]
    static_x = [torch.zeros(n, hidden, dtype=torch.bfloat16, device="cuda") for n in counts]
    static_ids = [torch.zeros(n, k, dtype=torch.int32, device="cuda") for n in counts]
    static_w = [torch.zeros(n, k, dtype=torch.float32, device="cuda") for n in counts]
    static_y = [torch.zeros(p * m, hidden, dtype=torch.bfloat16, device="cuda") for _ in counts]

    def step():
        results = ranks.dispatch(static_x, static_ids, static_w, runtime_max_tokens=m)
        return results, ranks.combine(static_y)

    def replay_and_check():
        xs, ids, ws, _, _ = make_inputs(gen, spec, counts)
        for dst, src in zip(static_x + static_ids + static_w, xs + ids + ws):
            dst.copy_(src)
        for y in static_y:
            y.copy_(torch.randn(y.shape, generator=gen).to(torch.bfloat16))
        graph.replay()
        ranks.synchronize()
        refs = dispatch_reference(xs=xs, topk_ids=ids, topk_weights=ws, expert_owner=owner,
                                  runtime_max_tokens=m)
        for got, ref in zip(results, refs):
            assert torch.equal(got.recv_topk_ids.cpu(), ref.recv_topk_ids)
            assert torch.equal(got.recv_x.cpu()[ref.valid], ref.recv_x[ref.valid])
        want = combine_reference(ys=[y.cpu() for y in static_y], topk_ids=ids,
                                 expert_owner=owner, runtime_max_tokens=m)
        for got, exp in zip(outs, want):
            assert torch.equal(got.cpu(), exp)

    step()
    ranks.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        results, outs = step()
    replay_and_check()
    # The fault: rank 0 dispatches alone (rank 1 "hangs"), eagerly, outside the graph.
    ranks.ranks[0].dispatch(static_x[0], static_ids[0], static_w[0], runtime_max_tokens=m)
    with pytest.raises(A2ATimeoutError):
        ranks.synchronize()
    with pytest.raises(A2AStateError):  # rank 1 is idle and has nothing to combine
        ranks.ranks[1].combine()
    ranks.recover()
    for _ in range(5):
        replay_and_check()
    assert epochs(ranks) == [(5, 5), (5, 5)]


# ------------------------------------------------------------- one rank per process
# A child still running this long prints its stacks: below every parent
# deadline of the multi-process tests here (120 s) and pytest's --timeout (150 s),
# above a healthy child's whole life (start, CUDA, a few rounds: ~10-30 s).
STUCK_DUMP_S = 75.0


def _rank_stall_and_recover(rank: int, world_size: int, port: int, mode: str,
                            timeout_s: float) -> None:
    """Rank ``world_size - 1`` stalls before its dispatch. The others time out in
    dispatch and stop; the late rank finishes its dispatch, then times out in a
    combine its peers never join. Everyone recovers together and runs checked rounds."""
    with stacks_if_stuck(STUCK_DUMP_S):  # run_ranks gives up after 120 s
        _stall_and_recover(rank, world_size, mode, timeout_s)


def _stall_and_recover(rank: int, world_size: int, mode: str, timeout_s: float) -> None:
    import torch.distributed as dist

    from tests.test_kernels_multigpu import _init, _workspace
    from vllm_a2a_plugin import OneSidedAllToAll
    from vllm_a2a_plugin.reference import combine_reference, dispatch_reference

    _init(rank, world_size, mode)
    experts, hidden, top_k = 4 * world_size, 256, 2
    spec = AllToAllSpec(ep_size=world_size, max_tokens_per_rank=8, hidden_size=hidden,
                        top_k=top_k, num_experts=experts)
    a2a = OneSidedAllToAll(_workspace(spec, mode), rank,
                           config=A2AConfig(timeout_s=timeout_s, check_expert_ids=False))
    owner = linear_expert_owner(experts, world_size)
    late = world_size - 1

    def inputs(step: int):
        gen = torch.Generator().manual_seed(100 + step)
        counts = random_token_counts(gen, world_size, 8, zero_ranks=1)
        xs, ids, ws, _, _ = make_inputs(gen, spec, counts)
        ys = [torch.randn((world_size * max(counts), hidden), generator=gen)
              .to(torch.bfloat16) for _ in range(world_size)]
        return counts, xs, ids, ws, ys

    def checked_round(step: int) -> None:
        counts, xs, ids, ws, ys = inputs(step)
        m = max(counts)
        got = a2a.dispatch(xs[rank].cuda(), ids[rank].cuda(), ws[rank].cuda(),
                           runtime_max_tokens=m)
        a2a.synchronize()
        ref = dispatch_reference(xs=xs, topk_ids=ids, topk_weights=ws, expert_owner=owner,
                                 runtime_max_tokens=m)[rank]
        assert torch.equal(got.recv_topk_ids.cpu(), ref.recv_topk_ids)
        assert torch.equal(got.recv_x.cpu()[ref.valid], ref.recv_x[ref.valid])
        out = a2a.combine(ys[rank].cuda())
        a2a.synchronize()
        want = combine_reference(ys=ys, topk_ids=ids, expert_owner=owner,
                                 runtime_max_tokens=m)[rank]
        assert torch.equal(out.cpu(), want), f"rank {rank} step {step} combine"

    checked_round(0)
    dist.barrier()
    counts, xs, ids, ws, ys = inputs(1)
    m = max(counts)
    if rank == late:
        stall(3 * timeout_s)
    a2a.dispatch(xs[rank].cuda(), ids[rank].cuda(), ws[rank].cuda(), runtime_max_tokens=m)
    if rank == late:
        a2a.combine(ys[rank].cuda())  # its dispatch succeeds late; nobody joins this combine
        with pytest.raises(A2ATimeoutError) as info:
            a2a.synchronize()
        assert (info.value.rank, info.value.phase, info.value.epoch) == (late, "combine", 2)
        assert info.value.peer != late
    else:
        with pytest.raises(A2ATimeoutError) as info:
            a2a.synchronize()
        assert (info.value.rank, info.value.peer, info.value.phase, info.value.epoch) == (
            rank, late, "dispatch", 2)
        start = time.monotonic()
        with pytest.raises(A2ATimeoutError, match="raised again"):
            a2a.combine(ys[rank].cuda())
        assert time.monotonic() - start < timeout_s / 4
    # Collective: each rank waits for its own device work, then the barrier inside
    # keeps anyone from zeroing a header a late peer could still write.
    a2a.recover()
    assert a2a.failure is None and a2a.phase == "idle"
    for step in range(2, 5):
        checked_round(step)
    assert a2a.completed_rounds() == (3, 3)
    dist.barrier()
    a2a.workspace.release()


@pytest.mark.multigpu
def test_processes_stall_and_recover_over_symmetric_memory():
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, {torch.cuda.device_count()} visible")
    run_ranks(_rank_stall_and_recover, 2, "symmetric", 0.5, timeout_s=120)


def test_processes_sharing_a_gpu_stall_and_recover_over_cuda_ipc():
    """Two processes on one GPU time-slice it (ms per flag round trip): a longer timeout."""
    run_ranks(_rank_stall_and_recover, 2, "cuda_ipc_one_gpu", 1.5, timeout_s=120)


# ------------------------------------------------------------------ lost peers
WATCHDOG_INTERVAL_S = 0.2


@pytest.mark.parametrize("kind", KINDS)
def test_lost_peer_ends_every_wait_within_50ms_and_recovers(kind):
    """Three faults of one kind on 4 logical ranks, 2 rounds queued behind the
    stuck one on every survivor (benchmarks/fault_detection.py runs >= 100)."""
    rig = FaultRig(ep_size=4, interval_s=WATCHDOG_INTERVAL_S, queued=2, seed=7)
    try:
        assert rig.checked_round()  # epoch 1; inject() ends with one after recover()
        for _ in range(3):
            result = rig.inject(kind)
            assert not result.hang, result
            assert result.errors_ok, result.error
            assert not result.wrong, "a round after recover() differed from the reference"
            assert result.exit_ms < 50, f"kernels left {result.exit_ms:.1f} ms after the abort"
            interval_ms = WATCHDOG_INTERVAL_S * 1e3
            tick_ms = interval_ms / 10  # the watchdog beats and looks once per tick
            if kind == "kill":  # seen on the next tick, not after the interval
                assert result.detect_ms < interval_ms, result
            else:
                # A heartbeat must stand still for the whole interval, counted from
                # its last beat; that beat came up to one tick before the fault
                # (the clock of detect_ms), so detection may come one tick early.
                assert interval_ms - tick_ms - 5 <= result.detect_ms < interval_ms + 500, result
            phase = "combine" if kind == "stall_combine" else "dispatch"
            assert f"rank {result.victim} was lost" in result.error
            assert f"stopped {phase} at epoch 2" in result.error, result.error
    finally:
        rig.close()


def test_rank_slow_for_five_intervals_trips_nothing():
    """A slow peer (its GPU busy for 5x the interval) is not a lost one: its
    heartbeat thread lives, so the round completes, exact, with no error."""
    spec = small_spec(4)
    ranks = LocalRanks(spec, mode="concurrent", config=A2AConfig(timeout_s=30.0))
    ranks.start_watchdog(WATCHDOG_INTERVAL_S)
    try:
        gen = torch.Generator().manual_seed(11)
        xs, ids, ws = step_inputs(spec, gen, [3, 5, 0, 8])

        def dispatch(rank):
            ranks.ranks[rank].dispatch(xs[rank], ids[rank], ws[rank], runtime_max_tokens=8,
                                       check_expert_ids=False)

        launch_each_rank(ranks, dispatch, stalled_rank=2, stall_s=5 * WATCHDOG_INTERVAL_S)
        ranks.synchronize()
        assert not ranks.abort.raised and ranks.failures() == {}
        ranks.combine()
        ranks.synchronize()
        run_round(ranks, gen, [2, 2, 7, 1])  # still exact afterwards
        assert epochs(ranks) == [(2, 2)] * 4
    finally:
        ranks.close()


def _rank_lost_process(rank: int, world_size: int, port: int, scenario: str, out) -> None:
    """Two processes on one GPU through the pool (CUDA IPC, the watchdog started
    with the first workspace). Rank 1 is killed or stopped by the test while
    rank 0 waits in dispatch for it."""
    with stacks_if_stuck(STUCK_DUMP_S):  # the parent waits 120 s for each message
        _lost_process(rank, world_size, port, scenario, out)


def _lost_process(rank: int, world_size: int, port: int, scenario: str, out) -> None:
    import os

    import torch.distributed as dist

    from vllm_a2a_plugin.pool import AllToAllPool

    os.environ["VLLM_A2A_PEER_INTERVAL_S"] = str(WATCHDOG_INTERVAL_S)
    torch.cuda.set_device(0)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    spec = AllToAllSpec(ep_size=world_size, max_tokens_per_rank=8, hidden_size=256, top_k=2,
                        num_experts=8)
    pool = AllToAllPool(dist.group.WORLD, device="cuda",
                        config=A2AConfig(timeout_s=60.0, check_expert_ids=False))
    a2a = pool.all_to_all(spec)
    gen = torch.Generator().manual_seed(5)
    xs, ids, ws, _, _ = make_inputs(gen, spec, [4] * world_size)

    def full_round() -> None:
        a2a.dispatch(xs[rank].cuda(), ids[rank].cuda(), ws[rank].cuda(), runtime_max_tokens=4)
        a2a.combine(a2a.combine_input())
        a2a.synchronize()

    full_round()
    dist.barrier()
    out.put(("ready", rank, os.getpid()))
    if rank == 1:
        while not a2a.abort.raised:  # killed here, or stopped and later resumed
            time.sleep(0.001)
    else:
        a2a.dispatch(xs[rank].cuda(), ids[rank].cuda(), ws[rank].cuda(), runtime_max_tokens=4)
        a2a.combine(a2a.combine_input())  # queued behind the stuck dispatch
    start = time.time()
    try:
        while True:
            a2a.check_errors()
            time.sleep(0.001)
    except A2APeerLostError as exc:
        err = exc
    torch.cuda.synchronize()  # every queued kernel ends: no hang
    lost = ("lost", rank, (err.peer, err.phase, err.reason), time.time(), time.time() - start)
    if scenario != "stop":
        # The group is broken (its peer is gone): no collective teardown. The
        # message must be in the pipe before os._exit, which skips the feeder join.
        put_before_exit(out, lost)
        faulthandler.cancel_dump_traceback_later()
        os._exit(0)
    out.put(lost)
    # Both alive again (the stopped peer resumed): the group recovers and runs
    # exact rounds.
    pool.recover()
    full_round()
    out.put(("recovered", rank, a2a.failure is None, time.time(), 0.0))
    dist.barrier()
    pool.destroy()
    dist.destroy_process_group()


@pytest.mark.parametrize("scenario", ["kill", "stop"])
def test_processes_sharing_a_gpu_lost_peer_is_seen_fast(scenario):
    """kill -9 (or SIGSTOP) one of two CUDA processes mid-step: the other raises
    A2APeerLostError within the interval plus slack, not after its 60 s timeout.
    A stopped peer that resumes sees the same loss, and both recover."""
    import os
    import queue as queue_module
    import signal

    import torch.multiprocessing as mp

    from vllm_a2a_plugin.testing.serve import free_port

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_lost_process, args=(r, 2, port, scenario, out),
                         daemon=True) for r in range(2)]
    for p in procs:
        p.start()

    def collect(kind, count, timeout_s=120):
        found, deadline = {}, time.monotonic() + timeout_s
        while len(found) < count:
            try:
                msg = out.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue_module.Empty:
                # Exit codes (None: still running) tell a hung rank from one
                # that ended without reporting.
                codes = {r: p.exitcode for r, p in enumerate(procs)}
                raise AssertionError(f"only {sorted(found)} reported {kind}; exit codes "
                                     f"{codes}") from None
            if msg[0] == kind:
                found[msg[1]] = msg[2:]
        return found

    try:
        ready = collect("ready", 2)
        time.sleep(0.5)  # rank 0's dispatch is spinning on rank 1 by now
        fault_at = time.time()
        os.kill(ready[1][0], signal.SIGKILL if scenario == "kill" else signal.SIGSTOP)
        lost = collect("lost", 1)
        (peer, phase, reason), seen_at, _ = lost[0]
        assert (peer, phase) == (1, "dispatch")
        assert seen_at - fault_at < WATCHDOG_INTERVAL_S + 2.0, seen_at - fault_at
        if scenario == "kill":
            assert reason == "its process is gone"
            return
        assert "heartbeat stopped" in reason
        os.kill(ready[1][0], signal.SIGCONT)
        resumed = collect("lost", 1)
        assert resumed[1][0][0] == 1, "the resumed rank names the same lost peer"
        recovered = collect("recovered", 2)
        assert recovered[0][0] and recovered[1][0]
    finally:
        for p in procs:
            if p.is_alive():
                try:
                    os.kill(p.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
            p.join(30)
            if p.is_alive():
                p.kill()
