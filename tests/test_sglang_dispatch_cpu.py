"""dispatch -> SGLang's MoE runner -> combine across gloo ranks equals a dense MoE (CPU).

Every rank is a process with SGLang's published config (``--moe-a2a-backend
a2a_one_sided``), our plugin loaded by SGLang's own loader, and SGLang's
``create_moe_dispatcher`` returning our dispatcher (bf16). The experts are
SGLang's torch-native STANDARD-format runner ``fused_moe_forward_native`` (the
one SGLang installs under torch.compile; 0.5.23's Triton runner needs a GPU).
It gathers expert weights by the runner ids, so the ``-1`` ids of slots
without work read the last local expert, with weight 0: the result must still
be exact, which it is only because our all-to-all zeroes those weights.
On CPU the pool hands out the reference all-to-all over the EP gloo group.

SGLang's EP group coordinator is not built here (its init needs a served
model): the test states it with SGLang's ``get_parallel().override(...)``,
as an object carrying the real gloo group, rank and size.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("sglang.srt.plugins", reason="SGLang is not installed (SGLang env only)")

from tests.multiproc import run_ranks  # noqa: E402

NUM_EXPERTS, HIDDEN, INTER, TOP_K = 6, 128, 32, 2


def _weights():
    gen = torch.Generator().manual_seed(7)
    w13 = torch.randn((NUM_EXPERTS, 2 * INTER, HIDDEN), generator=gen) / HIDDEN ** 0.5
    w2 = torch.randn((NUM_EXPERTS, HIDDEN, INTER), generator=gen) / INTER ** 0.5
    return w13, w2


def _tokens(rank: int, count: int):
    gen = torch.Generator().manual_seed(50 + rank)
    x = torch.randn((count, HIDDEN), generator=gen)
    scores = torch.rand((count, NUM_EXPERTS), generator=gen)
    weights, ids = scores.softmax(dim=-1).topk(TOP_K, dim=-1)
    return x, weights, ids.to(torch.int32)


def _dense(x, weights, ids, w13, w2):
    from vllm_a2a_plugin.reference import dense_moe_reference

    def expert(e, rows):
        gate, up = (rows @ w13[e].T).chunk(2, dim=-1)
        return (torch.nn.functional.silu(gate) * up) @ w2[e].T

    return dense_moe_reference(x, ids, weights, expert)


def _runner_config_and_ep_group(rank: int, world_size: int):
    """SGLang's MoE runner config (Triton, bf16) and this rank's EP group (gloo WORLD)."""
    import torch.distributed as dist
    from sglang.srt.layers.moe.moe_runner import MoeRunnerConfig
    from sglang.srt.layers.moe.utils import MoeRunnerBackend

    config = MoeRunnerConfig(num_experts=NUM_EXPERTS,
                             num_local_experts=NUM_EXPERTS // world_size,
                             hidden_size=HIDDEN, intermediate_size_per_partition=INTER,
                             top_k=TOP_K, num_fused_shared_experts=0,
                             params_dtype=torch.bfloat16, runner_backend=MoeRunnerBackend.TRITON,
                             activation="silu", inplace=False)
    ep_group = SimpleNamespace(cpu_group=dist.group.WORLD, rank_in_group=rank,
                               world_size=world_size)
    return config, ep_group


def _rank_main(rank, world_size, port, counts, fp8):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    from sglang.srt.plugins import load_plugins

    load_plugins()  # SGLang's loader runs our entry point
    from sglang.srt.layers.dp_attention import set_dp_buffer_len
    from sglang.srt.layers.moe.fused_moe_native import fused_moe_forward_native
    from sglang.srt.layers.moe.fused_moe_triton.layer import create_moe_dispatcher
    from sglang.srt.layers.moe.topk import StandardTopKOutput
    from sglang.srt.layers.moe.utils import MoeRunnerBackend, initialize_moe_config
    from sglang.srt.layers.quantization.unquant import UnquantizedFusedMoEMethod
    from sglang.srt.runtime_context import get_parallel, publish
    from sglang.srt.server_args import prepare_server_args

    from vllm_a2a_plugin.sglang.dispatcher import (EpPlacement, OneSidedDispatcher,
                                                   destroy_pools, quantize_fp8_blocks)

    args = prepare_server_args(["--model-path", "dummy", "--device", "cpu",
                                "--moe-a2a-backend", "a2a_one_sided", "--tp-size",
                                str(world_size), "--ep-size", str(world_size), "--attn-dp-size",
                                str(world_size)])
    args.resolve_once()
    publish(args, role="scheduler")
    initialize_moe_config()  # SGLang converts the flag: MoeA2ABackend.CUSTOMIZED

    per_rank = NUM_EXPERTS // world_size
    config, ep_group = _runner_config_and_ep_group(rank, world_size)
    with get_parallel().override(moe_ep_group=ep_group):
        if fp8:
            placement = EpPlacement(cpu_group=dist.group.WORLD, rank=rank, size=world_size,
                                    device=torch.device("cpu"), attn_tp_size=1,
                                    max_tokens_per_rank=16)
            dispatcher = OneSidedDispatcher(placement, num_experts=NUM_EXPERTS,
                                            hidden_size=HIDDEN, top_k=TOP_K,
                                            params_dtype=torch.bfloat16,
                                            runner_backend=MoeRunnerBackend.TRITON,
                                            dispatch_fp8=True)
        else:
            dispatcher = create_moe_dispatcher(config, UnquantizedFusedMoEMethod())
    assert isinstance(dispatcher, OneSidedDispatcher), type(dispatcher)
    assert dispatcher.padding_id != -1

    w13, w2 = _weights()
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    layer = SimpleNamespace(w13_weight=w13[mine].to(torch.bfloat16),
                            w2_weight=w2[mine].to(torch.bfloat16), moe_runner_config=config)
    for step, step_counts in enumerate(counts):
        # SGLang's DP-attention token counts of this step (the same list on every rank).
        set_dp_buffer_len(sum(step_counts), step_counts[rank], False,
                          global_num_tokens=list(step_counts))
        x, weights, ids = _tokens(rank + 10 * step, step_counts[rank])
        x = x.to(torch.bfloat16)
        out_dispatch = dispatcher.dispatch(x, StandardTopKOutput(weights, ids, None))
        m = max(step_counts)
        assert out_dispatch.hidden_states.shape == (world_size * m, HIDDEN)
        runner_ids = out_dispatch.topk_output.topk_ids
        assert bool(((runner_ids >= -1) & (runner_ids < per_rank)).all())
        combine_input = fused_moe_forward_native(layer, out_dispatch)
        out = dispatcher.combine(combine_input)
        assert out.shape == (step_counts[rank], HIDDEN) and out.dtype == torch.bfloat16
        reference_x = x.float()
        if fp8:
            q, scales = quantize_fp8_blocks(x)
            reference_x = (q.float().view(-1, HIDDEN // 128, 128) * scales[..., None]).view(
                -1, HIDDEN).to(torch.bfloat16).float()
        expected = _dense(reference_x, weights, ids, w13, w2)
        torch.testing.assert_close(out.float(), expected, rtol=3e-2, atol=3e-2)
    destroy_pools()


@pytest.fixture(autouse=True)
def _ranks_see_no_gpu(monkeypatch):
    """The ranks (spawned processes, which inherit this environment) run on CPU
    wherever this runs: on a GPU machine SGLang would take its CUDA paths, which
    import its compiled sgl_kernel (tests/sglang_support.py)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


