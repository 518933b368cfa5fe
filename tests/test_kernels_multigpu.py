"""Our kernels across processes, one GPU each, peer memory from torch symmetric
memory. Every rank builds every rank's inputs from one seed and checks its own
outputs against the reference.

``pytest tests/test_kernels_multigpu.py`` spawns one process per GPU;
``mpirun -np N python -m pytest tests/test_kernels_multigpu.py`` (or torchrun)
runs each rank's share in the launched processes instead (tests/multiproc.py).
``A2A_TEST_WORLD=N`` sets the process count (default: the launch's ranks, else
the GPUs visible). One
GPU shared by several processes is no substitute: torch symmetric memory
refuses it ("detected allocations from overlapping devices from different
ranks", tried on an H100), so these need as many GPUs as ranks.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.data import (random_hidden, random_token_counts, random_topk_ids, random_weights)
from tests.multiproc import run_ranks

pytestmark = pytest.mark.multigpu

# (dispatch dtype, top-k, experts): top-k 8 and 16 with 256 and 384 experts in bf16
# and fp8, as DeepSeek-V3 / Qwen3 shapes; every top-k 1..16 has its own test below.
CASES = [(torch.bfloat16, 8, 256), (torch.float8_e4m3fn, 8, 384), (torch.bfloat16, 16, 256),
         (torch.float8_e4m3fn, 16, 384), (torch.float16, 3, 64)]


def _world() -> int:
    """A2A_TEST_WORLD, else the ranks of an mpirun / torchrun launch (each rank
    then runs these tests as itself, tests/multiproc.py), else the GPUs."""
    from vllm_a2a_plugin.testing import launcher

    launch = launcher.detect()
    default = launch.world_size if launch is not None else torch.cuda.device_count()
    return int(os.environ.get("A2A_TEST_WORLD", default))


def _skip_reason() -> str | None:
    if _world() < 2:
        return f"needs >= 2 processes, A2A_TEST_WORLD/GPUs give {_world()}"
    if _world() > torch.cuda.device_count():
        return f"needs {_world()} GPUs, {torch.cuda.device_count()} visible"
    return None


def _init(rank: int, world_size: int, mode: str = "symmetric") -> None:
    """``symmetric``: one GPU per rank, NCCL group. ``cuda_ipc_one_gpu``: every rank
    on GPU 0, a gloo group, workspaces shared through CUDA IPC (tests/test_ipc_one_gpu.py)."""
    import torch.distributed as dist

    if mode == "symmetric":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=rank, world_size=world_size, device_id=device)
    else:
        torch.cuda.set_device(0)
        dist.init_process_group("gloo", rank=rank, world_size=world_size)


def _workspace(spec, mode: str):
    import torch.distributed as dist

    from vllm_a2a_plugin import Workspace

    if mode == "symmetric":
        return Workspace.allocate_symmetric(spec, dist.group.WORLD)
    return Workspace.allocate_cuda_ipc(spec, dist.group.WORLD)


def _rank_correctness(rank, world_size, port, cases, rounds, mode="symmetric"):
    from vllm_a2a_plugin import A2AConfig, AllToAllSpec, OneSidedAllToAll
    from vllm_a2a_plugin.padding import linear_expert_owner
    from vllm_a2a_plugin.reference import combine_reference, dispatch_reference

    _init(rank, world_size, mode)
    for dtype, top_k, experts in cases:
        hidden = 7168 if dtype == torch.float8_e4m3fn else 2048
        scale_cols = hidden // 128 if dtype == torch.float8_e4m3fn else 0
        spec = AllToAllSpec(ep_size=world_size, max_tokens_per_rank=128, hidden_size=hidden,
                            top_k=top_k, num_experts=experts, dispatch_dtype=dtype,
                            scale_cols=scale_cols,
                            combine_dtype=torch.bfloat16 if dtype == torch.float8_e4m3fn else dtype)
        a2a = OneSidedAllToAll(_workspace(spec, mode), rank,
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


def _rank_timeout(rank, world_size, port, mode="symmetric"):
    from vllm_a2a_plugin import A2AConfig, AllToAllSpec, OneSidedAllToAll
    from vllm_a2a_plugin.errors import A2ATimeoutError

    _init(rank, world_size, mode)
    spec = AllToAllSpec(ep_size=world_size, max_tokens_per_rank=4, hidden_size=128, top_k=1,
                        num_experts=world_size)
    a2a = OneSidedAllToAll(_workspace(spec, mode), rank,
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


def _rank_graph_replay(rank, world_size, port, mode="symmetric"):
    """One dispatch + combine captured in a CUDA graph, replayed with new inputs
    copied into its static tensors, checked after every replay."""
    import torch.distributed as dist

    from vllm_a2a_plugin import A2AConfig, AllToAllSpec, OneSidedAllToAll
    from vllm_a2a_plugin.padding import linear_expert_owner
    from vllm_a2a_plugin.reference import combine_reference, dispatch_reference

    _init(rank, world_size, mode)
    experts, hidden = 64, 256
    owner = linear_expert_owner(experts, world_size)
    top_k, n = 4, 24  # fixed shapes for the graph: every rank sends n tokens
    spec = AllToAllSpec(ep_size=world_size, max_tokens_per_rank=n, hidden_size=hidden,
                        top_k=top_k, num_experts=experts)
    a2a = OneSidedAllToAll(_workspace(spec, mode), rank,
                           config=A2AConfig(timeout_s=20.0, check_expert_ids=False))
    x = torch.empty((n, hidden), dtype=torch.bfloat16, device="cuda")
    ids_in = torch.zeros((n, top_k), dtype=torch.int32, device="cuda")
    w_in = torch.empty((n, top_k), dtype=torch.float32, device="cuda")
    y_in = torch.empty((world_size * n, hidden), dtype=torch.bfloat16, device="cuda")
    x.normal_()
    w_in.uniform_()
    y_in.normal_()
    a2a.dispatch(x, ids_in, w_in, runtime_max_tokens=n)  # warm-up outside the graph
    out = a2a.combine(y_in)
    a2a.synchronize()
    dist.barrier()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        recv = a2a.dispatch(x, ids_in, w_in, runtime_max_tokens=n)
        out = a2a.combine(y_in)
    dist.barrier()
    for step in range(10):
        gen = torch.Generator().manual_seed(100 + step)
        ids = [random_topk_ids(gen, n, top_k, experts) for _ in range(world_size)]
        xs = [random_hidden(gen, n, hidden, torch.bfloat16) for _ in range(world_size)]
        ws = [random_weights(gen, n, top_k) for _ in range(world_size)]
        ys = [torch.randn((world_size * n, hidden), generator=gen).bfloat16()
              for _ in range(world_size)]
        x.copy_(xs[rank])
        ids_in.copy_(ids[rank])
        w_in.copy_(ws[rank])
        y_in.copy_(ys[rank])
        graph.replay()
        a2a.synchronize()
        ref = dispatch_reference(xs=xs, topk_ids=ids, topk_weights=ws, expert_owner=owner,
                                 runtime_max_tokens=n)[rank]
        assert torch.equal(recv.recv_topk_ids, ref.recv_topk_ids.cuda()), f"replay {step}"
        valid = ref.valid.cuda()
        assert torch.equal(recv.recv_x[valid], ref.recv_x.cuda()[valid]), f"replay {step}"
        expected = combine_reference(ys=ys, topk_ids=ids, expert_owner=owner,
                                     runtime_max_tokens=n)[rank]
        torch.testing.assert_close(out.float().cpu(), expected.float(), rtol=1e-5, atol=1e-5)
    a2a.workspace.release()


def test_multigpu_dispatch_combine_match_reference():
    if reason := _skip_reason():
        pytest.skip(reason)
    run_ranks(_rank_correctness, _world(), CASES, 3)


def test_multigpu_every_top_k():
    if reason := _skip_reason():
        pytest.skip(reason)
    run_ranks(_rank_correctness, _world(), [(torch.bfloat16, k, 64) for k in range(1, 17)], 1)


def test_multigpu_cuda_graph_replay_with_new_data():
    if reason := _skip_reason():
        pytest.skip(reason)
    run_ranks(_rank_graph_replay, _world())


def test_multigpu_lost_peer_times_out_with_names():
    if reason := _skip_reason():
        pytest.skip(reason)
    run_ranks(_rank_timeout, _world())
