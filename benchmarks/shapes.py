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


def routing(gen: torch.Generator, num_tokens: int, shape: MoEShape, kind: str, *,
            rank: int = 0, ep_size: int = 1) -> torch.Tensor:
    """``[T, K]`` int32 distinct expert ids of rank ``rank`` of ``ep_size``.

    ``uniform``: any expert. ``skewed``: most picks go to 4 hot experts. ``local``:
    only the experts ``rank`` owns (contiguous blocks of ``E / ep_size``), so no row
    leaves the rank while every flag still crosses: it separates the cost of the
    remote rows from that of the signalling.
    """
    scores = torch.rand((num_tokens, shape.num_experts), generator=gen, device=gen.device)
    if kind == "skewed":
        scores[:, : min(4, shape.num_experts)] += 2.0
    elif kind == "local":
        per_rank = shape.num_experts // ep_size
        if per_rank < shape.top_k:
            raise ValueError(f"local routing needs >= top_k ({shape.top_k}) experts per rank, "
                             f"{shape.name} has {per_rank} at {ep_size} ranks")
        scores[:, : rank * per_rank] -= 2.0
        scores[:, (rank + 1) * per_rank:] -= 2.0
    elif kind != "uniform":
        raise ValueError(f"routing must be uniform, skewed or local, got {kind!r}")
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
