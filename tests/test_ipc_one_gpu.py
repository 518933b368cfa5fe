"""One rank per process, several processes on ONE GPU, workspaces shared
through CUDA IPC (``Workspace.allocate_cuda_ipc``; torch symmetric memory refuses
two ranks on one device). This is the path a vLLM engine with two DP ranks on
one GPU takes, and the pool's fallback when symmetric memory cannot rendezvous.

Kernels of different processes do not run concurrently on one GPU; the GPU
time-slices between them, so a spin-waiting round costs milliseconds (measured
~4.5 ms per flag ping-pong on an H100): timeouts here are generous.
"""

from __future__ import annotations

import pytest
import torch

from tests.multiproc import run_ranks
from tests.test_kernels_multigpu import _rank_correctness, _rank_graph_replay, _rank_timeout

pytestmark = pytest.mark.gpu

MODE = "cuda_ipc_one_gpu"
# (dispatch dtype, top-k, experts)
CASES = [(torch.bfloat16, 8, 256), (torch.float8_e4m3fn, 8, 384), (torch.float16, 3, 60)]


@pytest.mark.parametrize("world_size", [2, 3])
def test_processes_sharing_a_gpu_match_reference(world_size):
    cases = [c for c in CASES if c[2] % world_size == 0]
    run_ranks(_rank_correctness, world_size, cases, 3, MODE)


def test_processes_sharing_a_gpu_cuda_graph_replay():
    run_ranks(_rank_graph_replay, 2, MODE)


def test_processes_sharing_a_gpu_lost_peer_times_out_with_names():
    run_ranks(_rank_timeout, 2, MODE)


def _rank_pool(rank, world_size, port, force_symmetric_first):
    """The engine-neutral pool picks CUDA IPC for ranks sharing a GPU (or falls
    back to it when symmetric memory fails), under a caller's foreign default
    device and dtype, and its all-to-all runs a checked round."""
    import torch.distributed as dist

    from tests.data import random_hidden, random_topk_ids, random_weights
    from vllm_a2a_plugin import A2AConfig, AllToAllSpec
    from vllm_a2a_plugin.padding import linear_expert_owner
    from vllm_a2a_plugin.pool import AllToAllPool
    from vllm_a2a_plugin.reference import combine_reference, dispatch_reference

    torch.cuda.set_device(0)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    if force_symmetric_first:
        # As if the GPUs differed: symmetric memory is tried first, refuses the
        # shared device, and every rank falls back together.
        AllToAllPool._choose_allocation = lambda self: ("symmetric", True)
    experts, hidden, top_k = 8, 256, 2
    spec = AllToAllSpec(ep_size=world_size, max_tokens_per_rank=16, hidden_size=hidden,
                        top_k=top_k, num_experts=experts)
    owner = linear_expert_owner(experts, world_size)
    gen = torch.Generator().manual_seed(5)
    counts = [5, 0, 3][:world_size]
    ids = [random_topk_ids(gen, n, top_k, experts) for n in counts]
    xs = [random_hidden(gen, n, hidden, torch.bfloat16) for n in counts]
    ws = [random_weights(gen, n, top_k) for n in counts]
    m = max(counts)
    ys = [torch.randn((world_size * m, hidden), generator=gen, dtype=torch.float32)
          .to(torch.bfloat16) for _ in range(world_size)]
    ref = dispatch_reference(xs=xs, topk_ids=ids, topk_weights=ws, expert_owner=owner,
                             runtime_max_tokens=m)[rank]
    torch.set_default_dtype(torch.float64)
    with torch.device("cuda"):  # as vLLM builds models
        pool = AllToAllPool(dist.group.WORLD, device="cuda", config=A2AConfig(timeout_s=60.0))
        a2a = pool.all_to_all(spec)
        assert pool.allocation == "cuda_ipc", pool.allocation
        got = a2a.dispatch(xs[rank].to("cuda"), ids[rank].to("cuda"), ws[rank].to("cuda"),
                           runtime_max_tokens=m)
        a2a.synchronize()
        assert torch.equal(got.recv_topk_ids.cpu(), ref.recv_topk_ids)
        out = a2a.combine(ys[rank].to("cuda"))
        a2a.synchronize()
    expected = combine_reference(ys=ys, topk_ids=ids, expert_owner=owner,
                                 runtime_max_tokens=m)[rank]
    torch.testing.assert_close(out.float().cpu(), expected.float(), rtol=1e-5, atol=1e-5)
    pool.destroy()
    dist.barrier()


@pytest.mark.parametrize("force_symmetric_first", [False, True],
                         ids=["shared-gpu-detected", "symmetric-fails-falls-back"])
def test_pool_uses_cuda_ipc_for_ranks_sharing_a_gpu(force_symmetric_first):
    run_ranks(_rank_pool, 2, force_symmetric_first)


def _rank_pool_recover(rank, world_size, port):
    """A peer that skips a dispatch: the waiting rank times out with a named error,
    the failure is sticky, every rank recovers through the pool, and a checked
    round follows on the same workspaces."""
    import torch.distributed as dist

    from tests.data import random_hidden, random_topk_ids, random_weights
    from vllm_a2a_plugin import A2AConfig, AllToAllSpec
    from vllm_a2a_plugin.errors import A2ATimeoutError
    from vllm_a2a_plugin.padding import linear_expert_owner
    from vllm_a2a_plugin.pool import AllToAllPool
    from vllm_a2a_plugin.reference import dispatch_reference

    torch.cuda.set_device(0)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    spec = AllToAllSpec(ep_size=world_size, max_tokens_per_rank=8, hidden_size=256, top_k=2,
                        num_experts=8)
    pool = AllToAllPool(dist.group.WORLD, device="cuda:0", config=A2AConfig(timeout_s=2.0))
    a2a = pool.all_to_all(spec)
    gen = torch.Generator().manual_seed(9)
    ids = [random_topk_ids(gen, 4, 2, 8) for _ in range(world_size)]
    xs = [random_hidden(gen, 4, 256, torch.bfloat16) for _ in range(world_size)]
    ws = [random_weights(gen, 4, 2) for _ in range(world_size)]
    if rank == 0:  # rank 1 never dispatches this step
        a2a.dispatch(xs[0].cuda(), ids[0].cuda(), ws[0].cuda(), runtime_max_tokens=4)
        with pytest.raises(A2ATimeoutError, match="rank 0 timed out"):
            a2a.synchronize()
        with pytest.raises(A2ATimeoutError, match="raised again"):
            a2a.dispatch(xs[0].cuda(), ids[0].cuda(), ws[0].cuda(), runtime_max_tokens=4)
    failed = torch.tensor([len(pool.failures())], dtype=torch.int32)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    assert int(failed) == 1
    pool.recover()
    assert pool.failures() == []
    got = a2a.dispatch(xs[rank].cuda(), ids[rank].cuda(), ws[rank].cuda(), runtime_max_tokens=4)
    a2a.synchronize()
    ref = dispatch_reference(xs=xs, topk_ids=ids, topk_weights=ws,
                             expert_owner=linear_expert_owner(8, world_size),
                             runtime_max_tokens=4)[rank]
    assert torch.equal(got.recv_topk_ids.cpu(), ref.recv_topk_ids)
    a2a.combine(torch.zeros((world_size * 4, 256), dtype=torch.bfloat16, device="cuda"))
    a2a.synchronize()
    pool.destroy()


def test_pool_recovers_processes_sharing_a_gpu_after_a_lost_step():
    run_ranks(_rank_pool_recover, 2)
