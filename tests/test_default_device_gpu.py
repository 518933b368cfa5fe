"""Our objects under a caller's default device and dtype (vLLM builds models
under ``with torch.device("cuda")``): building an all-to-all there once failed
with "Only dense CPU tensors can be pinned" (the error record landed on the GPU)."""

from __future__ import annotations

import pytest
import torch

from tests.test_kernels_gpu import assert_dispatch_matches, make_inputs, to_gpu
from vllm_a2a_plugin import A2AConfig, AllToAllSpec, LocalRanks
from vllm_a2a_plugin.padding import linear_expert_owner
from vllm_a2a_plugin.reference import combine_reference, dispatch_reference

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("default_dtype", [torch.float64, torch.bfloat16])
def test_build_and_run_under_cuda_default_device(default_dtype):
    spec = AllToAllSpec(ep_size=2, max_tokens_per_rank=16, hidden_size=256, top_k=2,
                        num_experts=8)
    counts = [7, 0]
    xs, ids, ws, _, _ = make_inputs(torch.Generator().manual_seed(3), spec, counts)
    ys = [torch.randn((2 * max(counts), spec.hidden_size), dtype=torch.float32)
          .to(torch.bfloat16) for _ in counts]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        with torch.device("cuda"):
            ranks = LocalRanks(spec, config=A2AConfig(timeout_s=10.0))
            results = ranks.dispatch(to_gpu(xs), to_gpu(ids), to_gpu(ws))
            ranks.synchronize()
            assert_dispatch_matches(results, dispatch_reference(
                xs=xs, topk_ids=ids, topk_weights=ws,
                expert_owner=linear_expert_owner(8, 2)), spec)
            outs = ranks.combine(to_gpu(ys))
            ranks.synchronize()
    finally:
        torch.set_default_dtype(previous)
    for a2a in ranks.ranks:
        assert a2a._error_record.device.type == "cpu" and a2a._error_record.is_pinned()
    expected = combine_reference(ys=ys, topk_ids=ids, expert_owner=linear_expert_owner(8, 2),
                                 runtime_max_tokens=max(counts))
    for got, exp in zip(outs, expected):
        torch.testing.assert_close(got.float().cpu(), exp.float(), rtol=1e-5, atol=1e-5)
