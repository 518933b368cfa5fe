"""prepare -> experts -> finalize through vLLM's own modular kernel, on CPU.

Every rank is a real vLLM process setup: vLLM's distributed environment over
gloo with DP = EP = world size and ``all2all_backend="a2a_one_sided"``, so
vLLM's CPU communicator builds *our* manager (through the plugin's patch) and
vLLM's factory returns *our* prepare/finalize. On CPU the manager hands out the
reference all-to-all (same semantics as the kernels, over gloo). The MoE output
of every rank must equal a dense single-device MoE of that rank's tokens,
including a rank with zero tokens, for experts that reduce themselves and for
experts that leave the top-k reduction to finalize.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

from tests.multiproc import run_ranks

pytest.importorskip("vllm", reason="needs vLLM installed (vLLM env only)")

NUM_EXPERTS, TOP_K, HIDDEN, INTER = 8, 3, 64, 32


def _weights():
    gen = torch.Generator().manual_seed(1234)
    w1 = torch.randn((NUM_EXPERTS, 2 * INTER, HIDDEN), generator=gen, dtype=torch.float32) / HIDDEN ** 0.5
    w2 = torch.randn((NUM_EXPERTS, HIDDEN, INTER), generator=gen, dtype=torch.float32) / INTER ** 0.5
    return w1, w2


def _tokens(rank: int, count: int, top_k: int):
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn((count, HIDDEN), generator=gen, dtype=torch.float32)
    scores = torch.rand((count, NUM_EXPERTS), generator=gen, dtype=torch.float32)
    weights, ids = scores.softmax(dim=-1).topk(top_k, dim=-1)
    return x, weights.float(), ids.to(torch.int32)


def moe_layer_config(world_size: int, rank: int, top_k: int, parallel):
    """vLLM's config of one MoE layer on ``rank`` (CPU, float32) and vLLM's own
    expert map for it (linear placement: with 3 ranks, 8 experts split 3, 3, 2)."""
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.config import (FusedMoEConfig,
                                                             FusedMoEParallelConfig,
                                                             RoutingMethodType)
    from vllm.model_executor.layers.fused_moe.expert_map_manager import determine_expert_map

    moe_parallel = FusedMoEParallelConfig.make(1, 1, world_size, 1, parallel)
    assert moe_parallel.use_all2all_kernels and moe_parallel.ep_size == world_size
    per_rank, expert_map, _ = determine_expert_map(world_size, rank, NUM_EXPERTS, "linear")
    moe = FusedMoEConfig(
        num_experts=NUM_EXPERTS, experts_per_token=top_k, hidden_dim=HIDDEN,
        intermediate_size=INTER, num_local_experts=per_rank,
        num_logical_experts=NUM_EXPERTS, activation=MoEActivation.SILU, device="cpu",
        routing_method=RoutingMethodType.Renormalize, moe_parallel_config=moe_parallel,
        in_dtype=torch.float32, max_num_tokens=64)
    return moe, expert_map


def dense_moe(x, weights, ids, w1, w2, apply_on_input: bool = False) -> torch.Tensor:
    """A single-device MoE of ``x`` ``[T, HIDDEN]``: the expected output."""
    from tests.torch_experts import expert_mlp

    dense = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            y = expert_mlp((x[t:t + 1] * weights[t, k]) if apply_on_input else x[t:t + 1],
                           w1[e], w2[e])
            dense[t] += (y[0] if apply_on_input else weights[t, k] * y[0])
    return dense


def _rank_main(rank, world_size, port, experts_kind, counts, apply_on_input, top_k,
               foreign_defaults=False):
    os.environ["VLLM_TARGET_DEVICE"] = "cpu"
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # vLLM's own loader runs our entry point

    from vllm.config import ParallelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import (get_ep_group, init_distributed_environment,
                                  initialize_model_parallel)
    from vllm.model_executor.layers.fused_moe import modular_kernel as mk
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.all2all_utils import maybe_make_prepare_finalize
    from vllm.model_executor.layers.fused_moe.config import FUSED_MOE_UNQUANTIZED_CONFIG

    from tests.torch_experts import ReducingTorchExperts, UnreducedTorchExperts
    from vllm_a2a_plugin.vllm.manager import OneSidedAll2AllManager, ep_manager
    from vllm_a2a_plugin.vllm.prepare_finalize import OneSidedPrepareAndFinalize

    parallel = ParallelConfig(data_parallel_size=world_size, data_parallel_rank=rank,
                              enable_expert_parallel=True, all2all_backend="a2a_one_sided",
                              distributed_executor_backend="external_launcher")
    config = VllmConfig(parallel_config=parallel)
    with set_current_vllm_config(config):
        init_distributed_environment(world_size, rank, f"tcp://127.0.0.1:{port}", 0, "gloo")
        initialize_model_parallel(1, 1)
        manager = ep_manager()
        assert isinstance(manager, OneSidedAll2AllManager), type(manager)
        if world_size > 1:
            assert get_ep_group().device_communicator.all2all_manager is manager

        moe, expert_map = moe_layer_config(world_size, rank, top_k, parallel)
        # A caller's defaults must not leak into our tensors: vLLM builds models
        # under `with torch.device("cuda")`; on CPU the meta device shows any
        # allocation that forgot its device (it would hold no data).
        construction = torch.device("meta") if foreign_defaults else contextlib.nullcontext()
        if foreign_defaults:
            torch.set_default_dtype(torch.float64)
        with construction:
            prepare_finalize = maybe_make_prepare_finalize(moe, FUSED_MOE_UNQUANTIZED_CONFIG,
                                                           allow_new_interface=True)
        assert isinstance(prepare_finalize, OneSidedPrepareAndFinalize)
        experts_cls = ReducingTorchExperts if experts_kind == "reducing" else UnreducedTorchExperts
        kernel = mk.FusedMoEKernel(prepare_finalize,
                                   experts_cls(moe, FUSED_MOE_UNQUANTIZED_CONFIG))

        w1, w2 = _weights()
        local = (torch.arange(NUM_EXPERTS) if expert_map is None  # EP = 1: all local
                 else torch.nonzero(expert_map != -1).flatten())
        for step in range(2):  # twice: the workspace is reused
            x, weights, ids = _tokens(rank + 10 * step, counts[rank], top_k)
            out = kernel.apply(x, w1[local], w2[local], weights, ids, MoEActivation.SILU,
                               NUM_EXPERTS, expert_map, apply_on_input)
            dense = dense_moe(x, weights, ids, w1, w2, apply_on_input)
            assert out.shape == x.shape
            torch.testing.assert_close(out, dense, rtol=1e-4, atol=1e-5)
        from vllm_a2a_plugin.vllm.manager import ep_round_counts

        counts = ep_round_counts()
        assert counts == {"dp_rank": rank, "ep_rank": rank, "allocation": "reference",
                          "all_to_alls": 1, "dispatches": 2, "combines": 2,
                          "dispatches_by_micro_batch": [2, 0], "prepare_calls": 2,
                          "finalize_calls": 2, "overlapped_prepare_calls": 0}, counts
        manager.destroy()


@pytest.mark.slow
@pytest.mark.parametrize("experts_kind", ["reducing", "unreduced"])
def test_modular_kernel_matches_dense_moe_two_ranks(experts_kind):
    run_ranks(_rank_main, 2, experts_kind, [5, 0], False, TOP_K)


@pytest.mark.slow
def test_single_rank_test_mode_routes_moe_through_our_all_to_all(monkeypatch):
    """VLLM_A2A_TEST_SINGLE_RANK_EP=1 (test-only): at DP = 1 vLLM's factory
    still returns our prepare/finalize, at EP = 1, and the result is exact."""
    monkeypatch.setenv("VLLM_A2A_TEST_SINGLE_RANK_EP", "1")
    run_ranks(_rank_main, 1, "unreduced", [6], False, TOP_K)


def _rank_single_rank_mode_off(rank, world_size, port):
    os.environ["VLLM_TARGET_DEVICE"] = "cpu"
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    from vllm.config import ParallelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.model_executor.layers.fused_moe.config import FusedMoEParallelConfig

    parallel = ParallelConfig(enable_expert_parallel=True, all2all_backend="a2a_one_sided",
                              distributed_executor_backend="external_launcher")
    with set_current_vllm_config(VllmConfig(parallel_config=parallel)):
        init_distributed_environment(1, 0, f"tcp://127.0.0.1:{port}", 0, "gloo")
        initialize_model_parallel(1, 1)
        assert not FusedMoEParallelConfig.make(1, 1, 1, 1, parallel).use_all2all_kernels


def test_single_rank_mode_is_off_by_default(monkeypatch):
    monkeypatch.delenv("VLLM_A2A_TEST_SINGLE_RANK_EP", raising=False)
    run_ranks(_rank_single_rank_mode_off, 1)


@pytest.mark.slow
def test_modular_kernel_three_ranks_uneven_expert_split():
    """8 experts on 3 EP ranks: vLLM places 3, 3, 2; tokens must reach their owners."""
    run_ranks(_rank_main, 3, "reducing", [2, 0, 5], False, TOP_K)


@pytest.mark.slow
def test_modular_kernel_under_foreign_default_device_and_dtype():
    """Built under `with torch.device("meta")`, run with float64 as the default dtype."""
    run_ranks(_rank_main, 2, "unreduced", [4, 0], False, TOP_K, True)


@pytest.mark.slow
def test_modular_kernel_four_ranks_router_weight_on_input():
    run_ranks(_rank_main, 4, "unreduced", [3, 7, 0, 1], True, 1)


def _rank_manager(rank, world_size, port):
    os.environ["VLLM_TARGET_DEVICE"] = "cpu"
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    from vllm.config import ParallelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import (get_ep_group, init_distributed_environment,
                                  initialize_model_parallel)

    from vllm_a2a_plugin import AllToAllSpec
    from vllm_a2a_plugin.errors import A2AInputError

    parallel = ParallelConfig(data_parallel_size=world_size, data_parallel_rank=rank,
                              enable_expert_parallel=True, all2all_backend="a2a_one_sided",
                              distributed_executor_backend="external_launcher")
    with set_current_vllm_config(VllmConfig(parallel_config=parallel)):
        init_distributed_environment(world_size, rank, f"tcp://127.0.0.1:{port}", 0, "gloo")
        initialize_model_parallel(1, 1)
        manager = get_ep_group().device_communicator.all2all_manager
        spec = AllToAllSpec(ep_size=world_size, max_tokens_per_rank=16, hidden_size=64, top_k=2,
                            num_experts=4)
        first = manager.all_to_all(spec)
        assert manager.all_to_all(spec) is first  # same shape: reused
        smaller = AllToAllSpec(**{**spec.__dict__, "max_tokens_per_rank": 8})
        assert manager.all_to_all(smaller) is first  # fits: reused
        bigger = AllToAllSpec(**{**spec.__dict__, "max_tokens_per_rank": 32})
        grown = manager.all_to_all(bigger)
        assert grown is not first and grown.spec.max_tokens_per_rank == 32
        other = AllToAllSpec(**{**spec.__dict__, "hidden_size": 128})
        assert manager.all_to_all(other) is not grown  # another shape: its own
        wrong = AllToAllSpec(**{**spec.__dict__, "ep_size": world_size + 1, "num_experts": 12})
        with pytest.raises(A2AInputError, match=f"ep_size {world_size + 1} but this EP group "
                                                f"has {world_size} ranks"):
            manager.all_to_all(wrong)
        manager.destroy()
        assert manager.all_to_all(spec) is not first  # destroyed: created anew


def test_manager_reuses_grows_and_rejects_workspaces():
    run_ranks(_rank_manager, 2)


def _rank_dp_without_ep(rank, world_size, port):
    os.environ["VLLM_TARGET_DEVICE"] = "cpu"
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    from vllm.config import ParallelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    parallel = ParallelConfig(data_parallel_size=world_size, data_parallel_rank=rank,
                              enable_expert_parallel=False, all2all_backend="a2a_one_sided",
                              distributed_executor_backend="external_launcher")
    with set_current_vllm_config(VllmConfig(parallel_config=parallel)):
        init_distributed_environment(world_size, rank, f"tcp://127.0.0.1:{port}", 0, "gloo")
        with pytest.raises(ValueError, match="a2a_one_sided is an expert-parallel backend: add "
                                             "--enable-expert-parallel"):
            initialize_model_parallel(1, 1)


def test_data_parallel_without_expert_parallel_is_refused_clearly():
    run_ranks(_rank_dp_without_ep, 2)
