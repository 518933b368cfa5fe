"""How each of vLLM's activation quantisations travels through our dispatch
(CPU: the layout decision and the masking before per-tensor quantisation)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm", reason="needs vLLM installed")


def _fp8(**kwargs):
    from vllm.model_executor.layers.fused_moe.config import fp8_w8a8_moe_quant_config

    w = torch.ones(4, 1, 1, dtype=torch.float32)
    return fp8_w8a8_moe_quant_config(w1_scale=w, w2_scale=w, **kwargs)


def test_each_quantisation_gets_its_layout():
    from vllm_a2a_plugin.vllm.prepare_finalize import DispatchLayout, dispatch_layout

    bf16 = torch.bfloat16
    assert dispatch_layout(512, None, bf16, False) == DispatchLayout(bf16, 0)
    assert dispatch_layout(512, _fp8(block_shape=[128, 128]), bf16, False) == \
        DispatchLayout(torch.float8_e4m3fn, 4)
    assert dispatch_layout(512, _fp8(per_act_token_quant=True), bf16, False) == \
        DispatchLayout(torch.float8_e4m3fn, 1)
    static = _fp8(a1_scale=torch.tensor([0.5], dtype=torch.float32))
    assert dispatch_layout(512, static, bf16, False) == DispatchLayout(torch.float8_e4m3fn, 0)
    # vLLM's quantization="fp8": dynamic per-tensor -> unquantised, quantised on arrival.
    assert dispatch_layout(512, _fp8(), bf16, False) == DispatchLayout(bf16, 0, True)
    # Experts that quantise themselves take unquantised input whatever the config.
    assert dispatch_layout(512, _fp8(), bf16, True) == DispatchLayout(bf16, 0)


def test_received_rows_without_a_token_cannot_move_the_per_tensor_scale(monkeypatch):
    from vllm_a2a_plugin.all_to_all import DispatchResult
    from vllm_a2a_plugin.vllm import prepare_finalize

    pad = 8
    ids = torch.tensor([[1, pad], [pad, pad], [pad, 3], [pad, pad]], dtype=torch.int32)
    recv_x = torch.full((4, 16), 3.0, dtype=torch.bfloat16)
    recv_x[1] = 1e4  # a slot with no token here: stale bytes from an earlier step
    recv_x[3] = float("nan")
    recv = DispatchResult(recv_x=recv_x, recv_x_scales=None, recv_topk_ids=ids,
                          recv_topk_weights=torch.zeros(4, 2, dtype=torch.float32),
                          recv_extra=(), runtime_max_tokens=2, padding_id=pad)
    seen = {}

    def per_tensor_quant(x, scale, quant_dtype, per_act_token_quant, block_shape):
        # vLLM's fp8 kernel is CUDA-only; record what it would be given.
        seen.update(x=x.clone(), scale=scale, per_token=per_act_token_quant, block=block_shape)
        return x.to(quant_dtype), x.float().abs().amax().reshape(1) / 448.0

    monkeypatch.setattr(prepare_finalize, "moe_kernel_quantize_input", per_tensor_quant)
    xq, scale = prepare_finalize.quantize_received_per_tensor(recv, _fp8())
    assert seen["scale"] is None and not seen["per_token"] and seen["block"] is None
    assert torch.equal(seen["x"][[0, 2]], recv_x[[0, 2]])
    assert torch.equal(seen["x"][[1, 3]], torch.zeros(2, 16, dtype=torch.bfloat16))
    assert xq.dtype == torch.float8_e4m3fn and float(scale) == pytest.approx(3.0 / 448.0)

    empty = DispatchResult(recv_x=recv_x[:0], recv_x_scales=None, recv_topk_ids=ids[:0],
                           recv_topk_weights=torch.zeros(0, 2, dtype=torch.float32),
                           recv_extra=(), runtime_max_tokens=0, padding_id=pad)
    xq, scale = prepare_finalize.quantize_received_per_tensor(empty, _fp8())
    assert xq.shape == (0, 16) and xq.dtype == torch.float8_e4m3fn and scale.shape == (1,)
