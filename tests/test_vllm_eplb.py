"""EPLB (redundant experts, rebalancing mid-run) through our prepare/finalize, on CPU.

vLLM's ``--enable-eplb`` keeps ``E_logical + R`` *physical* experts, each a
copy of one logical expert's weights, placed linearly (``E_phys / EP`` per
rank, vLLM's ``determine_expert_map``). The router maps every logical top-k id
to one physical replica, so the ids that reach ``prepare()`` are physical ids
in ``[0, E_phys)`` and ``FusedMoEConfig.num_experts`` is ``E_phys``. A
rebalance rewrites which logical expert each physical slot holds and moves the
weights between ranks; the physical slots themselves never move, so a static
physical-id -> rank owner table stays right.

Each rank here is a real vLLM process setup (gloo, DP = EP = world size,
``all2all_backend="a2a_one_sided"``, our prepare/finalize from vLLM's factory)
with vLLM's own EPLB state for one MoE layer: ``EplbState.add_model`` builds
the initial physical -> logical map (redundant slots replicate the first
logical experts), the layer's ``EplbLayerState`` tables drive the
logical -> physical choice, ``EplbState.step`` records the load and, at the
configured interval, ``EplbState.rearrange`` runs vLLM's default policy on the
all-reduced load, moves the weights with ``rearrange_expert_weights_inplace``
over vLLM's torch_gloo EPLB communicator and commits the new maps. Step 1 and
step 2 (after the rebalance) must each equal a dense MoE over the *logical*
experts, with a rank that has no tokens in one of them.

What does not run as in a CUDA engine, and why:
  * The logical -> physical choice: vLLM 0.32 does it in a Triton kernel
    (``router/base_router.py`` ``_eplb_map_and_record_i32_kernel``) and on a
    CPU platform ``eplb_map_to_physical_and_record`` returns the *logical* ids
    unchanged. ``_map_to_physical_and_record`` below is that kernel's math in
    torch (Knuth hash of the token index modulo the replica count, load
    counted per physical id), reading the same ``EplbLayerState`` tensors.
  * EPLB is refused on a CPU platform by ``ParallelConfig`` validation, so
    ``enable_eplb`` and the EPLB settings are set on the validated config.
  * Sync rearrangement (``eplb_config.use_async=False``): async EPLB moves
    weights from a worker thread on accelerator streams. Both modes place
    weights by the same physical-slot rule (``move_to_buffer`` /
    ``move_from_buffer``).
  * ``rearrange`` times itself with ``torch.Event`` and the gloo communicator
    synchronises the current accelerator stream before its send/recv; neither
    exists on a CPU-only torch ("cpu backend doesn't support events", "Cannot
    access accelerator device when none is available"). ``_cpu_stand_ins``
    replaces both with host no-ops in the rank process; on CPU every copy has
    completed when it returns, so the synchronisation they stand for holds.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from tests.multiproc import run_ranks

pytest.importorskip("vllm", reason="needs vLLM installed (the vLLM environments)")

TOP_K, HIDDEN, INTER = 2, 64, 32
NUM_LOGICAL = 6
# Logical experts the skewed router prefers: the initial map replicates
# logical 0, 1 (, 2), so a rebalance on this load must change the map.
HOT_LOGICAL = (4, 5)
KNUTH_MULTIPLIER = 2654435769  # router/base_router.py, floor(2^32 / phi)


def _logical_weights() -> tuple[torch.Tensor, torch.Tensor]:
    """``w13 [NUM_LOGICAL, 2 * INTER, HIDDEN]``, ``w2 [NUM_LOGICAL, HIDDEN, INTER]`` float32."""
    gen = torch.Generator().manual_seed(4321)
    w13 = torch.randn((NUM_LOGICAL, 2 * INTER, HIDDEN), generator=gen, dtype=torch.float32,
                      device="cpu")
    w2 = torch.randn((NUM_LOGICAL, HIDDEN, INTER), generator=gen, dtype=torch.float32,
                     device="cpu")
    return w13 / HIDDEN ** 0.5, w2 / INTER ** 0.5


def _tokens(seed: int, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x [count, HIDDEN]``, top-k weights ``[count, TOP_K]`` (float32) and
    LOGICAL ids ``[count, TOP_K]`` int32, the router skewed to HOT_LOGICAL."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((count, HIDDEN), generator=gen, dtype=torch.float32, device="cpu")
    logits = torch.randn((count, NUM_LOGICAL), generator=gen, dtype=torch.float32,
                         device="cpu")
    logits[:, list(HOT_LOGICAL)] += 4.0
    weights, ids = logits.softmax(dim=-1).topk(TOP_K, dim=-1)
    return x, weights.contiguous(), ids.to(torch.int32)


def _map_to_physical_and_record(logical_ids: torch.Tensor, layer_state) -> torch.Tensor:
    """vLLM's ``_eplb_map_and_record_i32_kernel`` (router/base_router.py) in torch.

    Args:
        logical_ids: ``[T, top_k]`` int32 logical expert ids.
        layer_state: the layer's ``EplbLayerState`` (vLLM's tables, updated in
            place by a rebalance).

    Returns:
        ``[T, top_k]`` int32 physical ids: replica ``hash(token) % count`` of
        each logical expert. Adds one to ``expert_load_view[physical id]`` per
        slot of an unpadded token while recording is on, like the kernel.
    """
    flat = logical_ids.reshape(-1).to(torch.int64)
    offsets = torch.arange(flat.numel(), dtype=torch.int64, device="cpu")
    num_logical = layer_state.logical_replica_count.shape[0]
    valid = (flat >= 0) & (flat < num_logical)
    safe = torch.where(valid, flat, torch.zeros((), dtype=torch.int64, device="cpu"))
    replicas = layer_state.logical_replica_count[safe].to(torch.int64).clamp(min=1)
    token = offsets // logical_ids.shape[-1]
    replica = ((token * KNUTH_MULTIPLIER) & 0xFFFFFFFF) % replicas
    physical = layer_state.logical_to_physical_map[safe, replica].to(torch.int64)
    no_expert = torch.full((), -1, dtype=torch.int64, device="cpu")
    physical = torch.where(valid, physical, no_expert)
    if bool(layer_state.should_record_tensor):
        load = layer_state.expert_load_view
        num_unpadded = int(layer_state.num_unpadded_tokens_tensors[0])
        counted = (offsets < num_unpadded * logical_ids.shape[-1]) & (physical >= 0) \
            & (physical < load.numel())
        ones = torch.ones(int(counted.sum()), dtype=load.dtype, device="cpu")
        load.index_add_(0, physical[counted], ones)
    return physical.to(torch.int32).reshape(logical_ids.shape)


def _cpu_stand_ins() -> None:
    """Host stand-ins for the two accelerator calls on vLLM's sync EPLB path (module doc)."""

    class _HostTimingEvent:
        def __init__(self, enable_timing: bool = False, **_):
            self.time = None

        def record(self, stream=None):
            self.time = time.perf_counter()

        def synchronize(self):
            pass

        def wait(self, stream=None):
            pass

        def query(self):
            return True

        def elapsed_time(self, end) -> float:
            return (end.time - self.time) * 1000.0

    class _HostStream:
        def synchronize(self):
            pass  # CPU copies are complete when they return

    torch.Event = _HostTimingEvent
    torch.accelerator.current_stream = lambda device=None: _HostStream()


