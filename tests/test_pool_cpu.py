"""The engine-neutral pool on CPU (no engine imported): gloo ranks get the
reference all-to-all, reused per shape, grown collectively, freed by destroy."""

from __future__ import annotations

import pytest
import torch

from tests.multiproc import run_ranks


def _rank_pool(rank, world_size, port):
    import torch.distributed as dist

    from vllm_a2a_plugin import AllToAllSpec
    from vllm_a2a_plugin.errors import A2AInputError
    from vllm_a2a_plugin.pool import AllToAllPool
    from vllm_a2a_plugin.reference import ReferenceAllToAll

    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    pool = AllToAllPool(dist.group.WORLD, device="cpu")
    assert pool.allocation == "reference" and pool.rank == rank
    spec = AllToAllSpec(ep_size=world_size, max_tokens_per_rank=8, hidden_size=64, top_k=2,
                        num_experts=6)
    first = pool.all_to_all(spec)
    assert isinstance(first, ReferenceAllToAll)
    assert pool.all_to_all(spec) is first
    grown = pool.all_to_all(AllToAllSpec(**{**spec.__dict__, "max_tokens_per_rank": 16}))
    assert grown is not first and grown.spec.max_tokens_per_rank == 16
    round_robin = torch.arange(6, dtype=torch.int32) % world_size
    with pytest.raises(A2AInputError, match="route experts to different ranks"):
        pool.all_to_all(spec, expert_owner=round_robin)
    # A round through what the pool handed out: rank 1 has no tokens.
    n = 3 if rank == 0 else 0
    x = torch.full((n, 64), float(rank + 1), dtype=torch.bfloat16)
    ids = torch.tensor([[0, 5], [1, 2], [3, 4]][:n], dtype=torch.int32).reshape(n, 2)
    got = grown.dispatch(x, ids, torch.ones((n, 2), dtype=torch.float32), runtime_max_tokens=3)
    owned = (got.recv_topk_ids.view(world_size, 3, 2)[0, :, :] != got.padding_id).any(dim=1)
    y = torch.zeros((world_size * 3, 64), dtype=torch.bfloat16)
    y.view(world_size, 3, 64)[0][owned] = 1.0
    out = grown.combine(y)
    if rank == 0:
        # token t is summed over its distinct owner ranks, each contributing 1.0
        owners = [{e // 3 for e in row} for row in ([0, 5], [1, 2], [3, 4])]
        assert out[:, 0].float().tolist() == [float(len(o)) for o in owners]
    else:
        assert out.shape == (0, 64)
    # Micro-batches (overlap): each its own all-to-all of the same shape, grown
    # on its own; out-of-range indices are refused before anything is allocated.
    second = pool.all_to_all(spec, micro_batch=1)
    assert second is not grown and pool.all_to_all(spec, micro_batch=1) is second
    assert pool.all_to_all(spec, micro_batch=0) is grown
    with pytest.raises(A2AInputError, match=r"micro_batch must be in \[0, 2\)"):
        pool.all_to_all(spec, micro_batch=2)
    assert len(pool.all_to_alls()) == 2
    pool.destroy()
    assert pool.all_to_all(spec) is not grown


def test_pool_on_cpu_serves_the_reference():
    run_ranks(_rank_pool, 2)


def test_workspace_allocation_env_is_validated(monkeypatch):
    from vllm_a2a_plugin import envs

    monkeypatch.setenv("VLLM_A2A_WORKSPACE", "cuda_ipc")
    assert envs.workspace_allocation() == "cuda_ipc"
    monkeypatch.setenv("VLLM_A2A_WORKSPACE", "nvshmem")
    with pytest.raises(ValueError, match="auto, symmetric or cuda_ipc"):
        envs.workspace_allocation()


def _rank_watchdog_settings(rank, world_size, port):
    import torch.distributed as dist

    from vllm_a2a_plugin import A2AConfig
    from vllm_a2a_plugin.pool import AllToAllPool

    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    from vllm_a2a_plugin.watchdog import AbortWord

    pool = AllToAllPool(dist.group.WORLD, device="cpu", config=A2AConfig(peer_lost_exit_s=4.0))
    pool.abort = AbortWord()  # the kernel path's; the CPU reference needs none
    pool._start_watchdog()  # what the kernel path runs before its first workspace
    try:
        assert pool.watchdog.exit_after_s == 4.0
        assert pool.watchdog.end_parent_pid == 0  # not a vLLM worker
    finally:
        pool.watchdog.stop()


def test_pool_starts_its_watchdog_with_the_configured_exit():
    run_ranks(_rank_watchdog_settings, 2)
