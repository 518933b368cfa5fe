"""Our dispatcher + our kernels + SGLang's own Triton MoE runner vs a dense MoE (one GPU).

``P`` logical EP ranks share one GPU in this process (design §8, split phases:
every rank's send, then every rank's wait). Each rank's ``OneSidedDispatcher``
drives its rank of one :class:`~vllm_a2a_plugin.LocalRanks` workspace, and
SGLang's ``MoeRunner(TRITON)`` computes that rank's experts on the received
STANDARD output, through the same path serving takes for our backend (the a2a
name is SGLang's CUSTOMIZED member, which has no fused function, so the Triton
runner's pre-permute -> run -> post-permute path runs). Ranks with zero tokens,
bf16 and fp8 1x128 block dispatch, and a CUDA-graph capture replayed with new
data are covered. Skipped unless SGLang, a GPU and our kernels are present.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("sglang.srt.plugins", reason="SGLang is not installed (SGLang env only)")

from tests.sglang_support import import_or_skip_without_sgl_kernel  # noqa: E402

pytestmark = pytest.mark.gpu

NUM_EXPERTS, HIDDEN, INTER, TOP_K = 16, 256, 128, 4


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


def _select_our_backend() -> None:
    """What SGLang's initialize_moe_config does for --moe-a2a-backend a2a_one_sided."""
    from sglang.srt.layers.moe.utils import MoeA2ABackend
    from sglang.srt.runtime_context import get_flags

    get_flags().moe.a2a_backend = MoeA2ABackend("a2a_one_sided")


class _Setup:
    def __init__(self, p: int, *, dispatch_fp8: bool, capacity: int = 64):
        runner_config_cls, runner_cls, quant_info_cls, backend = _sglang_triton_runner_or_skip()
        from vllm_a2a_plugin import A2AConfig, AllToAllSpec, LocalRanks
        from vllm_a2a_plugin.sglang.dispatcher import EpPlacement, OneSidedDispatcher

        _select_our_backend()
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
def test_dispatcher_and_sglang_triton_runner_match_dense_moe(p, counts, dispatch_fp8):
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


def test_cuda_graph_capture_replays_with_new_data():
    p, counts = 4, [6, 0, 11, 2]
    setup = _Setup(p, dispatch_fp8=False)
    _set_dp_counts(counts)  # baked into the graph, as SGLang's graph buckets are
    xs, topks = setup.tokens(counts, seed=21)
    setup.step(xs, topks)  # warm-up: Triton autotune/compile and allocator pools
    setup.local.synchronize()
    graph = torch.cuda.Graph()
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