class _ModelConfigKey:
    """What ``EplbState`` reads of a ``ModelConfig``: the hash that keys its model state."""

    model = "eplb-test-moe"

    def compute_hash(self) -> str:
        return "eplb-test-moe"


class _MoELayer:
    """The parts of a vLLM MoE layer that EPLB touches: its local physical
    expert weights and its ``EplbLayerState``."""

    def __init__(self, w13_local: torch.Tensor, w2_local: torch.Tensor):
        from vllm.distributed.eplb.eplb_state import EplbLayerState

        self.w13, self.w2 = w13_local, w2_local
        self.eplb_state = EplbLayerState()

    def get_expert_weights(self):
        return [self.w13, self.w2]

    def set_eplb_state(self, moe_layer_idx, expert_load_view, logical_to_physical_map,
                       logical_replica_count):
        self.eplb_state.set_layer_state(moe_layer_idx, expert_load_view,
                                        logical_to_physical_map, logical_replica_count)


class _OneLayerMoEModel:
    """vLLM's ``MixtureOfExperts`` protocol for a model with one MoE layer."""

    num_moe_layers, num_expert_groups, num_shared_experts = 1, 1, 0
    num_logical_experts = num_routed_experts = NUM_LOGICAL

    def __init__(self, layer: _MoELayer, num_physical: int, ep_size: int):
        from vllm.model_executor.models.interfaces import MixtureOfExperts

        self.moe_layers = [layer]
        self.num_physical_experts = num_physical
        self.num_local_physical_experts = num_physical // ep_size
        self.num_redundant_experts = num_physical - NUM_LOGICAL
        self.expert_weights: list[list[torch.Tensor]] = []
        self._set_eplb_state = MixtureOfExperts.set_eplb_state

    def set_eplb_state(self, expert_load_view, logical_to_physical_map, logical_replica_count):
        # vLLM's own implementation: collects expert_weights, hands each layer its views.
        self._set_eplb_state(self, expert_load_view, logical_to_physical_map,
                             logical_replica_count)


