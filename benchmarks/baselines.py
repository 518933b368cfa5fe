"""What users would pick instead of our kernels, over torch.distributed (NCCL).

* ``nccl_a2a``: the standard two-sided design: each rank sorts its token rows
  by destination rank (one row per distinct target), exchanges counts, then
  ``all_to_all_single``; combine reverses it and sums. Needs a host sync for
  the split sizes, so it runs eagerly only.
* ``agrs``: vLLM's all-gather / reduce-scatter scheme: every rank gathers all
  tokens, computes its experts on all of them, then reduce-scatters.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class NcclTwoSided:
    def __init__(self, group, num_experts: int):
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.per_rank = num_experts // self.ep_size

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor):
        owners = topk_ids.to(torch.int64) // self.per_rank
        targets = torch.zeros((x.shape[0], self.ep_size), dtype=torch.bool, device=x.device)
        targets.scatter_(1, owners, True)
        token_idx, dest = torch.nonzero(targets, as_tuple=True)  # one row per distinct target
        order = torch.argsort(dest, stable=True)
        token_idx, dest = token_idx[order], dest[order]
        send_counts = torch.bincount(dest, minlength=self.ep_size)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send_splits = send_counts.tolist()
        recv_splits = recv_counts.tolist()
        send = x.index_select(0, token_idx)
        recv = x.new_empty((sum(recv_splits), x.shape[1]))
        dist.all_to_all_single(recv, send, recv_splits, send_splits, group=self.group)
        self._state = (token_idx, send_splits, recv_splits, x.shape[0])
        return recv

    def combine(self, y: torch.Tensor):
        token_idx, send_splits, recv_splits, num_tokens = self._state
        back = y.new_empty((sum(send_splits), y.shape[1]))
        dist.all_to_all_single(back, y, send_splits, recv_splits, group=self.group)
        out = torch.zeros((num_tokens, y.shape[1]), dtype=torch.float32, device=y.device)
        out.index_add_(0, token_idx, back.float())
        return out.to(y.dtype)


class AllGatherReduceScatter:
    def __init__(self, group, max_tokens: int):
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.max_tokens = max_tokens

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor):
        padded = x.new_zeros((self.max_tokens, x.shape[1]))
        padded[: x.shape[0]] = x
        gathered = x.new_empty((self.ep_size * self.max_tokens, x.shape[1]))
        dist.all_gather_into_tensor(gathered, padded, group=self.group)
        ids = topk_ids.new_zeros((self.max_tokens, topk_ids.shape[1]))
        ids[: topk_ids.shape[0]] = topk_ids
        all_ids = ids.new_empty((self.ep_size * self.max_tokens, ids.shape[1]))
        dist.all_gather_into_tensor(all_ids, ids, group=self.group)
        self._num_tokens = x.shape[0]
        return gathered

    def combine(self, y: torch.Tensor):
        out = y.new_empty((self.max_tokens, y.shape[1]))
        dist.reduce_scatter_tensor(out, y, group=self.group)
        return out[: self._num_tokens]


class FlashInferOneSided:
    """flashinfer's ``MoeAlltoAll`` (TensorRT-LLM's one-sided NVLink kernels), set
    up the way vLLM 0.32's ``flashinfer_nvlink_one_sided`` manager does it: one
    MNNVL workspace per rank sized for hidden states (+ scales), top-k ids and
    weights, combine in bf16. Needs flashinfer-python 0.7.0.post1 (the vLLM
    bundle carries it); its kernels are JIT-built on first use."""

    def __init__(self, group, *, max_tokens: int, top_k: int, num_experts: int, hidden: int,
                 x_row_bytes: int, scale_row_bytes: int):
        from flashinfer.comm.comm_backend import TorchDistBackend
        from flashinfer.comm.mapping import Mapping
        from flashinfer.comm.mnnvl import MnnvlConfig
        from flashinfer.comm.trtllm_moe_alltoall import (MoeAlltoAll,
                                                         moe_a2a_get_workspace_size_per_rank)

        world, rank = dist.get_world_size(group), dist.get_rank(group)
        mapping = Mapping(world, rank, torch.cuda.device_count(), tp_size=world,
                          moe_ep_size=world)
        size = moe_a2a_get_workspace_size_per_rank(
            ep_size=world, max_num_tokens=max_tokens,
            total_dispatch_payload_size_per_token=x_row_bytes + scale_row_bytes + 8 * top_k,
            combine_payload_size_per_token=hidden * 2)
        self.num_experts = num_experts
        self.ep_size = world
        self.a2a = MoeAlltoAll(mapping=mapping, max_num_tokens=max_tokens, top_k=top_k,
                               num_experts=num_experts, workspace_size_per_rank=size,
                               mnnvl_config=MnnvlConfig(comm_backend=TorchDistBackend(group)))

    def dispatch(self, x, topk_ids, topk_weights, scales, runtime_max_tokens: int):
        payloads = [x] + ([scales] if scales is not None else []) + [topk_ids, topk_weights]
        recv = self.a2a.dispatch(token_selected_experts=topk_ids, input_payloads=payloads,
                                 runtime_max_tokens_per_rank=runtime_max_tokens,
                                 invalid_token_expert_id=self.num_experts,
                                 expert_id_payload_index=len(payloads) - 2)
        self._m = runtime_max_tokens
        return recv[0]

    def combine(self, y: torch.Tensor):
        return self.a2a.combine(payload=y.view(self.ep_size, self._m, y.shape[-1]),
                                runtime_max_tokens_per_rank=self._m)
