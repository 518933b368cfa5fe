"""Our CUDA kernels against the pure-torch reference, P logical ranks on one GPU."""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch

from tests.conftest import quick, under_sanitizer
from tests.data import (random_hidden, random_token_counts, random_topk_ids, random_weights,
                        skewed_topk_ids)
from vllm_a2a_plugin import A2AConfig, AllToAllSpec, LocalRanks
from vllm_a2a_plugin.errors import A2AInputError, A2AMismatchError, A2AStateError, A2ATimeoutError
from vllm_a2a_plugin.padding import linear_expert_owner
from vllm_a2a_plugin.reference import (combine_reference, dense_moe_reference, dispatch_reference,
                                       experts_reference)

pytestmark = pytest.mark.gpu

MODES = ["split"] if under_sanitizer() else ["split", "concurrent"]
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn]
HIDDENS = [128, 2048, 4096, 7168]


def poison_workspaces(ranks: LocalRanks, gen: torch.Generator) -> None:
    """Random bytes everywhere but the header, so unwritten outputs show up."""
    start = ranks.workspace.layout.recv_topk_ids
    for buf in ranks.workspace.buffers.values():
        noise = torch.randint(0, 256, (buf.numel() - start,), generator=gen, dtype=torch.uint8)
        buf[start:].copy_(noise)


def make_inputs(gen, spec: AllToAllSpec, counts, *, skewed=False, extra_rows=()):
    topk_fn = skewed_topk_ids if skewed else random_topk_ids
    ids = [topk_fn(gen, n, spec.top_k, spec.num_experts) for n in counts]
    xs = [random_hidden(gen, n, spec.hidden_size, spec.dispatch_dtype) for n in counts]
    ws = [random_weights(gen, n, spec.top_k) for n in counts]
    scales = [torch.rand((n, spec.scale_cols), generator=gen) if spec.scale_cols else None
              for n in counts]
    extras = [tuple(torch.randint(0, 256, (n, row), generator=gen, dtype=torch.uint8)
                    for row in extra_rows) for n in counts]
    return xs, ids, ws, scales, extras


def to_gpu(values):
    return [None if v is None else (tuple(e.cuda() for e in v) if isinstance(v, tuple)
                                    else v.cuda()) for v in values]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def assert_dispatch_matches(results, refs, spec):
    for rank, (got, ref) in enumerate(zip(results, refs)):
        valid = ref.valid.cuda()
        assert torch.equal(got.recv_topk_ids, ref.recv_topk_ids.cuda()), f"rank {rank} ids"
        assert torch.equal(got.recv_topk_weights, ref.recv_topk_weights.cuda()), f"rank {rank} w"
        assert torch.equal(bits(got.recv_x[valid]), bits(ref.recv_x.cuda()[valid])), \
            f"rank {rank} hidden states"
        if spec.scale_cols:
            assert torch.equal(got.recv_x_scales[valid], ref.recv_x_scales.cuda()[valid])
        for i, (g, r) in enumerate(zip(got.recv_extra, ref.recv_extra)):
            assert torch.equal(g[valid], r.cuda()[valid]), f"rank {rank} extra payload {i}"
        assert got.padding_id == ref.padding_id != -1


def expert_fn(e: int, x: torch.Tensor) -> torch.Tensor:
    return x * (0.5 + 0.01 * e) + 0.001 * e


