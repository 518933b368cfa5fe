"""Plain-torch MoE experts in vLLM's modular-kernel interface, for CPU tests.

Two variants show that our finalize honours ``finalize_weight_and_reduce_impl``:
``ReducingTorchExperts`` weight and sum over top-k themselves (NoOP), while
``UnreducedTorchExperts`` leave ``(M, topk, K)`` for finalize to reduce
(Contiguous), like vLLM's Triton and DeepGEMM experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import vllm.model_executor.layers.fused_moe.modular_kernel as mk
from vllm.model_executor.layers.fused_moe.topk_weight_and_reduce import (
    TopKWeightAndReduceContiguous,
    TopKWeightAndReduceNoOP,
)


def expert_mlp(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """SiLU-and-mul MLP of one expert in fp32: w1 [2N, K], w2 [K, N]."""
    gate_up = x.float() @ w1.float().t()
    n = gate_up.shape[-1] // 2
    return (F.silu(gate_up[..., :n]) * gate_up[..., n:]) @ w2.float().t()


class _TorchExperts(mk.FusedMoEExpertsModular):
    reduces = True

    @staticmethod
    def activation_format() -> mk.FusedMoEActivationFormat:
        return mk.FusedMoEActivationFormat.Standard

    @property
    def expects_unquantized_inputs(self) -> bool:
        return True

    @staticmethod
    def _supports_current_device() -> bool:
        return True

    @staticmethod
    def _supports_no_act_and_mul() -> bool:
        return False

    @staticmethod
    def _supports_quant_scheme(weight_key, activation_key) -> bool:
        return True

    @staticmethod
    def _supports_activation(activation) -> bool:
        return True

    @staticmethod
    def _supports_parallel_config(moe_parallel_config) -> bool:
        return True

    def workspace_shapes(self, M, N, K, topk, global_num_experts, local_num_experts,
                         expert_tokens_meta, activation):
        return (0,), (0,), ((M, K) if self.reduces else (M, topk, K))

    def finalize_weight_and_reduce_impl(self) -> mk.TopKWeightAndReduce:
        return TopKWeightAndReduceNoOP() if self.reduces else TopKWeightAndReduceContiguous()

    def apply(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation,
              global_num_experts, expert_map, a1q_scale, a2_scale, workspace13, workspace2,
              expert_tokens_meta, apply_router_weight_on_input):
        ids = topk_ids.to(torch.int64)
        local = expert_map[ids] if expert_map is not None else ids
        per_slot = torch.zeros((*ids.shape, hidden_states.shape[-1]), dtype=torch.float32)
        for e in range(w1.shape[0]):
            hit = local == e
            rows = hit.any(dim=1)
            if bool(rows.any()):
                y = expert_mlp(hidden_states[rows], w1[e], w2[e])  # [r, K]
                per_slot[rows] += hit[rows].unsqueeze(-1) * y.unsqueeze(1)
        if self.reduces:
            weights = torch.ones_like(topk_weights) if apply_router_weight_on_input else topk_weights
            output.copy_((per_slot * weights.float().unsqueeze(-1)).sum(dim=1))
        else:
            output.copy_(per_slot)


class ReducingTorchExperts(_TorchExperts):
    reduces = True


class UnreducedTorchExperts(_TorchExperts):
    reduces = False
