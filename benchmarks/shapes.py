"""Model shapes and routing used by the benchmarks."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MoEShape:
    name: str
    hidden: int
    num_experts: int
    top_k: int


SHAPES = {
    "deepseek_v3": MoEShape("deepseek_v3", 7168, 256, 8),
    "qwen3_30b_a3b": MoEShape("qwen3_30b_a3b", 2048, 128, 8),
    "mixtral_8x7b": MoEShape("mixtral_8x7b", 4096, 8, 2),
}

DEFAULT_TOKENS = (1, 8, 32, 128, 256, 512, 1024, 2048, 4096)


def routing(gen: torch.Generator, num_tokens: int, shape: MoEShape, kind: str) -> torch.Tensor:
    """``[T, K]`` int32 distinct expert ids; ``skewed`` sends most picks to 4 hot experts."""
    scores = torch.rand((num_tokens, shape.num_experts), generator=gen, device=gen.device)
    if kind == "skewed":
        scores[:, : min(4, shape.num_experts)] += 2.0
    elif kind != "uniform":
        raise ValueError(f"routing must be uniform or skewed, got {kind!r}")
    return scores.topk(shape.top_k, dim=1).indices.to(torch.int32)


def crossing_bytes(topk_ids: list[torch.Tensor], num_experts: int, ep_size: int,
                   row_bytes: int) -> int:
    """Bytes of token rows that leave their rank: one row per distinct remote target."""
    per_rank = num_experts // ep_size
    total = 0
    for sender, ids in enumerate(topk_ids):
        if ids.numel() == 0:
            continue
        owners = ids.to(torch.int64).cpu() // per_rank
        targets = torch.zeros((ids.shape[0], ep_size), dtype=torch.bool)
        targets.scatter_(1, owners, True)
        targets[:, sender] = False
        total += int(targets.sum()) * row_bytes
    return total
