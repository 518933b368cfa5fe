"""Our kernels across processes, one GPU each, peer memory from torch symmetric
memory (issue 7/8). Every rank builds every rank's inputs from one seed and
checks its own outputs against the reference."""

from __future__ import annotations

import os

import pytest
import torch

from tests.data import (random_hidden, random_token_counts, random_topk_ids, random_weights)
from tests.multiproc import run_ranks

pytestmark = pytest.mark.multigpu

CASES = [(torch.bfloat16, 8, 256), (torch.float8_e4m3fn, 8, 384), (torch.bfloat16, 16, 256),
         (torch.float16, 3, 64)]


def _world() -> int:
    return int(os.environ.get("A2A_TEST_WORLD", torch.cuda.device_count()))


def _rank_correctness(rank, world_size, port, rounds):
    import torch.distributed as dist

    from vllm_a2a_plugin import A2AConfig, AllToAllSpec, OneSidedAllToAll, Workspace
    from vllm_a2a_plugin.padding import linear_expert_owner
    from vllm_a2a_plugin.reference import combine_reference, dispatch_reference

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world_size,
                            device_id=torch.device("cuda", rank))
    for dtype, top_k, experts in CASES:
        hidden = 7168 if dtype == torch.float8_e4m3fn else 2048
        scale_cols = hidden // 128 if dtype == torch.float8_e4m3fn else 0
        spec = AllToAllSpec(ep_size=world_size, max_tokens_per_rank=128, hidden_size=hidden,
                            top_k=top_k, num_experts=experts, dispatch_dtype=dtype,
                            scale_cols=scale_cols,
                            combine_dtype=torch.bfloat16 if dtype == torch.float8_e4m3fn else dtype)
        a2a = OneSidedAllToAll(Workspace.allocate_symmetric(spec, dist.group.WORLD), rank,
                               config=A2AConfig(timeout_s=10.0))
        owner = linear_expert_owner(experts, world_size)
        for step in range(rounds):
            gen = torch.Generator().manual_seed(1000 * step + top_k)
            counts = random_token_counts(gen, world_size, 128, zero_ranks=1)
            ids = [random_topk_ids(gen, n, top_k, experts) for n in counts]
            xs = [random_hidden(gen, n, hidden, dtype) for n in counts]
            ws = [random_weights(gen, n, top_k) for n in counts]
            sc = [torch.rand((n, scale_cols), generator=gen) if scale_cols else None for n in counts]
            m = max(counts)
            got = a2a.dispatch(xs[rank].cuda(), ids[rank].cuda(), ws[rank].cuda(),
                               x_scales=None if sc[rank] is None else sc[rank].cuda(),
                               runtime_max_tokens=m)
            ref = dispatch_reference(xs=xs, topk_ids=ids, topk_weights=ws,
                                     x_scales=sc if scale_cols else None, expert_owner=owner,
                                     runtime_max_tokens=m)[rank]
            torch.cuda.synchronize()
            a2a.check_errors()
            valid = ref.valid.cuda()
            assert torch.equal(got.recv_topk_ids, ref.recv_topk_ids.cuda())
            assert torch.equal(got.recv_topk_weights, ref.recv_topk_weights.cuda())
            assert torch.equal(got.recv_x[valid].view(torch.uint8),
                               ref.recv_x.cuda()[valid].view(torch.uint8))
            y_gen = torch.Generator().manual_seed(7 + step)
            ys = [torch.randn((world_size * m, hidden), generator=y_gen).to(spec.combine_dtype)
                  for _ in range(world_size)]
            out = a2a.combine(ys[rank].cuda())
            a2a.synchronize()
            expected = combine_reference(ys=ys, topk_ids=ids, expert_owner=owner,
                                         runtime_max_tokens=m)[rank]
            torch.testing.assert_close(out.float().cpu(), expected.float(), rtol=1e-5, atol=1e-5)
        a2a.workspace.release()


def _rank_timeout(rank, world_size, port):
    import torch.distributed as dist

    from vllm_a2a_plugin import A2AConfig, AllToAllSpec, OneSidedAllToAll, Workspace
    from vllm_a2a_plugin.errors import A2ATimeoutError

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world_size,
                            device_id=torch.device("cuda", rank))
    spec = AllToAllSpec(ep_size=world_size, max_tokens_per_rank=4, hidden_size=128, top_k=1,
                        num_experts=world_size)
    a2a = OneSidedAllToAll(Workspace.allocate_symmetric(spec, dist.group.WORLD), rank,
                           config=A2AConfig(timeout_s=1.0))
    if rank == world_size - 1:
        return  # this rank "dies": it never dispatches
    x = torch.randn(2, 128, device="cuda").to(torch.bfloat16)
    ids = torch.zeros((2, 1), dtype=torch.int32, device="cuda")
    a2a.dispatch(x, ids, runtime_max_tokens=2)
    torch.cuda.synchronize()
    with pytest.raises(A2ATimeoutError) as info:
        a2a.check_errors()
    assert info.value.rank == rank and info.value.peer == world_size - 1
    assert info.value.phase == "dispatch"


def test_multigpu_dispatch_combine_match_reference():
    if _world() < 2:
        pytest.skip(f"needs >= 2 GPUs, {torch.cuda.device_count()} visible")
    run_ranks(_rank_correctness, _world(), 3)


def test_multigpu_lost_peer_times_out_with_names():
    if _world() < 2:
        pytest.skip(f"needs >= 2 GPUs, {torch.cuda.device_count()} visible")
    run_ranks(_rank_timeout, _world())
