"""CPU tests: the reference semantics, input validation, the C++ workspace layout,
and the reference all-to-all across gloo ranks."""

from __future__ import annotations

import pytest
import torch

from tests.data import random_hidden, random_token_counts, random_topk_ids, random_weights
from tests.multiproc import run_ranks
from vllm_a2a_plugin import A2AConfig, AllToAllSpec, ops
from vllm_a2a_plugin.all_to_all import error_from_record
from vllm_a2a_plugin.errors import A2AInputError, A2AMismatchError, A2ATimeoutError
from vllm_a2a_plugin.padding import linear_expert_owner
from vllm_a2a_plugin.reference import (combine_reference, dense_moe_reference, dispatch_reference,
                                       experts_reference)
from vllm_a2a_plugin.validation import check_dispatch_inputs, check_expert_ids_in_range
from vllm_a2a_plugin.workspace import WorkspaceLayout, kernel_limits


def expert_fn(e: int, x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x * (1 + 0.1 * e)) + 0.01 * e


@pytest.mark.parametrize("p,k,e", [(1, 2, 4), (2, 1, 4), (4, 3, 16), (8, 8, 64), (4, 16, 32)])
def test_reference_round_trip_equals_dense_moe(p, k, e):
    gen = torch.Generator().manual_seed(p * 100 + k)
    counts = random_token_counts(gen, p, 12, zero_ranks=1 if p > 1 else 0)
    ids = [random_topk_ids(gen, n, k, e) for n in counts]
    xs = [random_hidden(gen, n, 32, torch.float32) for n in counts]
    ws = [random_weights(gen, n, k) for n in counts]
    owner = linear_expert_owner(e, p)
    recv = dispatch_reference(xs=xs, topk_ids=ids, topk_weights=ws, expert_owner=owner)
    per_rank = e // p
    for r, got in enumerate(recv):
        assert got.padding_id != -1
        foreign = owner[got.recv_topk_ids.clamp(max=e - 1).long()] != r
        # every id is local, or the padding id with weight 0
        assert bool(((got.recv_topk_ids == got.padding_id) | ~foreign).all())
        assert bool((got.recv_topk_weights[got.recv_topk_ids == got.padding_id] == 0).all())
    ys = [experts_reference(got, expert_fn, local_experts=range(r * per_rank, (r + 1) * per_rank),
                            out_dtype=torch.float32) for r, got in enumerate(recv)]
    outs = combine_reference(ys=ys, topk_ids=ids, expert_owner=owner,
                             runtime_max_tokens=recv[0].runtime_max_tokens)
    for r in range(p):
        dense = dense_moe_reference(xs[r], ids[r], ws[r], expert_fn)
        torch.testing.assert_close(outs[r], dense, rtol=1e-5, atol=1e-5)


def test_valid_slots_are_exactly_the_routed_tokens():
    owner = linear_expert_owner(4, 2)  # rank 0: experts 0,1; rank 1: experts 2,3
    ids = [torch.tensor([[0, 1], [2, 3], [1, 2]], dtype=torch.int32),
           torch.zeros((0, 2), dtype=torch.int32)]
    xs = [torch.arange(3.0).repeat_interleave(4).view(3, 4), torch.zeros(0, 4)]
    recv = dispatch_reference(xs=xs, topk_ids=ids, expert_owner=owner)
    assert recv[0].runtime_max_tokens == 3
    assert recv[0].valid.tolist() == [True, False, True, False, False, False]
    assert recv[1].valid.tolist() == [False, True, True, False, False, False]
    assert recv[0].recv_topk_ids[:3].tolist() == [[0, 1], [2, 2], [1, 2]]  # pad id 2 on rank 0
    assert recv[1].recv_topk_ids[:3].tolist() == [[0, 0], [2, 3], [0, 2]]  # pad id 0 on rank 1
    assert recv[1].recv_x[2].tolist() == [2.0] * 4