def run_round(ranks: LocalRanks, gen, counts, *, skewed=False, extra_rows=(), zero_copy=True,
              check_dense=True):
    """One dispatch -> experts -> combine round checked against the reference."""
    spec = ranks.spec
    owner = linear_expert_owner(spec.num_experts, spec.ep_size)
    xs, ids, ws, scales, extras = make_inputs(gen, spec, counts, skewed=skewed,
                                              extra_rows=extra_rows)
    ids_gpu = to_gpu(ids)
    results = ranks.dispatch(to_gpu(xs), ids_gpu, to_gpu(ws), x_scales=to_gpu(scales),
                             extra_payloads=to_gpu(extras))
    refs = dispatch_reference(xs=xs, topk_ids=ids, topk_weights=ws, x_scales=scales,
                              extra_payloads=extras, expert_owner=owner)
    torch.cuda.synchronize()
    ranks.synchronize()
    assert_dispatch_matches(results, refs, spec)

    per_rank = spec.num_experts // spec.ep_size
    ys = []
    for rank, got in enumerate(results):
        local = range(rank * per_rank, (rank + 1) * per_rank)
        y = experts_reference(got, expert_fn, local_experts=local, out_dtype=spec.combine_dtype)
        if zero_copy and rank % 2 == 0:
            ranks.ranks[rank].combine_input().copy_(y)
            ys.append(None)
        else:
            ys.append(y)
    y_all = [y if y is not None else ranks.ranks[r].combine_input().clone()
             for r, y in enumerate(ys)]
    outs = ranks.combine(ys)
    ranks.synchronize()
    m = results[0].runtime_max_tokens
    expected = combine_reference(ys=y_all, topk_ids=ids_gpu, expert_owner=owner,
                                 runtime_max_tokens=m)
    for rank, (got, exp) in enumerate(zip(outs, expected)):
        assert got.shape == (counts[rank], spec.hidden_size)
        torch.testing.assert_close(got.float().cpu(), exp.float(), rtol=1e-5, atol=1e-5,
                                   msg=f"rank {rank} combine vs reference")
        if check_dense and counts[rank]:
            dense = dense_moe_reference(xs[rank].cuda(), ids_gpu[rank], ws[rank].cuda(), expert_fn)
            rel = (got.float() - dense).norm() / dense.norm().clamp_min(1e-6)
            tol = 3e-2 if spec.combine_dtype != torch.float32 else 1e-4
            assert rel < tol, f"rank {rank} vs dense MoE: rel err {rel:.2e}"
    return outs


