"""Our kernels with vLLM's own GPU experts.

P logical ranks on one GPU (split mode): our dispatch delivers global top-k ids
with the seed-002 padding id; on every rank one of vLLM's experts
implementations runs with that rank's ``expert_map`` and its slice of the
weights (and of their scales), writing its reduced output straight into the
workspace (zero-copy, as our finalize arranges for self-reducing experts); our
combine sums. The result must match vLLM's ``fused_experts`` on the
undispatched tokens with all experts (no EP).

Cases: ``TritonExperts`` with bf16, with fp8 1x128-block activations (128x128
weight blocks), with fp8 per-token activations (per-channel weights) and with
dynamic per-tensor fp8 (vLLM's ``quantization="fp8"``: dispatched in bf16,
quantised on arrival); ``CutlassExpertsFp8`` with fp8 per-token activations. Activations are quantised
before dispatch and their scales travel as a payload, as our prepare does.

Needs CUDA, our kernels and vLLM importable (the offline bundle on the GPU
machines); skipped otherwise, each case with its reason.
"""

from __future__ import annotations

import pytest
import torch

from tests.data import random_token_counts

pytestmark = pytest.mark.gpu

E, K_TOP, HIDDEN, INTER, MAX_TOKENS = 16, 4, 1024, 512, 96
CASES = [("triton", "bf16"), ("triton", "fp8_block"), ("triton", "fp8_token"),
         ("cutlass", "fp8_token"), ("triton", "fp8_tensor")]


def _vllm_or_skip():
    try:
        import vllm.model_executor.layers.fused_moe.fused_moe  # noqa: F401
        from vllm.model_executor.layers.fused_moe.experts.triton_moe import TritonExperts  # noqa
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"vLLM's fused MoE is not importable here ({type(exc).__name__}: {exc})")


def _experts_class(name: str):
    if name == "triton":
        from vllm.model_executor.layers.fused_moe.experts.triton_moe import TritonExperts

        return TritonExperts
    from vllm.model_executor.layers.fused_moe.experts.cutlass_moe import CutlassExpertsFp8

    if not CutlassExpertsFp8._supports_current_device():
        pytest.skip("vLLM reports CUTLASS grouped GEMM unsupported on this device")
    return CutlassExpertsFp8