def test_spec_validation_messages():
    base = dict(ep_size=4, max_tokens_per_rank=8, hidden_size=128, top_k=2, num_experts=8)
    with pytest.raises(A2AInputError, match=r"top_k \(17\) must be in \[1, 16\]"):
        AllToAllSpec(**{**base, "top_k": 17})
    with pytest.raises(A2AInputError, match=r"ep_size \(65\) must be in \[1, 64\]"):
        AllToAllSpec(**{**base, "ep_size": 65})
    with pytest.raises(A2AInputError, match=r"num_experts \(5000\) must be in \[1, 4096\]"):
        AllToAllSpec(**{**base, "num_experts": 5000})
    with pytest.raises(A2AInputError, match="a token of hidden states is 20 bytes .hidden_size 10.; "
                                            "rows must be a multiple of 16 bytes"):
        AllToAllSpec(**{**base, "hidden_size": 10})
    with pytest.raises(A2AInputError, match="dispatch_dtype must be one of"):
        AllToAllSpec(**{**base, "dispatch_dtype": torch.int8})
    with pytest.raises(A2AInputError, match="9 payloads exceed the limit of 8"):
        AllToAllSpec(**{**base, "scale_cols": 1, "extra_payload_row_bytes": (4,) * 7})
    with pytest.raises(A2AInputError, match="threads_per_block .100. must be a multiple of 32"):
        A2AConfig(threads_per_block=100)


def test_dispatch_input_validation_messages():
    spec = AllToAllSpec(ep_size=2, max_tokens_per_rank=4, hidden_size=64, top_k=2, num_experts=4,
                        scale_cols=0)
    ids = torch.zeros((3, 2), dtype=torch.int32)
    x = torch.zeros((3, 64), dtype=torch.bfloat16)
    ok = dict(x=x, topk_ids=ids, topk_weights=None, x_scales=None, extra_payloads=(),
              runtime_max_tokens=4, device=None)
    assert check_dispatch_inputs(spec, **ok) == 3
    with pytest.raises(A2AInputError, match=r"topk_ids must have shape \[\*, 2\], got \[3, 3\]"):
        check_dispatch_inputs(spec, **{**ok, "topk_ids": torch.zeros((3, 3), dtype=torch.int32)})
    with pytest.raises(A2AInputError, match=r"x must have shape \[3, 64\], got \[3, 32\]"):
        check_dispatch_inputs(spec, **{**ok, "x": torch.zeros((3, 32), dtype=torch.bfloat16)})
    with pytest.raises(A2AInputError, match="topk_weights must be torch.float32, got torch.float16"):
        check_dispatch_inputs(spec, **{**ok, "topk_weights": torch.zeros((3, 2), dtype=torch.half)})
    with pytest.raises(A2AInputError, match="x_scales was given but the workspace has no scale"):
        check_dispatch_inputs(spec, **{**ok, "x_scales": torch.zeros((3, 1))})
    with pytest.raises(A2AInputError, match=r"runtime_max_tokens \(5\) exceeds the workspace's "
                                            r"max_tokens_per_rank \(4\)"):
        check_dispatch_inputs(spec, **{**ok, "runtime_max_tokens": 5})
    with pytest.raises(A2AInputError, match=r"topk_ids\[2, 0\] = -3 is out of range: expert ids "
                                            r"must be in \[0, 4\)"):
        check_expert_ids_in_range(torch.tensor([[0, 1], [2, 3], [-3, 0]], dtype=torch.int32), 4)


