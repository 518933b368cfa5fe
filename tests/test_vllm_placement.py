"""Our owner table follows vLLM's own expert placement, even when EP does not
divide the expert count (vLLM puts E % EP extra experts on the first ranks)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm", reason="needs vLLM installed")


@pytest.mark.parametrize("experts,ranks", [(8, 2), (60, 8), (256, 6), (10, 4), (384, 64)])
def test_owner_table_matches_vllm_determine_expert_map(experts, ranks):
    from vllm.model_executor.layers.fused_moe.expert_map_manager import determine_expert_map

    from vllm_a2a_plugin.padding import (expert_owner_from_maps, linear_expert_owner,
                                         padding_expert_id, padding_ids_for_ranks)
    from vllm_a2a_plugin.vllm.prepare_finalize import vllm_expert_owner

    maps = [determine_expert_map(ranks, r, experts, "linear")[1] for r in range(ranks)]
    owner = vllm_expert_owner(experts, ranks)
    assert torch.equal(owner, expert_owner_from_maps(maps))
    assert torch.equal(owner, linear_expert_owner(experts, ranks))
    assert padding_ids_for_ranks(owner, ranks) == [padding_expert_id(m, experts) for m in maps]
