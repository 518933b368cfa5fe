"""Our dispatcher + our kernels + SGLang's own Triton MoE runner vs a dense MoE (one GPU).

``P`` logical EP ranks share one GPU in this process (design §8, split phases:
every rank's send, then every rank's wait). Each rank's ``OneSidedDispatcher``
drives its rank of one :class:`~vllm_a2a_plugin.LocalRanks` workspace, and
SGLang's ``MoeRunner(TRITON)`` computes that rank's experts on the received
STANDARD output, through the same path serving takes for our backend (the a2a
name is SGLang's CUSTOMIZED member, which has no fused function, so the Triton
runner's pre-permute -> run -> post-permute path runs). Ranks with zero tokens,
bf16 and fp8 1x128 block dispatch, and a CUDA-graph capture replayed with new
data are covered, as are two-batch overlap's two micro-batches in flight on
separate workspaces (SGLang's ``dispatch_a``/``dispatch_b``/``combine_a``/
``combine_b`` order).

Then one EP rank per process, 2 and 3 processes sharing the GPU: the pool
shares their workspaces through CUDA IPC (torch symmetric memory and NCCL both
refuse two ranks on one device), eager and under CUDA-graph capture/replay.
Skipped unless SGLang, a GPU and our kernels are present.

SGLang's state: every test publishes SGLang's config and states its groups the
way SGLang's scheduler process does before its MoE layers run
(``tests/sglang_support.py`` ``sglang_ep_state``): the Triton runner reads the
published config (``get_exec()``) and the TP group; a process that is one EP
rank also gets its ranks. The in-process tests put the previous state back.
"""

from __future__ import annotations

import pytest
import torch
# torch's graph class is torch.cuda.CUDAGraph (torch 2.11 to 2.14 have no torch.cuda.Graph:
# the H100 run's graph test died of that AttributeError). Bound here so a
# wrong name fails collection on a CPU machine too, not only on a GPU.
from torch.cuda import CUDAGraph

pytest.importorskip("sglang.srt.plugins", reason="SGLang is not installed (SGLang env only)")

from tests.sglang_support import (  # noqa: E402
    import_or_skip_without_sgl_kernel,
    sglang_ep_state,
)

pytestmark = pytest.mark.gpu

# SGLang places E / EP experts on every rank: 24 divides every EP size used
# here (2, 4 and 8 logical ranks; 2 and 3 processes).
NUM_EXPERTS, HIDDEN, INTER, TOP_K = 24, 256, 128, 4


def _sglang_triton_runner_or_skip():
    """Load our plugin and SGLang's Triton runner; skip with the reason if they cannot load."""
    from sglang.srt.plugins import load_plugins

    load_plugins()
    from vllm_a2a_plugin.sglang import register

    register()  # idempotent; where the package runs from PYTHONPATH, no entry point is installed
    # SGLang's MoE layers import its compiled sgl_kernel on a GPU machine: without
    # it (built for another torch) that is the skip; any other import error fails.
    import_or_skip_without_sgl_kernel()
    import vllm_a2a_plugin.sglang.dispatcher  # noqa: F401 - imports SGLang's MoE layers
    from sglang.srt.layers.moe.moe_runner import MoeRunnerConfig
    from sglang.srt.layers.moe.moe_runner.runner import MoeRunner
    from sglang.srt.layers.moe.moe_runner.triton import TritonMoeQuantInfo
    from sglang.srt.layers.moe.utils import MoeRunnerBackend
    return MoeRunnerConfig, MoeRunner, TritonMoeQuantInfo, MoeRunnerBackend


@pytest.fixture
def sglang_state():
    """``enter(ep_size)`` enters SGLang's published state for ``ep_size``
    logical EP ranks sharing this process (no rank of its own); the state this
    process had before comes back at teardown."""
    from contextlib import ExitStack

    _sglang_triton_runner_or_skip()  # before publishing: resolving imports SGLang's kernels
    with ExitStack() as stack:
        yield lambda ep_size: stack.enter_context(sglang_ep_state(ep_size))


