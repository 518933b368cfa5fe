"""Which expert id marks a slot that carries no work for the receiving rank.

Seed 002 (vLLM PR 42034): ``-1`` is wrong whenever an ``expert_map`` exists,
because kernels index ``expert_map[id]`` before they filter, and
``expert_map[-1]`` reads the *last* entry, which may be a local expert (wrong
math) or fault. The padding id must instead be a valid global id that maps to
``-1`` on this rank, i.e. an expert owned by another EP rank. This module is
the one place that decides it.
"""

from __future__ import annotations

import torch

from vllm_a2a_plugin.errors import A2AInputError


def padding_expert_id(expert_map: torch.Tensor | None, num_experts: int) -> int:
    """The expert id that padded top-k slots carry on the rank owning ``expert_map``.

    Args:
        expert_map: vLLM's global -> local expert table of this rank,
            ``[num_experts]`` integer, ``-1`` for experts this rank does not own
            (physical ids under EPLB, redundant experts included), or ``None``.
        num_experts: number of global (physical) experts.

    Returns:
        The smallest global id with ``expert_map[id] == -1`` (owned by another
        rank, so every expert-map-aware kernel skips it); ``num_experts`` (out of
        range, skipped by kernels without a map) when there is no map or every
        expert is local. Never ``-1``.
    """
    if num_experts <= 0:
        raise A2AInputError(f"num_experts ({num_experts}) must be positive")
    if expert_map is None:
        return num_experts
    if expert_map.dim() != 1 or expert_map.numel() != num_experts:
        raise A2AInputError(
            f"expert_map must be 1-D with num_experts ({num_experts}) entries, "
            f"got shape {tuple(expert_map.shape)}"
        )
    if expert_map.dtype.is_floating_point or expert_map.dtype == torch.bool:
        raise A2AInputError(f"expert_map must hold integers, got {expert_map.dtype}")
    not_local = torch.nonzero(expert_map.detach().to("cpu") == -1)
    if not_local.numel() == 0:
        return num_experts
    return int(not_local[0, 0])


def linear_expert_owner(num_experts: int, ep_size: int) -> torch.Tensor:
    """``[num_experts]`` int32 owner table of vLLM's "linear" placement.

    Contiguous blocks of ``E // P`` experts per rank, the first ``E % P`` ranks
    holding one more (vLLM's ``determine_expert_map``: e.g. 60 experts on 8
    ranks give 8, 8, 8, 8, 7, 7, 7, 7). With ``P`` dividing ``E`` this is
    ``e // (E / P)`` (design §4); EPLB physical ids follow the same rule.
    """
    if ep_size <= 0:
        raise A2AInputError(f"ep_size ({ep_size}) must be positive")
    if num_experts < ep_size:
        raise A2AInputError(
            f"num_experts ({num_experts}) must be at least ep_size ({ep_size}): every EP "
            "rank owns at least one expert"
        )
    base, extra = divmod(num_experts, ep_size)
    counts = torch.tensor([base + (r < extra) for r in range(ep_size)], dtype=torch.int64,
                          device="cpu")
    ranks = torch.arange(ep_size, dtype=torch.int32, device="cpu")
    return torch.repeat_interleave(ranks, counts)


def expert_owner_from_maps(expert_maps: list[torch.Tensor]) -> torch.Tensor:
    """Owner table from every rank's ``expert_map`` (any placement strategy).

    Raises if an expert is owned by no rank or by more than one.
    """
    stacked = torch.stack([m.detach().to("cpu", torch.int64) for m in expert_maps])
    owned = stacked != -1
    counts = owned.sum(dim=0)
    if bool((counts != 1).any()):
        bad = int(torch.nonzero(counts != 1)[0, 0])
        raise A2AInputError(
            f"expert {bad} is owned by {int(counts[bad])} ranks; every expert needs exactly one"
        )
    return owned.to(torch.int8).argmax(dim=0).to(torch.int32)


def padding_ids_for_ranks(expert_owner: torch.Tensor, ep_size: int) -> list[int]:
    """The padding id of every receiving rank, given the owner table.

    Same rule as :func:`padding_expert_id`: the smallest id that rank does not
    own, or ``num_experts`` when it owns them all.
    """
    owner = expert_owner.detach().to("cpu", torch.int64)
    num_experts = owner.numel()
    ids = []
    for rank in range(ep_size):
        foreign = torch.nonzero(owner != rank)
        ids.append(int(foreign[0, 0]) if foreign.numel() else num_experts)
    return ids