def _block_quantize(w: torch.Tensor, block: int = 128):
    """[E, R, C] -> fp8 weights and float32 [E, R/128, C/128] scales."""
    e, r, c = w.shape
    tiles = w.float().view(e, r // block, block, c // block, block)
    scale = tiles.abs().amax(dim=(2, 4)).clamp_min(1e-6) / 448.0
    q = (tiles / scale[:, :, None, :, None]).to(torch.float8_e4m3fn).view(e, r, c)
    return q, scale


def _channel_quantize(w: torch.Tensor):
    """[E, R, C] -> fp8 weights and float32 [E, R, 1] per-output-channel scales."""
    scale = w.float().abs().amax(dim=2, keepdim=True).clamp_min(1e-6) / 448.0
    return (w.float() / scale).to(torch.float8_e4m3fn), scale


def _tensor_quantize(w: torch.Tensor):
    """[E, R, C] -> fp8 weights and float32 [E] per-expert scales (vLLM's quantization="fp8")."""
    scale = w.float().abs().amax(dim=(1, 2)).clamp_min(1e-6) / 448.0
    return (w.float() / scale[:, None, None]).to(torch.float8_e4m3fn), scale


def _dequantize(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-expert fp8 weights back to bf16."""
    return (w.float() * scale[:, None, None]).bfloat16()


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def _quant_config(quant: str, w1_scale, w2_scale):
    from vllm.model_executor.layers.fused_moe.config import (FUSED_MOE_UNQUANTIZED_CONFIG,
                                                             fp8_w8a8_moe_quant_config)

    if quant == "bf16":
        return FUSED_MOE_UNQUANTIZED_CONFIG
    if quant == "fp8_block":
        return fp8_w8a8_moe_quant_config(w1_scale=w1_scale, w2_scale=w2_scale,
                                         block_shape=[128, 128])
    if quant == "fp8_tensor":  # dynamic per-tensor activations
        return fp8_w8a8_moe_quant_config(w1_scale=w1_scale, w2_scale=w2_scale)
    return fp8_w8a8_moe_quant_config(w1_scale=w1_scale, w2_scale=w2_scale,
                                     per_act_token_quant=True, per_out_ch_quant=True)


def _moe_config(p: int):
    from vllm.config import ParallelConfig
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.config import (FusedMoEConfig,
                                                             FusedMoEParallelConfig,
                                                             RoutingMethodType)

    parallel = FusedMoEParallelConfig.make(1, 1, 1, 1, ParallelConfig())
    return FusedMoEConfig(
        num_experts=E, experts_per_token=K_TOP, hidden_dim=HIDDEN, intermediate_size=INTER,
        num_local_experts=E // p, num_logical_experts=E, activation=MoEActivation.SILU,
        device="cuda", routing_method=RoutingMethodType.Renormalize,
        moe_parallel_config=parallel, in_dtype=torch.bfloat16, max_num_tokens=MAX_TOKENS)


@pytest.mark.parametrize("p", [2, 4])
@pytest.mark.parametrize("experts_name,quant", CASES, ids=[f"{e}-{q}" for e, q in CASES])
def test_vllm_experts_on_our_dispatch_match_fused_experts(p, experts_name, quant):
    _vllm_or_skip()
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.fused_moe import fused_experts

    from vllm_a2a_plugin import A2AConfig, AllToAllSpec, LocalRanks
    from vllm_a2a_plugin.padding import padding_expert_id
    from vllm_a2a_plugin.vllm.prepare_finalize import (quantize_for_dispatch,
                                                       quantize_received_per_tensor)

    experts_cls = _experts_class(experts_name)
    gen = torch.Generator(device="cuda").manual_seed(p * 10 + len(quant))
    w1 = torch.randn((E, 2 * INTER, HIDDEN), generator=gen, device="cuda") / HIDDEN ** 0.5
    w2 = torch.randn((E, HIDDEN, INTER), generator=gen, device="cuda") / INTER ** 0.5
    fp8 = quant != "bf16"
    w1_scale = w2_scale = None
    if quant == "fp8_block":
        (w1, w1_scale), (w2, w2_scale) = _block_quantize(w1), _block_quantize(w2)
    elif quant == "fp8_token":
        (w1, w1_scale), (w2, w2_scale) = _channel_quantize(w1), _channel_quantize(w2)
    elif quant == "fp8_tensor":
        (w1, w1_scale), (w2, w2_scale) = _tensor_quantize(w1), _tensor_quantize(w2)
    else:
        w1, w2 = w1.bfloat16(), w2.bfloat16()
    per_token = quant == "fp8_token"
    # Dynamic per-tensor fp8 travels unquantised and is quantised on arrival (our prepare).
    after_dispatch = quant == "fp8_tensor"

    counts = random_token_counts(torch.Generator().manual_seed(p), p, MAX_TOKENS, zero_ranks=1)
    xs = [torch.randn((n, HIDDEN), generator=gen, device="cuda").bfloat16() for n in counts]
    scores = [torch.rand((n, E), generator=gen, device="cuda") for n in counts]
    weights = [s.softmax(-1).topk(K_TOP, dim=-1).values.float().contiguous() for s in scores]
    ids = [s.topk(K_TOP, dim=-1).indices.to(torch.int32).contiguous() for s in scores]

    scale_cols = 0 if not fp8 or after_dispatch else (1 if per_token else HIDDEN // 128)
    spec = AllToAllSpec(ep_size=p, max_tokens_per_rank=MAX_TOKENS, hidden_size=HIDDEN,
                        top_k=K_TOP, num_experts=E,
                        dispatch_dtype=(torch.float8_e4m3fn if fp8 and not after_dispatch
                                        else torch.bfloat16),
                        scale_cols=scale_cols, combine_dtype=torch.bfloat16)
    ranks = LocalRanks(spec, config=A2AConfig(timeout_s=10.0))
    if fp8 and not after_dispatch:
        # Our prepare's quantisation (vLLM's, plus the zero-token case it lacks).
        quantized = [quantize_for_dispatch(x, _quant_config(quant, w1_scale, w2_scale))
                     for x in xs]
        send_x = [q for q, _ in quantized]
        send_scales = [s.float().reshape(s.shape[0], scale_cols).contiguous() for _, s in quantized]
    else:
        send_x, send_scales = xs, None
    recv = ranks.dispatch(send_x, ids, weights, x_scales=send_scales)

    per_rank = E // p
    for r, got in enumerate(recv):
        local = slice(r * per_rank, (r + 1) * per_rank)
        expert_map = torch.full((E,), -1, dtype=torch.int32, device="cuda")
        expert_map[local] = torch.arange(per_rank, dtype=torch.int32, device="cuda")
        assert got.padding_id == padding_expert_id(expert_map, E) != -1
        # Each rank holds its experts' weights and their scales, as a vLLM EP rank does.
        experts = experts_cls(_moe_config(p), _quant_config(
            quant, None if w1_scale is None else w1_scale[local],
            None if w2_scale is None else w2_scale[local]))
        m = got.recv_x.shape[0]
        ws13, ws2, out_shape = experts.workspace_shapes(m, 2 * INTER, HIDDEN, K_TOP, E, per_rank,
                                                       None, MoEActivation.SILU)
        workspace13 = torch.empty(ws13, dtype=torch.bfloat16, device="cuda")
        workspace2 = torch.empty(ws2, dtype=torch.bfloat16, device="cuda")
        target = ranks.ranks[r].combine_input()
        assert tuple(out_shape) == tuple(target.shape)
        recv_x, a1q_scale = got.recv_x, got.recv_x_scales
        if a1q_scale is not None and per_token:
            a1q_scale = a1q_scale.view(m, 1)
        if after_dispatch:
            recv_x, a1q_scale = quantize_received_per_tensor(
                got, _quant_config(quant, w1_scale, w2_scale))
        experts.apply(target, recv_x, w1[local], w2[local], got.recv_topk_weights,
                      got.recv_topk_ids, MoEActivation.SILU, E, expert_map,
                      a1q_scale, None, workspace13, workspace2, None, False)
    outs = ranks.combine()
    ranks.synchronize()
    full_config = _quant_config(quant, w1_scale, w2_scale)
    for r in range(p):
        if counts[r] == 0:
            assert outs[r].shape == (0, HIDDEN)
            continue
        dense = fused_experts(xs[r], w1, w2, weights[r], ids[r], quant_config=full_config)
        rel = (outs[r].float() - dense.float()).norm() / dense.float().norm()
        if after_dispatch:
            # One fp8 scale over everything a rank received vs vLLM's one scale over a
            # rank's own batch: both are 3-bit-mantissa roundings of the same math, so
            # measure each against the unquantised MoE and hold ours to vLLM's error.
            exact = fused_experts(xs[r], _dequantize(w1, w1_scale), _dequantize(w2, w2_scale),
                                  weights[r], ids[r])
            ours_err = _relative(outs[r], exact)
            vllm_err = _relative(dense, exact)
            assert ours_err <= 1.5 * vllm_err + 1e-2, (
                f"rank {r}: ours {ours_err:.3e} vs vLLM per-tensor {vllm_err:.3e}")
            continue
        assert rel < (5e-2 if fp8 else 2e-2), f"rank {r}: relative error {rel:.3e}"
