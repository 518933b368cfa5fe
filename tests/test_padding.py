"""padding_expert_id: a valid expert id owned by another EP rank, never -1 (seed 002)."""

from __future__ import annotations

import pytest
import torch

from vllm_a2a_plugin import padding_expert_id
from vllm_a2a_plugin.errors import A2AInputError
from vllm_a2a_plugin.padding import (expert_owner_from_maps, linear_expert_owner,
                                     padding_ids_for_ranks)


def linear_map(num_experts: int, ep_size: int, rank: int) -> torch.Tensor:
    per_rank = num_experts // ep_size
    m = torch.full((num_experts,), -1, dtype=torch.int32)
    m[rank * per_rank:(rank + 1) * per_rank] = torch.arange(per_rank, dtype=torch.int32)
    return m


def test_last_entry_local_is_the_seed_002_trap():
    # The last rank owns the last expert: expert_map[-1] is a *local* id, so a
    # -1 padding id would silently route padded slots to local expert 3.
    m = linear_map(16, 4, rank=3)
    assert int(m[-1]) == 3
    pad = padding_expert_id(m, 16)
    assert pad == 0 and int(m[pad]) == -1


@pytest.mark.parametrize("rank", range(4))
def test_every_rank_pads_with_a_foreign_expert(rank):
    m = linear_map(32, 4, rank)
    pad = padding_expert_id(m, 32)
    assert 0 <= pad < 32 and int(m[pad]) == -1
    assert pad == (8 if rank == 0 else 0)


def test_eplb_redundant_physical_experts():
    # 6 logical experts + 2 redundant = 8 physical slots over 2 ranks; rank 0
    # holds physical ids 0..3 (two of them replicas). Padding must be a
    # physical id rank 0 does not hold.
    m = torch.tensor([0, 1, 2, 3, -1, -1, -1, -1], dtype=torch.int64)
    assert padding_expert_id(m, 8) == 4
    m1 = torch.tensor([-1, -1, -1, -1, 0, 1, 2, 3])
    assert padding_expert_id(m1, 8) == 0


def test_no_map_uses_out_of_range_id():
    assert padding_expert_id(None, 64) == 64


def test_single_ep_rank_owns_everything():
    m = torch.arange(8, dtype=torch.int32)
    assert padding_expert_id(m, 8) == 8  # nothing foreign: out of range, skipped


def test_never_minus_one_on_random_maps():
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        e = int(torch.randint(1, 64, (1,), generator=gen))
        m = torch.where(torch.rand(e, generator=gen) < 0.5, torch.arange(e), torch.tensor(-1))
        pad = padding_expert_id(m, e)
        assert pad != -1
        assert pad == e or int(m[pad]) == -1


def test_bad_maps_are_rejected():
    with pytest.raises(A2AInputError, match="1-D with num_experts .8. entries"):
        padding_expert_id(torch.zeros(4, dtype=torch.int32), 8)
    with pytest.raises(A2AInputError, match="must hold integers"):
        padding_expert_id(torch.zeros(8), 8)


def test_owner_tables_and_padding_ids_agree_with_maps():
    owner = linear_expert_owner(16, 4)
    assert owner.tolist() == [r for r in range(4) for _ in range(4)]
    maps = [linear_map(16, 4, r) for r in range(4)]
    assert torch.equal(expert_owner_from_maps(maps), owner)
    assert padding_ids_for_ranks(owner, 4) == [padding_expert_id(m, 16) for m in maps]
    with pytest.raises(A2AInputError, match=r"num_experts \(3\) must be at least ep_size \(4\)"):
        linear_expert_owner(3, 4)
    with pytest.raises(A2AInputError, match="owned by 2 ranks"):
        expert_owner_from_maps([torch.tensor([0, -1]), torch.tensor([0, 0])])


@pytest.mark.parametrize("experts,ranks", [(10, 4), (60, 8), (256, 6), (7, 7), (9, 2)])
def test_uneven_linear_placement_gives_the_first_ranks_one_more(experts, ranks):
    owner = linear_expert_owner(experts, ranks)
    counts = torch.bincount(owner.to(torch.int64), minlength=ranks).tolist()
    base, extra = divmod(experts, ranks)
    assert counts == [base + 1] * extra + [base] * (ranks - extra)
    assert torch.equal(owner, owner.sort().values)  # contiguous blocks
    pads = padding_ids_for_ranks(owner, ranks)
    assert all(int(owner[p]) != r for r, p in enumerate(pads))
