"""Seeded test inputs: every rank's data from one generator, so any process can
rebuild every rank's inputs and its own reference."""

from __future__ import annotations

import torch


def random_topk_ids(gen: torch.Generator, num_tokens: int, top_k: int, num_experts: int
                    ) -> torch.Tensor:
    """``[T, K]`` int32, distinct experts per token (as routers produce)."""
    if num_tokens == 0:
        return torch.zeros((0, top_k), dtype=torch.int32)
    scores = torch.rand((num_tokens, num_experts), generator=gen)
    return scores.topk(top_k, dim=1).indices.to(torch.int32)


def skewed_topk_ids(gen: torch.Generator, num_tokens: int, top_k: int, num_experts: int,
                    hot: int = 2) -> torch.Tensor:
    """Most picks land on the first ``hot`` experts (load imbalance)."""
    if num_tokens == 0:
        return torch.zeros((0, top_k), dtype=torch.int32)
    bias = torch.zeros(num_experts)
    bias[:hot] = 4.0
    scores = torch.rand((num_tokens, num_experts), generator=gen) + bias
    return scores.topk(top_k, dim=1).indices.to(torch.int32)


def random_hidden(gen: torch.Generator, num_tokens: int, hidden: int, dtype: torch.dtype
                  ) -> torch.Tensor:
    x = torch.randn((num_tokens, hidden), generator=gen)
    if dtype == torch.float8_e4m3fn:
        return (x * 4).clamp(-448, 448).to(dtype)
    return x.to(dtype)


def random_token_counts(gen: torch.Generator, ep_size: int, max_tokens: int,
                        zero_ranks: int = 1) -> list[int]:
    """Random counts in [0, max_tokens] with ``zero_ranks`` ranks forced to 0."""
    counts = torch.randint(0, max_tokens + 1, (ep_size,), generator=gen).tolist()
    for r in torch.randperm(ep_size, generator=gen)[:zero_ranks].tolist():
        counts[r] = 0
    return counts


def random_weights(gen: torch.Generator, num_tokens: int, top_k: int) -> torch.Tensor:
    return torch.rand((num_tokens, top_k), generator=gen, dtype=torch.float32) + 0.1