def test_workspace_layout_from_cpp():
    spec = AllToAllSpec(ep_size=8, max_tokens_per_rank=100, hidden_size=7168, top_k=8,
                        num_experts=256, dispatch_dtype=torch.float8_e4m3fn, scale_cols=56,
                        extra_payload_row_bytes=(12,))
    layout = WorkspaceLayout.for_spec(spec)
    header = ops.header_field_offsets()
    slots = 8 * 100
    regions = [(layout.header, header["header_bytes"]),
               (layout.recv_topk_ids, slots * 8 * 4), (layout.recv_topk_weights, slots * 8 * 4),
               *[(off, slots * row) for off, row in zip(layout.payloads, spec.payload_row_bytes)],
               (layout.combine, slots * 7168 * 2)]
    assert spec.payload_row_bytes == (7168, 224, 12)
    for (start, size), (next_start, _) in zip(regions, regions[1:]):
        assert start % 128 == 0 and start + size <= next_start, "regions overlap or misalign"
    last_start, last_size = regions[-1]
    assert layout.total_bytes == -(-(last_start + last_size) // 128) * 128
    assert header["dispatch_flags"] == 0 and header["combine_flags"] == 64 * 4
    assert ops.limits() == kernel_limits()


def test_device_error_messages_name_rank_peer_and_phase():
    err = error_from_record([1, 3, 5, 1, 42, 41, 0, 0], timeout_s=2.0)
    assert isinstance(err, A2ATimeoutError) and (err.rank, err.peer, err.phase) == (3, 5, "combine")
    assert str(err).startswith("a2a_one_sided: rank 3 timed out after 2 s in combine waiting for "
                               "peer 5 (epoch 42")
    err = error_from_record([2, 0, 1, 0, 7, 32, 16, 0], timeout_s=2.0)
    assert isinstance(err, A2AMismatchError)
    assert "rank 0 used runtime_max_tokens=16 in dispatch but peer 1 used 32" in str(err)


def _reference_ranks(rank, world_size, port, counts):
    import torch.distributed as dist

    from vllm_a2a_plugin.reference import ReferenceAllToAll

    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    spec = AllToAllSpec(ep_size=world_size, max_tokens_per_rank=16, hidden_size=32, top_k=2,
                        num_experts=6, dispatch_dtype=torch.bfloat16, scale_cols=0,
                        extra_payload_row_bytes=(8,))
    a2a = ReferenceAllToAll(spec, dist.group.WORLD)
    owner = linear_expert_owner(6, world_size)
    for step in range(2):
        gen = torch.Generator().manual_seed(step)
        ids = [random_topk_ids(gen, n, 2, 6) for n in counts]
        xs = [random_hidden(gen, n, 32, torch.bfloat16) for n in counts]
        ws = [random_weights(gen, n, 2) for n in counts]
        extra = [(torch.randint(0, 255, (n, 8), generator=gen, dtype=torch.uint8),) for n in counts]
        expected = dispatch_reference(xs=xs, topk_ids=ids, topk_weights=ws, extra_payloads=extra,
                                      expert_owner=owner, runtime_max_tokens=16)[rank]
        got = a2a.dispatch(xs[rank], ids[rank], ws[rank], extra_payloads=extra[rank],
                           runtime_max_tokens=16)
        assert torch.equal(got.recv_topk_ids, expected.recv_topk_ids)
        assert torch.equal(got.recv_x[expected.valid], expected.recv_x[expected.valid])
        assert torch.equal(got.recv_extra[0][expected.valid], expected.recv_extra[0][expected.valid])
        y = (got.recv_x.float() * (rank + 1)).to(torch.bfloat16)
        out = a2a.combine(y)
        ys = [(dispatch_reference(xs=xs, topk_ids=ids, expert_owner=owner,
                                  runtime_max_tokens=16)[r].recv_x.float() * (r + 1)
               ).to(torch.bfloat16) for r in range(world_size)]
        ref = combine_reference(ys=ys, topk_ids=ids, expert_owner=owner, runtime_max_tokens=16)
        torch.testing.assert_close(out, ref[rank], rtol=0, atol=0)


def test_reference_all_to_all_over_gloo_with_an_empty_rank():
    run_ranks(_reference_ranks, 3, [4, 0, 9])


def test_no_expert_slots_go_nowhere():
    """-1 (vLLM's id for padding tokens' slots) sends the slot to no rank and adds
    nothing in combine; a token whose every slot is -1 combines to zeros."""
    from vllm_a2a_plugin.reference import combine_reference, dispatch_reference
    from vllm_a2a_plugin.validation import check_expert_ids_in_range

    owner = torch.tensor([0, 0, 1, 1], dtype=torch.int32)
    ids = [torch.tensor([[0, -1], [-1, -1], [2, 3]], dtype=torch.int32),
           torch.zeros((0, 2), dtype=torch.int32)]
    check_expert_ids_in_range(ids[0], 4)  # -1 is allowed
    xs = [torch.arange(3 * 16, dtype=torch.float32).reshape(3, 16).bfloat16(),
          torch.zeros((0, 16), dtype=torch.bfloat16)]
    ws = [torch.ones((3, 2), dtype=torch.float32), torch.zeros((0, 2), dtype=torch.float32)]
    recv = dispatch_reference(xs=xs, topk_ids=ids, topk_weights=ws, expert_owner=owner)
    assert recv[0].valid.tolist() == [True, False, False, False, False, False]
    assert recv[1].valid.tolist() == [False, False, True, False, False, False]
    assert recv[0].recv_topk_ids[:3].tolist() == [[0, 2], [2, 2], [2, 2]]  # pad id 2 on rank 0
    assert recv[0].recv_topk_weights[:3].tolist() == [[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]
    ys = [torch.ones((6, 16), dtype=torch.bfloat16), 2 * torch.ones((6, 16), dtype=torch.bfloat16)]
    out = combine_reference(ys=ys, topk_ids=ids, expert_owner=owner, runtime_max_tokens=3)[0]
    assert out[:, 0].tolist() == [1.0, 0.0, 2.0]
    with pytest.raises(A2AInputError, match=r"= -2 is out of range.*or -1 for a slot"):
        check_expert_ids_in_range(torch.tensor([[1, -2]], dtype=torch.int32), 4)