@pytest.mark.parametrize("world_size, counts", [
    (2, [[5, 0], [0, 3], [7, 4]]),
    (3, [[4, 0, 7], [1, 1, 0]]),
])
def test_dispatch_runner_combine_matches_dense_moe(world_size, counts):
    run_ranks(_rank_main, world_size, counts, False, timeout_s=600)


def test_fp8_block_dispatch_matches_dense_moe():
    run_ranks(_rank_main, 2, [[6, 0], [3, 5]], True, timeout_s=600)


def _tbo_rank_main(rank, world_size, port, micro_counts):
    """Two micro-batches through one dispatcher in TBO's order (``dispatch_a`` of
    both, then each one's ``dispatch_b`` -> runner -> ``combine_a``, then both
    ``combine_b``) equal the same micro-batches run one after another."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    from sglang.srt.plugins import load_plugins

    load_plugins()
    from sglang.srt.layers.dp_attention import set_dp_buffer_len
    from sglang.srt.layers.moe.fused_moe_native import fused_moe_forward_native
    from sglang.srt.layers.moe.fused_moe_triton.layer import create_moe_dispatcher
    from sglang.srt.layers.moe.topk import StandardTopKOutput
    from sglang.srt.layers.moe.utils import initialize_moe_config, is_tbo_enabled
    from sglang.srt.layers.quantization.unquant import UnquantizedFusedMoEMethod
    from sglang.srt.runtime_context import get_parallel, publish
    from sglang.srt.server_args import prepare_server_args

    from vllm_a2a_plugin.errors import A2AInputError, A2AStateError
    from vllm_a2a_plugin.sglang.dispatcher import OneSidedDispatcher, destroy_pools

    args = prepare_server_args(["--model-path", "dummy", "--device", "cpu",
                                "--moe-a2a-backend", "a2a_one_sided", "--tp-size",
                                str(world_size), "--ep-size", str(world_size), "--attn-dp-size",
                                str(world_size), "--enable-two-batch-overlap"])
    args.resolve_once()
    publish(args, role="scheduler")
    initialize_moe_config()
    assert is_tbo_enabled()
    per_rank = NUM_EXPERTS // world_size
    config, ep_group = _runner_config_and_ep_group(rank, world_size)
    with get_parallel().override(moe_ep_group=ep_group):
        dispatcher = create_moe_dispatcher(config, UnquantizedFusedMoEMethod())
    assert isinstance(dispatcher, OneSidedDispatcher), type(dispatcher)
    # One workspace per micro-batch, asked for at construction.
    assert dispatcher.micro_batches == 2
    assert dispatcher.all_to_alls[0] is not dispatcher.all_to_alls[1]
    with pytest.raises(A2AInputError, match="micro-batch 2"):
        dispatcher.dispatch_b(tbo_subbatch_index=2)

    w13, w2 = _weights()
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    layer = SimpleNamespace(w13_weight=w13[mine].to(torch.bfloat16),
                            w2_weight=w2[mine].to(torch.bfloat16), moe_runner_config=config)
    for step, counts in enumerate(micro_counts):
        inputs = []
        for mb in range(2):
            x, weights, ids = _tokens(rank + 10 * step + 100 * mb, counts[mb][rank])
            inputs.append((x.to(torch.bfloat16), StandardTopKOutput(weights, ids, None)))

        # Not overlapped: each micro-batch's fused dispatch -> runner -> combine,
        # with SGLang's per-DP-rank counts of that micro-batch published.
        sequential = []
        for mb, (x, topk) in enumerate(inputs):
            set_dp_buffer_len(sum(counts[mb]), counts[mb][rank], False,
                              global_num_tokens=list(counts[mb]))
            out = dispatcher.combine(fused_moe_forward_native(layer, dispatcher.dispatch(x, topk)))
            sequential.append(out)

        # TBO: SGLang publishes no per-rank counts for micro-batches (None), so
        # the ranks agree on M themselves; each micro-batch on its own workspace.
        set_dp_buffer_len(0, 0, False, global_num_tokens=None)
        for mb, (x, topk) in enumerate(inputs):
            dispatcher.dispatch_a(hidden_states=x, topk_output=topk, tbo_subbatch_index=mb)
        with pytest.raises(A2AStateError, match="micro-batch 0"):
            dispatcher.dispatch_a(hidden_states=inputs[0][0], topk_output=inputs[0][1],
                                  tbo_subbatch_index=0)
        received = dispatcher.dispatch_b(tbo_subbatch_index=0)
        assert received.hidden_states.shape[0] == world_size * max(counts[0])
        dispatcher.combine_a(combine_input=fused_moe_forward_native(layer, received),
                             tbo_subbatch_index=0)
        received = dispatcher.dispatch_b(tbo_subbatch_index=1)
        assert received.hidden_states.shape[0] == world_size * max(counts[1])
        dispatcher.combine_a(combine_input=fused_moe_forward_native(layer, received),
                             tbo_subbatch_index=1)
        overlapped = [dispatcher.combine_b(tbo_subbatch_index=mb) for mb in range(2)]
        for mb in range(2):
            assert overlapped[mb].shape == (counts[mb][rank], HIDDEN)
            torch.testing.assert_close(overlapped[mb], sequential[mb], rtol=0, atol=0,
                                       msg=f"rank {rank}, step {step}, micro-batch {mb}")
            x, topk = inputs[mb]
            expected = _dense(x.float(), topk.topk_weights, topk.topk_ids, w13, w2)
            torch.testing.assert_close(overlapped[mb].float(), expected, rtol=3e-2, atol=3e-2)
    destroy_pools()


def test_two_batch_overlap_interleaving_matches_sequential_micro_batches():
    # Per step, per micro-batch, per rank token counts (zero-token ranks and
    # micro-batches of different sizes included).
    run_ranks(_tbo_rank_main, 2, [[[3, 5], [2, 0]], [[0, 4], [6, 1]]], timeout_s=600)