def _cases():
    cases = []
    for i, (p, mode, dtype) in enumerate(itertools.product([1, 2, 4, 8], MODES, DTYPES)):
        hidden = HIDDENS[i % len(HIDDENS)]
        top_k = [1, 2, 4, 8, 6, 10, 3, 16][i % 8]
        experts = max(16, top_k * p) if i % 3 else 256
        experts = -(-experts // p) * p
        cases.append((p, mode, dtype, hidden, top_k, experts))
    if quick():
        cases = cases[::5]
    return cases


@pytest.mark.parametrize("p,mode,dtype,hidden,top_k,experts", _cases())
def test_dispatch_combine_matches_reference(p, mode, dtype, hidden, top_k, experts):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{p}{mode}{dtype}{hidden}{top_k}".encode()))
    scale_cols = hidden // 128 if dtype == torch.float8_e4m3fn else 0
    spec = AllToAllSpec(ep_size=p, max_tokens_per_rank=64, hidden_size=hidden, top_k=top_k,
                        num_experts=experts, dispatch_dtype=dtype, scale_cols=scale_cols,
                        extra_payload_row_bytes=(16, 36),
                        combine_dtype=torch.bfloat16 if dtype == torch.float8_e4m3fn else dtype)
    ranks = LocalRanks(spec, mode=mode, config=A2AConfig(timeout_s=5.0))
    poison_workspaces(ranks, gen)
    for round_ in range(3):  # several rounds: epochs advance, buffers reused
        counts = random_token_counts(gen, p, 64, zero_ranks=1 if p > 1 else round_ % 2)
        run_round(ranks, gen, counts, extra_rows=(16, 36), skewed=round_ == 2)


@pytest.mark.parametrize("top_k", list(range(1, 17)) if not quick() else [1, 7, 16])
def test_every_top_k(top_k):
    gen = torch.Generator().manual_seed(top_k)
    spec = AllToAllSpec(ep_size=4, max_tokens_per_rank=32, hidden_size=128, top_k=top_k,
                        num_experts=64)
    ranks = LocalRanks(spec, config=A2AConfig(timeout_s=5.0))
    poison_workspaces(ranks, gen)
    run_round(ranks, gen, random_token_counts(gen, 4, 32))


@pytest.mark.parametrize("hidden", HIDDENS)
def test_hidden_sizes_fp8_with_scales(hidden):
    gen = torch.Generator().manual_seed(hidden)
    spec = AllToAllSpec(ep_size=2, max_tokens_per_rank=48, hidden_size=hidden, top_k=8,
                        num_experts=32, dispatch_dtype=torch.float8_e4m3fn,
                        scale_cols=hidden // 128)
    ranks = LocalRanks(spec, config=A2AConfig(timeout_s=5.0))
    poison_workspaces(ranks, gen)
    run_round(ranks, gen, [48, 17])


@pytest.mark.parametrize("threads,max_blocks", [(32, 1), (256, 1), (256, 3), (512, 2),
                                                (64, 0), (256, 0)])
def test_rows_cut_into_pieces_under_any_grid(threads, max_blocks):
    """The launchers cut each row into as many pieces as the grid allows (7 for a
    7168-wide bf16 row): uneven splits, grids of one block, 4-byte payloads
    (a 12-byte extra row) and 16-byte ones must all land exactly."""
    gen = torch.Generator().manual_seed(threads * 7 + max_blocks)
    spec = AllToAllSpec(ep_size=2, max_tokens_per_rank=40, hidden_size=7168, top_k=4,
                        num_experts=16, extra_payload_row_bytes=(12, 224))
    ranks = LocalRanks(spec, config=A2AConfig(threads_per_block=threads, max_blocks=max_blocks,
                                              timeout_s=5.0))
    poison_workspaces(ranks, gen)
    for counts in ([1, 0], [3, 2], [40, 13], [0, 1]):
        run_round(ranks, gen, counts, extra_rows=(12, 224))


def test_block_size_beyond_the_kernels_limit_is_refused():
    """The combine kernel's registers allow no 1024-thread blocks; that must be a
    clear error at construction, not a failed launch later."""
    spec = AllToAllSpec(ep_size=2, max_tokens_per_rank=8, hidden_size=256, top_k=2,
                        num_experts=4)
    with pytest.raises(A2AInputError, match=r"threads_per_block \(1024\) exceeds"):
        LocalRanks(spec, config=A2AConfig(threads_per_block=1024))


def test_all_ranks_zero_tokens_then_normal():
    gen = torch.Generator().manual_seed(7)
    spec = AllToAllSpec(ep_size=4, max_tokens_per_rank=16, hidden_size=256, top_k=2,
                        num_experts=8)
    for mode in MODES:
        ranks = LocalRanks(spec, mode=mode, config=A2AConfig(timeout_s=5.0))
        outs = run_round(ranks, gen, [0, 0, 0, 0])
        assert all(o.shape == (0, 256) for o in outs)
        run_round(ranks, gen, [3, 0, 16, 1])


def test_large_expert_counts_and_top_k_16():
    gen = torch.Generator().manual_seed(11)
    for experts, top_k in ((384, 8), (512, 16)):
        spec = AllToAllSpec(ep_size=8, max_tokens_per_rank=40, hidden_size=2048, top_k=top_k,
                            num_experts=experts)
        ranks = LocalRanks(spec, config=A2AConfig(timeout_s=5.0))
        poison_workspaces(ranks, gen)
        run_round(ranks, gen, random_token_counts(gen, 8, 40, zero_ranks=2), check_dense=False)


def test_runtime_max_tokens_below_capacity_and_round_robin_owner():
    gen = torch.Generator().manual_seed(5)
    spec = AllToAllSpec(ep_size=4, max_tokens_per_rank=128, hidden_size=512, top_k=4,
                        num_experts=16)
    owner = (torch.arange(16) % 4).to(torch.int32)  # round-robin placement
    ranks = LocalRanks(spec, expert_owner=owner, config=A2AConfig(timeout_s=5.0))
    xs, ids, ws, _, _ = make_inputs(gen, spec, [5, 9, 0, 2])
    results = ranks.dispatch(to_gpu(xs), to_gpu(ids), to_gpu(ws))
    refs = dispatch_reference(xs=xs, topk_ids=ids, topk_weights=ws, expert_owner=owner)
    ranks.synchronize()
    assert results[0].runtime_max_tokens == 9
    assert results[0].recv_x.shape == (4 * 9, 512)
    assert_dispatch_matches(results, refs, spec)
    assert [r.padding_id for r in results] == [1, 0, 0, 0]
    ranks.combine([torch.zeros_like(ranks.ranks[r].combine_input()) for r in range(4)])
    ranks.synchronize()


@pytest.mark.parametrize("mode", MODES)
def test_cuda_graph_replay_with_new_data(mode):
    gen = torch.Generator().manual_seed(3)
    p, m, hidden, k, e = 4, 32, 1024, 4, 32
    spec = AllToAllSpec(ep_size=p, max_tokens_per_rank=m, hidden_size=hidden, top_k=k,
                        num_experts=e)
    ranks = LocalRanks(spec, mode=mode, config=A2AConfig(timeout_s=5.0, check_expert_ids=False))
    owner = linear_expert_owner(e, p)
    counts = [m, 7, 0, 20]
    static_x = [torch.zeros(n, hidden, dtype=torch.bfloat16, device="cuda") for n in counts]
    static_ids = [torch.zeros(n, k, dtype=torch.int32, device="cuda") for n in counts]
    static_w = [torch.zeros(n, k, dtype=torch.float32, device="cuda") for n in counts]
    static_y = [torch.zeros(p * m, hidden, dtype=torch.bfloat16, device="cuda") for _ in counts]

    def load_new_data():
        xs, ids, ws, _, _ = make_inputs(gen, spec, counts)
        for dst, src in zip(static_x + static_ids + static_w, xs + ids + ws):
            dst.copy_(src)
        for y in static_y:
            y.copy_(torch.randn(y.shape, generator=gen).to(torch.bfloat16))
        return xs, ids, ws

    def step():
        results = ranks.dispatch(static_x, static_ids, static_w, runtime_max_tokens=m)
        outs = ranks.combine(static_y)
        return results, outs

    load_new_data()
    step()  # warm up outside capture (allocates combine outputs)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        results, outs = step()
    torch.cuda.current_stream().wait_stream(stream)
    # Eager rounds with other token counts between capture and replay (every rank
    # empty, then a mixed step), then the allocator's cache emptied: the outputs
    # the graph writes (out=None, the all-to-all's own buffer) must still be
    # there. A buffer per token count was freed here, and replays wrote into
    # freed memory (an illegal address in bench_a2a.py's zero-token floor).
    run_round(ranks, gen, [0] * p)
    run_round(ranks, gen, [3, 0, m, 1])
    torch.cuda.empty_cache()
    replays = 20 if quick() else 100
    for _ in range(replays):
        xs, ids, ws = load_new_data()
        graph.replay()
        torch.cuda.synchronize()
        ranks.synchronize()
        refs = dispatch_reference(xs=xs, topk_ids=ids, topk_weights=ws, expert_owner=owner,
                                  runtime_max_tokens=m)
        assert_dispatch_matches(results, refs, spec)
        expected = combine_reference(ys=[y.cpu() for y in static_y], topk_ids=ids,
                                     expert_owner=owner, runtime_max_tokens=m)
        for got, exp in zip(outs, expected):
            torch.testing.assert_close(got.float().cpu(), exp.float(), rtol=1e-5, atol=1e-5)
    # Epochs advanced on the device, once per replay, identically on every rank.
    ranks.ranks[0].check_errors()


def test_timeout_names_rank_peer_and_phase():
    spec = AllToAllSpec(ep_size=2, max_tokens_per_rank=4, hidden_size=128, top_k=1,
                        num_experts=2)
    ranks = LocalRanks(spec, config=A2AConfig(timeout_s=0.5))
    x = torch.randn(2, 128, device="cuda").to(torch.bfloat16)
    ids = torch.tensor([[0], [1]], dtype=torch.int32, device="cuda")
    ranks.ranks[0].dispatch(x, ids, runtime_max_tokens=2)  # rank 1 never dispatches
    torch.cuda.synchronize()
    with pytest.raises(A2ATimeoutError) as info:
        ranks.ranks[0].check_errors()
    err = info.value
    assert (err.rank, err.peer, err.phase) == (0, 1, "dispatch")
    assert "rank 0 timed out after 0.5 s in dispatch waiting for peer 1" in str(err)
    # The process (and the GPU context) survives: the next call raises at once too.
    with pytest.raises(A2ATimeoutError):
        ranks.ranks[0].combine()


def test_combine_timeout_when_peer_skips_combine():
    spec = AllToAllSpec(ep_size=2, max_tokens_per_rank=4, hidden_size=128, top_k=1,
                        num_experts=2)
    ranks = LocalRanks(spec, config=A2AConfig(timeout_s=0.5))
    x = [torch.randn(1, 128, device="cuda").to(torch.bfloat16) for _ in range(2)]
    ids = [torch.tensor([[1]], dtype=torch.int32, device="cuda") for _ in range(2)]
    ranks.dispatch(x, ids)
    ranks.ranks[0].combine()  # rank 1 never combines
    torch.cuda.synchronize()
    with pytest.raises(A2ATimeoutError) as info:
        ranks.ranks[0].check_errors()
    assert (info.value.rank, info.value.peer, info.value.phase) == (0, 1, "combine")


def test_runtime_tokens_mismatch_is_reported():
    spec = AllToAllSpec(ep_size=2, max_tokens_per_rank=8, hidden_size=128, top_k=1,
                        num_experts=2)
    ranks = LocalRanks(spec, config=A2AConfig(timeout_s=2.0))
    x = torch.randn(2, 128, device="cuda").to(torch.bfloat16)
    ids = torch.tensor([[0], [1]], dtype=torch.int32, device="cuda")
    ranks.ranks[0].dispatch(x, ids, runtime_max_tokens=2, phases=1)
    ranks.ranks[1].dispatch(x, ids, runtime_max_tokens=4, phases=1)
    ranks.ranks[0].wait_dispatch()
    torch.cuda.synchronize()
    with pytest.raises(A2AMismatchError, match="rank 0 used runtime_max_tokens=2 .* peer 1 used 4"):
        ranks.ranks[0].check_errors()


def test_bad_inputs_raise_before_launch():
    spec = AllToAllSpec(ep_size=2, max_tokens_per_rank=8, hidden_size=128, top_k=2,
                        num_experts=4)
    a2a = LocalRanks(spec).ranks[0]
    x = torch.randn(3, 128, device="cuda").to(torch.bfloat16)
    ids = torch.tensor([[0, 1], [2, 3], [1, 2]], dtype=torch.int32, device="cuda")
    with pytest.raises(A2AInputError, match="x must be torch.bfloat16, got torch.float32"):
        a2a.dispatch(x.float(), ids)
    with pytest.raises(A2AInputError, match=r"topk_ids must be torch.int32, got torch.int64"):
        a2a.dispatch(x, ids.long())
    with pytest.raises(A2AInputError, match=r"x is on cpu but the all-to-all runs on cuda:0"):
        a2a.dispatch(x.cpu(), ids)
    with pytest.raises(A2AInputError, match="must be contiguous"):
        a2a.dispatch(torch.randn(128, 3, device="cuda").to(torch.bfloat16).t(), ids)
    bad = ids.clone()
    bad[1, 1] = 4
    with pytest.raises(A2AInputError, match=r"topk_ids\[1, 1\] = 4 is out of range"):
        a2a.dispatch(x, bad)
    with pytest.raises(A2AInputError, match="runtime_max_tokens .9. exceeds the workspace"):
        a2a.dispatch(x, ids, runtime_max_tokens=9)
    with pytest.raises(A2AInputError, match="this rank has 3 tokens but runtime_max_tokens is 2"):
        a2a.dispatch(x, ids, runtime_max_tokens=2)
    with pytest.raises(A2AStateError, match="call dispatch.. first"):
        a2a.combine()
    assert a2a.phase == "idle"


def test_launch_plan_checks_every_call_and_lives_as_long_as_its_all_to_all():
    """The planned ops (fewer arguments per call) refuse what the plan
    was not made for, with a message, before any launch; the plan is freed with
    its all-to-all and replaced when the workspace pointers or the config change."""
    import gc
    import weakref

    spec = AllToAllSpec(ep_size=2, max_tokens_per_rank=8, hidden_size=128, top_k=2,
                        num_experts=4)
    ranks = LocalRanks(spec, config=A2AConfig(timeout_s=5.0))
    a2a, other = ranks.ranks
    plan = a2a._launch_plan()
    assert plan > 0 and a2a._launch_plan() == plan  # made once, kept
    ws = a2a._buffer
    x = torch.randn(3, 128, device="cuda").to(torch.bfloat16)
    ids = torch.tensor([[0, 1], [2, 3], [1, 2]], dtype=torch.int32, device="cuda")
    out = torch.empty(3, 128, dtype=torch.bfloat16, device="cuda")
    dispatch = torch.ops.a2a_one_sided.dispatch_planned
    combine = torch.ops.a2a_one_sided.combine_planned
    with pytest.raises(RuntimeError, match="is not the one launch plan"):
        dispatch(plan, other._buffer, x, None, ids, None, 3, 3)
    with pytest.raises(RuntimeError,
                       match=r"x must be BFloat16 with rows of shape \[128\] \(this plan's\), "
                             r"got Float"):
        dispatch(plan, ws, x.float(), None, ids, None, 3, 3)
    with pytest.raises(RuntimeError, match="this plan sends x only, got 2 payloads"):
        dispatch(plan, ws, x, torch.ones(3, 1, device="cuda"), ids, None, 3, 3)
    with pytest.raises(RuntimeError, match="runtime_max_tokens .9. must be"):
        dispatch(plan, ws, x, None, ids, None, 9, 3)
    with pytest.raises(RuntimeError, match="topk_ids must be int32"):
        dispatch(plan, ws, x, None, ids.long(), None, 3, 3)
    with pytest.raises(RuntimeError, match=r"out must be BFloat16 with rows of shape \[128\]"):
        combine(plan, ws, ids, out.float(), 3, 3)
    with pytest.raises(RuntimeError, match="does not exist"):
        dispatch(plan + 1000, ws, x, None, ids, None, 3, 3)
    assert a2a.phase == "idle" and a2a.completed_rounds() == (0, 0)  # nothing launched

    # A new config gets a new plan, and the old one is gone.
    a2a.config = A2AConfig(timeout_s=4.0)
    replaced = a2a._launch_plan()
    assert replaced != plan
    with pytest.raises(RuntimeError, match="does not exist"):
        dispatch(plan, ws, x, None, ids, None, 3, 3)
    # The other rank's plan, made while the workspace still has its peer pointers.
    other_plan = other._launch_plan()
    # Released workspace: the next call refuses instead of using stale pointers.
    ranks.workspace.release()
    with pytest.raises(A2AStateError, match=r"it was released \(Workspace.release\(\)\)"):
        a2a.dispatch(x, ids)
    assert a2a.phase == "idle"
    # Collected with its all-to-all, released workspace or not.
    probe = weakref.ref(other)
    del ranks, a2a, other
    gc.collect()
    assert probe() is None
    with pytest.raises(RuntimeError, match="does not exist"):
        dispatch(other_plan, ws, x, None, ids, None, 3, 3)


def test_symmetric_memory_workspace_single_process():
    """The multi-process allocation path (torch symmetric memory) with one rank."""
    import os

    import torch.distributed as dist

    from vllm_a2a_plugin import OneSidedAllToAll, Workspace

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        spec = AllToAllSpec(ep_size=1, max_tokens_per_rank=16, hidden_size=256, top_k=2,
                            num_experts=4)
        ws = Workspace.allocate_symmetric(spec, dist.group.WORLD)
        a2a = OneSidedAllToAll(ws, 0, config=A2AConfig(timeout_s=5.0))
        gen = torch.Generator().manual_seed(1)
        x = random_hidden(gen, 10, 256, torch.bfloat16).cuda()
        ids = random_topk_ids(gen, 10, 2, 4).cuda()
        w = random_weights(gen, 10, 2).cuda()
        res = a2a.dispatch(x, ids, w, runtime_max_tokens=10)
        assert res.padding_id == 4  # every expert is local: out-of-range id
        assert torch.equal(res.recv_x, x)
        y = (res.recv_x.float() * 2).to(torch.bfloat16)
        out = a2a.combine(y)
        a2a.synchronize()
        torch.testing.assert_close(out, y)
    finally:
        dist.destroy_process_group()


def test_ops_trace_under_torch_compile():
    """The raw ops compile with inductor (fake impls, honest mutation schema).

    The workspace is a graph input, so inductor re-inplaces the mutation instead
    of copying: a copy of peer-visible memory is not what the peers write into
    (the op refuses it: "peer_ptrs[rank] must be this rank's workspace").
    """
    import torch._dynamo

    spec = AllToAllSpec(ep_size=2, max_tokens_per_rank=8, hidden_size=128, top_k=1,
                        num_experts=2)
    ranks = LocalRanks(spec, config=A2AConfig(timeout_s=5.0))
    ws = ranks.workspace
    peer_ptrs = ws.peer_ptrs
    owner = ranks.ranks[0]._expert_owner
    pads = ranks.ranks[0]._pad_ids
    errs = [a2a._error_record_ptr for a2a in ranks.ranks]
    x = [torch.randn(4, 128, device="cuda").to(torch.bfloat16) for _ in range(2)]
    ids = [torch.tensor([[0], [1], [1], [0]], dtype=torch.int32, device="cuda")] * 2
    outs = [torch.empty(4, 128, dtype=torch.bfloat16, device="cuda") for _ in range(2)]

    def dispatch_all(ws0, ws1, x0, x1, ids0, ids1):
        for phase in (1, 2):
            for rank, (buf, xx, ii) in enumerate(((ws0, x0, ids0), (ws1, x1, ids1))):
                torch.ops.a2a_one_sided.dispatch(
                    buf, peer_ptrs, rank, [xx], ii, None, owner, pads, errs[rank], 8, 4,
                    spec.combine_row_bytes, phase, 1, 256, 10**9)

    def combine_all(ws0, ws1, ids0, ids1, out0, out1):
        for phase in (1, 2):
            for rank, (buf, ii, oo) in enumerate(((ws0, ids0, out0), (ws1, ids1, out1))):
                torch.ops.a2a_one_sided.combine(
                    buf, peer_ptrs, rank, ii, owner, oo, errs[rank], 8, 4,
                    list(spec.payload_row_bytes), phase, 1, 256, 10**9)

    torch._dynamo.reset()
    bufs = [ws.buffers[0], ws.buffers[1]]
    torch.compile(dispatch_all, backend="inductor", fullgraph=True)(*bufs, *x, *ids)
    for rank in range(2):  # experts: identity, written where combine reads
        y = ws.region(rank, ws.layout.combine, torch.bfloat16, (8, 128))
        y.copy_(ws.region(rank, ws.layout.payloads[0], torch.bfloat16, (8, 128)))
    torch.compile(combine_all, backend="inductor", fullgraph=True)(*bufs, *ids, *outs)
    torch.cuda.synchronize()
    ranks.synchronize()
    # Each token went to exactly one expert's rank and came back unchanged.
    torch.testing.assert_close(outs[0], x[0])
    torch.testing.assert_close(outs[1], x[1])

    # The planned ops, as OneSidedAllToAll calls them, trace the same way. (The
    # experts' copy stays outside the compiled functions: inside, a write through
    # another view of a workspace input makes inductor copy the input, and the
    # planned op refuses a workspace that is not its plan's.)
    plans = [a2a._launch_plan() for a2a in ranks.ranks]
    outs_planned = [torch.empty_like(o) for o in outs]

    def planned_dispatch(ws0, ws1, x0, x1, ids0, ids1):
        for phase in (1, 2):
            for rank, (buf, xx, ii) in enumerate(((ws0, x0, ids0), (ws1, x1, ids1))):
                torch.ops.a2a_one_sided.dispatch_planned(plans[rank], buf, xx, None, ii, None,
                                                         4, phase)

    def planned_combine(ws0, ws1, ids0, ids1, out0, out1):
        for phase in (1, 2):
            for rank, (buf, ii, oo) in enumerate(((ws0, ids0, out0), (ws1, ids1, out1))):
                torch.ops.a2a_one_sided.combine_planned(plans[rank], buf, ii, oo, 4, phase)

    torch._dynamo.reset()
    torch.compile(planned_dispatch, backend="inductor", fullgraph=True)(*bufs, *x, *ids)
    for rank in range(2):
        y = ws.region(rank, ws.layout.combine, torch.bfloat16, (8, 128))
        y.copy_(ws.region(rank, ws.layout.payloads[0], torch.bfloat16, (8, 128)))
    torch.compile(planned_combine, backend="inductor", fullgraph=True)(*bufs, *ids,
                                                                      *outs_planned)
    torch.cuda.synchronize()
    torch.testing.assert_close(outs_planned[0], x[0])
    torch.testing.assert_close(outs_planned[1], x[1])


@pytest.mark.parametrize("check_ids", [True, False])
def test_no_expert_slots_are_skipped_without_error(check_ids):
    """vLLM's routers give padding tokens top-k id -1 (VLLM_MOE_SKIP_PADDING):
    such slots reach no rank and add nothing, with or without the host check,
    and a token whose every slot is -1 combines to zeros."""
    gen = torch.Generator().manual_seed(11)
    spec = AllToAllSpec(ep_size=2, max_tokens_per_rank=8, hidden_size=256, top_k=3,
                        num_experts=8)
    ranks = LocalRanks(spec, config=A2AConfig(timeout_s=5.0, check_expert_ids=check_ids))
    poison_workspaces(ranks, gen)
    counts = [6, 3]
    xs, ids, ws, _, _ = make_inputs(gen, spec, counts)
    ids[0][1] = -1          # a padding token: no expert at all
    ids[0][2, 0] = -1       # one slot without an expert, two with
    ids[1][:, 2] = -1
    results = ranks.dispatch(to_gpu(xs), to_gpu(ids), to_gpu(ws))
    ranks.synchronize()
    owner = linear_expert_owner(8, 2)
    assert_dispatch_matches(results, dispatch_reference(
        xs=xs, topk_ids=ids, topk_weights=ws, expert_owner=owner), spec)
    ys = [torch.randn((2 * 6, 256), generator=gen).bfloat16() for _ in range(2)]
    outs = ranks.combine(to_gpu(ys))
    ranks.synchronize()
    expected = combine_reference(ys=ys, topk_ids=ids, expert_owner=owner, runtime_max_tokens=6)
    for got, exp in zip(outs, expected):
        torch.testing.assert_close(got.float().cpu(), exp.float(), rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(outs[0][1]) == 0