def _rank_main(rank: int, world_size: int, port: int, num_redundant: int,
               counts: tuple[list[int], list[int]]):
    os.environ["VLLM_TARGET_DEVICE"] = "cpu"
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # vLLM's own loader runs our entry point

    from vllm.config import ParallelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.eplb.eplb_state import EplbState
    from vllm.model_executor.layers.fused_moe import modular_kernel as mk
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.all2all_utils import (
        maybe_make_prepare_finalize,
    )
    from vllm.model_executor.layers.fused_moe.config import (
        FUSED_MOE_UNQUANTIZED_CONFIG,
        FusedMoEConfig,
        FusedMoEParallelConfig,
        RoutingMethodType,
    )
    from vllm.model_executor.layers.fused_moe.expert_map_manager import (
        determine_expert_map,
    )

    from tests.torch_experts import UnreducedTorchExperts, expert_mlp
    from vllm_a2a_plugin.vllm.prepare_finalize import OneSidedPrepareAndFinalize

    _cpu_stand_ins()
    num_physical = NUM_LOGICAL + num_redundant
    assert num_physical % world_size == 0  # vLLM's EPLB needs an even split
    num_local = num_physical // world_size

    parallel = ParallelConfig(data_parallel_size=world_size, data_parallel_rank=rank,
                              enable_expert_parallel=True, all2all_backend="a2a_one_sided",
                              distributed_executor_backend="external_launcher")
    config = VllmConfig(parallel_config=parallel)
    # Set on the validated config: validation refuses EPLB on a CPU platform (module doc).
    parallel = config.parallel_config
    parallel.enable_eplb = True
    eplb = parallel.eplb_config
    eplb.num_redundant_experts = num_redundant
    eplb.use_async = False
    eplb.communicator = "torch_gloo"  # vLLM's choice without NIXL (ParallelConfig)
    eplb.window_size = 1  # rebalance on the load of the one step before it
    eplb.step_interval = 1
    with set_current_vllm_config(config):
        init_distributed_environment(world_size, rank, f"tcp://127.0.0.1:{port}", 0, "gloo")
        initialize_model_parallel(1, 1)  # builds vLLM's EPLB group too (enable_eplb)

        moe_parallel = FusedMoEParallelConfig.make(1, 1, world_size, 1, parallel)
        assert moe_parallel.use_all2all_kernels and moe_parallel.enable_eplb
        local_count, expert_map, _ = determine_expert_map(world_size, rank, num_physical, "linear")
        assert local_count == num_local
        my_physical = torch.arange(rank * num_local, (rank + 1) * num_local, device="cpu")
        assert torch.equal(torch.nonzero(expert_map != -1).flatten(), my_physical)

        # vLLM's initial arrangement: all logical experts, then replicas of the first ones.
        initial = torch.tensor(EplbState.build_initial_global_physical_to_logical_map(
            NUM_LOGICAL, num_redundant), dtype=torch.int64, device="cpu")
        logical_w13, logical_w2 = _logical_weights()
        # Every physical slot is loaded with its logical expert's weights.
        layer = _MoELayer(logical_w13[initial[my_physical]].clone(),
                          logical_w2[initial[my_physical]].clone())

        model_key = _ModelConfigKey()
        eplb_state = EplbState(parallel, torch.device("cpu"))
        eplb_state.add_model(_OneLayerMoEModel(layer, num_physical, world_size), model_key)
        model_state = next(iter(eplb_state.model_states.values()))
        assert torch.equal(model_state.physical_to_logical_map[0].cpu(), initial)

        moe = FusedMoEConfig(
            num_experts=num_physical, experts_per_token=TOP_K, hidden_dim=HIDDEN,
            intermediate_size=INTER, num_local_experts=num_local,
            num_logical_experts=NUM_LOGICAL, activation=MoEActivation.SILU, device="cpu",
            routing_method=RoutingMethodType.Renormalize, moe_parallel_config=moe_parallel,
            in_dtype=torch.float32, max_num_tokens=64)
        prepare_finalize = maybe_make_prepare_finalize(moe, FUSED_MOE_UNQUANTIZED_CONFIG,
                                                       allow_new_interface=True)
        assert isinstance(prepare_finalize, OneSidedPrepareAndFinalize)
        kernel = mk.FusedMoEKernel(prepare_finalize,
                                   UnreducedTorchExperts(moe, FUSED_MOE_UNQUANTIZED_CONFIG))

        def moe_step(step: int, step_counts: list[int]) -> torch.Tensor:
            """One forward of the layer; returns the ``[T, top_k]`` physical ids it used."""
            current = model_state.physical_to_logical_map[0].cpu()
            # The layer's weights hold what the current map says, wherever they came from.
            holds = current[my_physical]
            assert torch.equal(layer.w13, logical_w13[holds]) and \
                torch.equal(layer.w2, logical_w2[holds]), \
                f"rank {rank}: slots {my_physical.tolist()} should hold logical {holds.tolist()}"
            x, weights, logical_ids = _tokens(1000 * step + rank, step_counts[rank])
            eplb_state.prepare_forward(model_key, x.shape[0])
            physical_ids = _map_to_physical_and_record(logical_ids, layer.eplb_state)
            assert torch.equal(current[physical_ids.to(torch.int64)], logical_ids.to(torch.int64))
            out = kernel.apply(x, layer.w13, layer.w2, weights, physical_ids, MoEActivation.SILU,
                               num_physical, expert_map, False)
            dense = torch.zeros_like(x)
            for t in range(x.shape[0]):
                for k in range(TOP_K):
                    e = int(logical_ids[t, k])
                    dense[t] += weights[t, k] * expert_mlp(x[t:t + 1], logical_w13[e],
                                                           logical_w2[e])[0]
            torch.testing.assert_close(out, dense, rtol=1e-4, atol=1e-5)
            return physical_ids

        before = model_state.physical_to_logical_map[0].cpu().clone()
        moe_step(0, counts[0])
        # Records the step's load; at step_interval (1): vLLM's EplbState.rearrange
        # all-reduces it, runs the default policy, moves weights over gloo and
        # commits the new maps into the tables the router reads.
        eplb_state.step()
        after = model_state.physical_to_logical_map[0].cpu().clone()
        assert not torch.equal(before, after), f"rebalance left the map at {before.tolist()}"
        replicas = model_state.logical_replica_count[0].cpu()
        assert all(int(replicas[e]) >= 2 for e in HOT_LOGICAL), replicas.tolist()
        # Some slot received a logical expert its rank did not hold before:
        # the weights crossed ranks through vLLM's EPLB communicator.
        owner = torch.arange(num_physical, device="cpu") // num_local
        crossed = [p for p in range(num_physical)
                   if not bool((before[owner == owner[p]] == after[p]).any())]
        assert crossed, (before.tolist(), after.tolist())

        physical_ids = moe_step(1, counts[1]).to(torch.int64).flatten()
        if physical_ids.numel() >= 2 * TOP_K:
            # Tokens of one logical expert went to more than one of its replicas.
            logical = after[physical_ids]
            assert any(physical_ids[logical == e].unique().numel() > 1 for e in HOT_LOGICAL), \
                physical_ids.tolist()
        prepare_finalize.manager.destroy()


@pytest.mark.slow
def test_eplb_redundant_experts_and_rebalance_two_ranks():
    """6 logical + 2 redundant = 8 physical experts, 4 per rank; rank 1 idle in step 1."""
    run_ranks(_rank_main, 2, 2, ([5, 0], [3, 6]))


@pytest.mark.slow
def test_eplb_redundant_experts_and_rebalance_three_ranks():
    """6 logical + 3 redundant = 9 physical experts, 3 per rank; rank 2 idle in step 2."""
    run_ranks(_rank_main, 3, 3, ([2, 0, 5], [4, 3, 0]))