class _Setup:
    def __init__(self, p: int, *, dispatch_fp8: bool, capacity: int = 64):
        runner_config_cls, runner_cls, quant_info_cls, backend = _sglang_triton_runner_or_skip()
        from vllm_a2a_plugin import A2AConfig, AllToAllSpec, LocalRanks
        from vllm_a2a_plugin.sglang.dispatcher import EpPlacement, OneSidedDispatcher

        device = torch.device("cuda", torch.cuda.current_device())
        gen = torch.Generator(device="cpu").manual_seed(3)
        self.p, self.device = p, device
        self.w13 = (torch.randn((NUM_EXPERTS, 2 * INTER, HIDDEN), generator=gen)
                    / HIDDEN ** 0.5).to(device, torch.bfloat16)
        self.w2 = (torch.randn((NUM_EXPERTS, HIDDEN, INTER), generator=gen)
                   / INTER ** 0.5).to(device, torch.bfloat16)
        spec = AllToAllSpec(ep_size=p, max_tokens_per_rank=capacity, hidden_size=HIDDEN,
                            top_k=TOP_K, num_experts=NUM_EXPERTS,
                            dispatch_dtype=torch.float8_e4m3fn if dispatch_fp8 else torch.bfloat16,
                            scale_cols=HIDDEN // 128 if dispatch_fp8 else 0,
                            combine_dtype=torch.bfloat16)
        self.local = LocalRanks(spec, mode="split",
                                config=A2AConfig(timeout_s=10.0, check_expert_ids=False))
        per_rank = NUM_EXPERTS // p
        self.dispatchers, self.runners, self.quant_infos = [], [], []
        for rank in range(p):
            placement = EpPlacement(cpu_group=None, rank=rank, size=p, device=device,
                                    attn_tp_size=1, max_tokens_per_rank=capacity)
            self.dispatchers.append(OneSidedDispatcher(
                placement, num_experts=NUM_EXPERTS, hidden_size=HIDDEN, top_k=TOP_K,
                params_dtype=torch.bfloat16, runner_backend=backend.TRITON,
                dispatch_fp8=dispatch_fp8, all_to_all=self.local.ranks[rank]))
            config = runner_config_cls(
                num_experts=NUM_EXPERTS, num_local_experts=per_rank, hidden_size=HIDDEN,
                intermediate_size_per_partition=INTER, top_k=TOP_K, num_fused_shared_experts=0,
                params_dtype=torch.bfloat16, runner_backend=backend.TRITON, activation="silu",
                inplace=False)
            self.runners.append(runner_cls(backend.TRITON, config))
            mine = slice(rank * per_rank, (rank + 1) * per_rank)
            self.quant_infos.append(quant_info_cls(w13_weight=self.w13[mine].contiguous(),
                                                   w2_weight=self.w2[mine].contiguous()))

    def tokens(self, counts, seed):
        gen = torch.Generator(device="cpu").manual_seed(seed)
        xs, topks = [], []
        for count in counts:
            x = torch.randn((count, HIDDEN), generator=gen).to(self.device, torch.bfloat16)
            scores = torch.rand((count, NUM_EXPERTS), generator=gen).softmax(dim=-1)
            weights, ids = scores.topk(TOP_K, dim=-1)
            xs.append(x)
            topks.append((weights.to(self.device), ids.to(self.device, torch.int32)))
        return xs, topks

    def step(self, xs, topks, outs=None):
        """One MoE layer on every logical rank: dispatch -> SGLang Triton runner -> combine."""
        from sglang.srt.layers.moe.topk import StandardTopKOutput

        from vllm_a2a_plugin.all_to_all import PHASE_SEND

        for d, x, (w, ids) in zip(self.dispatchers, xs, topks):
            d.dispatch(x, StandardTopKOutput(w, ids, None), phases=PHASE_SEND)
        received = [d.dispatch_wait() for d in self.dispatchers]
        combine_inputs = [runner.run(out, info) for runner, out, info in
                          zip(self.runners, received, self.quant_infos)]
        for d, ci in zip(self.dispatchers, combine_inputs):
            d.combine(ci, phases=PHASE_SEND)
        return [d.combine_wait() for d in self.dispatchers]

    def dense(self, x, weights, ids, *, fp8_input: bool):
        from vllm_a2a_plugin.reference import dense_moe_reference
        from vllm_a2a_plugin.sglang.dispatcher import quantize_fp8_blocks

        xf = x.float()
        if fp8_input:
            q, scales = quantize_fp8_blocks(x)
            xf = (q.float().view(-1, HIDDEN // 128, 128) * scales[..., None]).view(-1, HIDDEN)
            xf = xf.to(torch.bfloat16).float()
        w13, w2 = self.w13.float(), self.w2.float()

        def expert(e, rows):
            gate, up = (rows @ w13[e].T).chunk(2, dim=-1)
            return (torch.nn.functional.silu(gate) * up) @ w2[e].T

        return dense_moe_reference(xf, ids, weights, expert)


def _set_dp_counts(counts):
    from sglang.srt.layers.dp_attention import set_dp_buffer_len

    set_dp_buffer_len(sum(counts), 0, False, global_num_tokens=list(counts))


@pytest.mark.parametrize("p, counts", [(2, [9, 0]), (4, [5, 0, 17, 3]), (8, [2] * 7 + [0])])
@pytest.mark.parametrize("dispatch_fp8", [False, True], ids=["bf16", "fp8"])
def test_dispatcher_and_sglang_triton_runner_match_dense_moe(p, counts, dispatch_fp8,
                                                            sglang_state):
    sglang_state(p)
    setup = _Setup(p, dispatch_fp8=dispatch_fp8)
    for step in range(2):
        step_counts = counts if step == 0 else counts[::-1]
        _set_dp_counts(step_counts)
        xs, topks = setup.tokens(step_counts, seed=11 + step)
        outs = setup.step(xs, topks)
        setup.local.synchronize()
        for rank, (out, x, (w, ids)) in enumerate(zip(outs, xs, topks)):
            assert out.shape == (step_counts[rank], HIDDEN)
            expected = setup.dense(x, w, ids, fp8_input=dispatch_fp8)
            torch.testing.assert_close(out.float(), expected, rtol=3e-2, atol=3e-2,
                                       msg=f"rank {rank} of {p}, step {step}")


def test_cuda_graph_capture_replays_with_new_data(sglang_state):
    p, counts = 4, [6, 0, 11, 2]
    sglang_state(p)
    setup = _Setup(p, dispatch_fp8=False)
    _set_dp_counts(counts)  # baked into the graph, as SGLang's graph buckets are
    xs, topks = setup.tokens(counts, seed=21)
    setup.step(xs, topks)  # warm-up: Triton autotune/compile and allocator pools
    setup.local.synchronize()
    graph = CUDAGraph()
    with torch.cuda.graph(graph):
        outs = setup.step(xs, topks)
    for seed in (31, 32):
        new_xs, new_topks = setup.tokens(counts, seed=seed)
        for x, (w, ids), nx, (nw, nids) in zip(xs, topks, new_xs, new_topks):
            x.copy_(nx)
            w.copy_(nw)
            ids.copy_(nids)
        graph.replay()
        setup.local.synchronize()
        for rank in range(p):
            expected = setup.dense(xs[rank], topks[rank][0], topks[rank][1], fp8_input=False)
            torch.testing.assert_close(outs[rank].float(), expected, rtol=3e-2, atol=3e-2,
                                       msg=f"rank {rank}, replay seed {seed}")
    rounds = [a2a.completed_rounds() for a2a in setup.local.ranks]
    assert all(r == (3, 3) for r in rounds), rounds  # warm-up and two replays (capture runs nothing)


def test_two_batch_overlap_micro_batches_in_flight_on_separate_workspaces(sglang_state):
    """SGLang's TBO order on P logical ranks: both micro-batches' sends
    (``dispatch_a``), other compute, then each one's wait -> Triton runner ->
    ``combine_a``, then both ``combine_b``. Each micro-batch has its own
    workspace; results equal the dense MoE and every workspace ran every round."""
    p, counts = 4, ([5, 0, 9, 2], [1, 7, 0, 4])
    runner_config_cls, runner_cls, quant_info_cls, backend = _sglang_triton_runner_or_skip()
    from sglang.srt.layers.moe.topk import StandardTopKOutput

    from vllm_a2a_plugin import A2AConfig, LocalRanks
    from vllm_a2a_plugin.sglang.dispatcher import EpPlacement, OneSidedDispatcher

    sglang_state(p)
    setup = _Setup(p, dispatch_fp8=False)
    second = LocalRanks(setup.local.spec, mode="split",
                        config=A2AConfig(timeout_s=10.0, check_expert_ids=False))
    workspaces = (setup.local, second)
    # Separate workspaces: no buffer of one micro-batch's all-to-all is the other's.
    assert not set(setup.local.workspace.peer_ptrs) & set(second.workspace.peer_ptrs)
    dispatchers = []
    for rank in range(p):
        placement = EpPlacement(cpu_group=None, rank=rank, size=p, device=setup.device,
                                attn_tp_size=1, max_tokens_per_rank=setup.local.spec
                                .max_tokens_per_rank)
        dispatchers.append(OneSidedDispatcher(
            placement, num_experts=NUM_EXPERTS, hidden_size=HIDDEN, top_k=TOP_K,
            params_dtype=torch.bfloat16, runner_backend=backend.TRITON, micro_batches=2,
            all_to_all=(setup.local.ranks[rank], second.ranks[rank])))
    steps = 2
    for step in range(steps):
        inputs = [setup.tokens(counts[mb] if step == 0 else counts[mb][::-1], seed=40 + 2 * step
                               + mb) for mb in range(2)]
        # Each micro-batch's per-rank counts are published before its sends (an
        # engine that publishes none makes the ranks agree on M over their CPU
        # group: tests/test_sglang_dispatch_cpu.py).
        for mb, (xs, topks) in enumerate(inputs):
            _set_dp_counts([x.shape[0] for x in xs])
            for d, x, (w, ids) in zip(dispatchers, xs, topks):
                d.dispatch_a(hidden_states=x, topk_output=StandardTopKOutput(w, ids, None),
                             tbo_subbatch_index=mb)
        # Compute of "the other micro-batch" between the sends and the waits.
        filler = torch.randn((2048, 2048), device=setup.device, dtype=torch.bfloat16)
        filler = filler @ filler
        for mb in range(2):
            received = [d.dispatch_b(tbo_subbatch_index=mb) for d in dispatchers]
            combine_inputs = [runner.run(out, info) for runner, out, info in
                              zip(setup.runners, received, setup.quant_infos)]
            for d, ci in zip(dispatchers, combine_inputs):
                d.combine_a(combine_input=ci, tbo_subbatch_index=mb)
        outs = [[d.combine_b(tbo_subbatch_index=mb) for d in dispatchers] for mb in range(2)]
        for local in workspaces:
            local.synchronize()
        assert torch.isfinite(filler).all()
        for mb, (xs, topks) in enumerate(inputs):
            for rank in range(p):
                expected = setup.dense(xs[rank], *topks[rank], fp8_input=False)
                torch.testing.assert_close(outs[mb][rank].float(), expected, rtol=3e-2,
                                           atol=3e-2, msg=f"step {step}, micro-batch {mb}, "
                                           f"rank {rank}")
    for local in workspaces:
        assert all(a2a.completed_rounds() == (steps, steps) for a2a in local.ranks), \
            [a2a.completed_rounds() for a2a in local.ranks]


def _rank_processes(rank, world_size, port, counts_per_step, dispatch_fp8, graphs):
    """One EP rank per process, all on GPU 0: SGLang's Triton runner on this
    rank's experts between our dispatcher's dispatch and combine, workspaces
    shared through CUDA IPC by the pool (as an SGLang server with several EP
    ranks on one GPU would have them)."""
    import torch.distributed as dist

    torch.cuda.set_device(0)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    _sglang_triton_runner_or_skip()
    # This process is EP rank `rank` of an SGLang scheduler; its TP = EP group
    # is the gloo WORLD (SGLang's own would open NCCL, refused on one GPU).
    with sglang_ep_state(world_size, rank=rank, cpu_group=dist.group.WORLD, gpu_id=0):
        _rank_layers(rank, world_size, counts_per_step, dispatch_fp8, graphs)


def _rank_layers(rank, world_size, counts_per_step, dispatch_fp8, graphs):
    import torch.distributed as dist

    runner_config_cls, runner_cls, quant_info_cls, backend = _sglang_triton_runner_or_skip()
    from sglang.srt.layers.moe.topk import StandardTopKOutput

    from vllm_a2a_plugin.sglang.dispatcher import (EpPlacement, OneSidedDispatcher, destroy_pools,
                                                   pool_for)

    device = torch.device("cuda", 0)
    gen = torch.Generator(device="cpu").manual_seed(3)
    w13 = (torch.randn((NUM_EXPERTS, 2 * INTER, HIDDEN), generator=gen) / HIDDEN ** 0.5)
    w2 = (torch.randn((NUM_EXPERTS, HIDDEN, INTER), generator=gen) / INTER ** 0.5)
    w13, w2 = w13.to(device, torch.bfloat16), w2.to(device, torch.bfloat16)
    per_rank = NUM_EXPERTS // world_size
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    placement = EpPlacement(cpu_group=dist.group.WORLD, rank=rank, size=world_size,
                            device=device, attn_tp_size=1, max_tokens_per_rank=32)
    dispatcher = OneSidedDispatcher(placement, num_experts=NUM_EXPERTS, hidden_size=HIDDEN,
                                    top_k=TOP_K, params_dtype=torch.bfloat16,
                                    runner_backend=backend.TRITON, dispatch_fp8=dispatch_fp8)
    assert pool_for(dist.group.WORLD, device).allocation == "cuda_ipc"
    config = runner_config_cls(
        num_experts=NUM_EXPERTS, num_local_experts=per_rank, hidden_size=HIDDEN,
        intermediate_size_per_partition=INTER, top_k=TOP_K, num_fused_shared_experts=0,
        params_dtype=torch.bfloat16, runner_backend=backend.TRITON, activation="silu",
        inplace=False)
    runner = runner_cls(backend.TRITON, config)
    info = quant_info_cls(w13_weight=w13[mine].contiguous(), w2_weight=w2[mine].contiguous())
    setup = _Setup.__new__(_Setup)  # only its dense reference and token maker
    setup.device, setup.w13, setup.w2 = device, w13, w2

    def layer(x, w, ids):
        received = dispatcher.dispatch(x, StandardTopKOutput(w, ids, None))
        return dispatcher.combine(runner.run(received, info))

    for step, counts in enumerate(counts_per_step):
        _set_dp_counts(counts)
        xs, topks = setup.tokens(counts, seed=60 + step)
        x, (w, ids) = xs[rank], topks[rank]
        if graphs:
            layer(x, w, ids)  # warm-up: Triton compile, allocator pools
            torch.cuda.synchronize()
            dist.barrier()
            graph = CUDAGraph()
            with torch.cuda.graph(graph):
                out = layer(x, w, ids)
            new_xs, new_topks = setup.tokens(counts, seed=90 + step)
            x.copy_(new_xs[rank])
            w.copy_(new_topks[rank][0])
            ids.copy_(new_topks[rank][1])
            dist.barrier()
            graph.replay()
        else:
            out = layer(x, w, ids)
        torch.cuda.synchronize()
        assert out.shape == (counts[rank], HIDDEN)
        expected = setup.dense(x, w, ids, fp8_input=dispatch_fp8)
        torch.testing.assert_close(out.float(), expected, rtol=3e-2, atol=3e-2,
                                   msg=f"rank {rank} of {world_size}, step {step}")
        # This step's graph and its output (a block of that graph's pool) go now,
        # not when the next capture rebinds `out`: nothing is freed mid-capture.
        out = graph = None
    rounds = dispatcher.all_to_all.completed_rounds()
    want = len(counts_per_step) * (2 if graphs else 1)
    assert rounds == (want, want), rounds
    dist.barrier()
    destroy_pools()


@pytest.mark.parametrize("world_size, counts", [
    (2, [[6, 0], [3, 9]]),
    (3, [[4, 0, 7], [0, 0, 5]]),
])
@pytest.mark.parametrize("dispatch_fp8", [False, True], ids=["bf16", "fp8"])
def test_processes_sharing_the_gpu_under_sglangs_triton_runner(world_size, counts,
                                                                 dispatch_fp8, monkeypatch):
    from tests.multiproc import run_ranks

    _sglang_triton_runner_or_skip()  # skip here, before spawning, when SGLang cannot load
    # Kernels of several processes time-slice one GPU: a spin-wait round costs ms.
    monkeypatch.setenv("VLLM_A2A_TIMEOUT_S", "120")
    run_ranks(_rank_processes, world_size, counts, dispatch_fp8, False)


def test_processes_sharing_the_gpu_cuda_graph_replay(monkeypatch):
    from tests.multiproc import run_ranks

    _sglang_triton_runner_or_skip()
    monkeypatch.setenv("VLLM_A2A_TIMEOUT_S", "120")
    run_ranks(_rank_processes, 2, [[5, 2], [0, 8]], False, True)
