"""The soak's generator and vectorized checker on CPU, against the host reference.

The soak (``benchmarks/soak.py``) checks a million GPU rounds with the batched
torch reference of ``benchmarks/soak_reference.py``; these tests hold that
checker to :mod:`vllm_a2a_plugin.reference` over the soak's own case
distribution, show it catches every kind of wrong answer, and run the soak's
round loop end to end on CPU (the reference standing in for the kernels).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random

import pytest
import torch

from benchmarks import soak
from benchmarks.soak_reference import (EP_SIZES, KINDS, Checker, ReferenceRanks, SoakCase,
                                       generate_round, random_case, random_counts,
                                       random_runtime_max)

CPU = torch.device("cpu")


def _reference_round(case: SoakCase, inputs):
    """reference.py's answer for a round: every rank's dispatch results and [P, M, H] outputs."""
    ranks = ReferenceRanks(case)
    results = ranks.dispatch(inputs.per_rank(inputs.x), inputs.per_rank(inputs.topk_ids),
                             inputs.per_rank(inputs.topk_weights),
                             x_scales=inputs.per_rank(inputs.x_scales),
                             runtime_max_tokens=inputs.runtime_max_tokens)
    outputs = torch.zeros((case.ep_size, inputs.runtime_max_tokens, case.hidden),
                          dtype=case.combine_dtype, device=CPU)
    ranks.combine(list(inputs.y), outs=inputs.per_rank(outputs))
    return results, outputs


def _count(checker: Checker, results, outputs, inputs) -> dict[str, int]:
    expected = checker.expected_dispatch(inputs)
    total = (checker.dispatch_mismatches(results, inputs, expected)
             + checker.combine_mismatches(outputs, inputs, expected))
    return dict(zip(KINDS, total.tolist()))


def _cases(n: int, seed: int) -> list[SoakCase]:
    rng = random.Random(seed)
    cases = [random_case(rng, ep_size=EP_SIZES[i % len(EP_SIZES)]) for i in range(n)]
    dtypes = ("bf16", "fp16", "fp8")
    return [dataclasses.replace(c, dtype=dtypes[i % 3]) for i, c in enumerate(cases)]


@pytest.mark.parametrize("case", _cases(30, seed=1), ids=lambda c: (
    f"P{c.ep_size}-{c.dtype}-k{c.top_k}-E{c.num_experts}-H{c.hidden}"))
def test_checker_agrees_with_reference(case):
    """On the soak's own cases the vectorized expectation equals reference.py's."""
    rng = random.Random(case.top_k * 131 + case.ep_size)
    torch.manual_seed(case.num_experts)
    checker = Checker(case, CPU)
    for _ in range(3):
        counts = random_counts(rng, case.ep_size, case.capacity)
        m = random_runtime_max(rng, counts, case.capacity)
        inputs = generate_round(case, counts, m, CPU)
        results, outputs = _reference_round(case, inputs)
        expected = checker.expected_dispatch(inputs)
        p = case.ep_size
        for r, res in enumerate(results):
            assert torch.equal(res.recv_topk_ids.view(p, m, case.top_k), expected.topk_ids[r])
            assert torch.equal(res.recv_topk_weights.view(p, m, case.top_k), expected.topk_weights[r])
            assert torch.equal(res.valid.view(p, m), expected.slot_valid[r])
        want = checker.expected_combine(inputs, expected)
        for s, n in enumerate(counts):
            assert torch.equal(want[s, :n].view(torch.int16), outputs[s, :n].view(torch.int16))
        assert _count(checker, results, outputs, inputs) == dict.fromkeys(KINDS, 0)


def _one_round(seed: int = 3, dtype: str = "fp8"):
    case = SoakCase(ep_size=3, capacity=6, hidden=256, top_k=4, num_experts=12, dtype=dtype,
                    owner=(0, 1, 2, 0, 1, 2, 2, 2, 1, 0, 0, 1), mode="split")
    torch.manual_seed(seed)
    inputs = generate_round(case, [5, 0, 6], 6, CPU)
    results, outputs = _reference_round(case, inputs)
    checker = Checker(case, CPU)
    assert _count(checker, results, outputs, inputs) == dict.fromkeys(KINDS, 0)
    return case, checker, inputs, results, outputs


def test_checker_catches_every_kind_of_wrong_answer():
    case, checker, inputs, results, outputs = _one_round()
    slot_valid = checker.expected_dispatch(inputs).slot_valid  # [P(r), P(s), M]
    r, s, t = (int(v) for v in torch.nonzero(slot_valid)[0])
    slot = s * inputs.runtime_max_tokens + t

    def count_with(mutate) -> dict[str, int]:
        got = [dataclasses.replace(res, recv_x=res.recv_x.clone(),
                                   recv_x_scales=res.recv_x_scales.clone(),
                                   recv_topk_ids=res.recv_topk_ids.clone(),
                                   recv_topk_weights=res.recv_topk_weights.clone())
               for res in results]
        outs = outputs.clone()
        mutate(got, outs)
        return _count(checker, got, outs, inputs)

    def flip_x_bit(got, outs):
        got[r].recv_x.view(torch.uint8)[slot, 7] ^= 1

    def wrong_id(got, outs):
        got[r].recv_topk_ids[slot, 0] += 1

    def negative_zero_weight(got, outs):  # same value, other bits: still wrong
        w = got[r].recv_topk_weights
        w[w == 0] = -0.0

    def scale_nan(got, outs):
        got[r].recv_x_scales[slot, 0] = float("nan")

    def combine_off_by_one_ulp(got, outs):
        outs.view(torch.int16)[0, 0, 0] += 1

    def combine_nan(got, outs):
        outs[0, 1, 3] = float("nan")

    assert count_with(flip_x_bit)["recv_x"] == 1
    assert count_with(wrong_id)["recv_topk_ids"] == 1
    assert count_with(negative_zero_weight)["recv_topk_weights"] > 0
    assert count_with(scale_nan)["recv_x_scales"] == 1
    assert count_with(combine_off_by_one_ulp)["combine"] == 1
    assert count_with(combine_nan)["combine"] == 1


def test_checker_ignores_what_the_contract_leaves_unspecified():
    """Payload rows of empty slots and output rows beyond a rank's count are free."""
    case, checker, inputs, results, outputs = _one_round(dtype="bf16")
    slot_valid = checker.expected_dispatch(inputs).slot_valid
    r, s, t = (int(v) for v in torch.nonzero(~slot_valid)[0])
    results[r].recv_x[s * inputs.runtime_max_tokens + t].fill_(123.0)
    outputs[1].fill_(7.0)  # rank 1 sent no tokens
    assert _count(checker, results, outputs, inputs) == dict.fromkeys(KINDS, 0)


def test_checker_treats_out_of_range_ids_as_skipped_slots():
    """What the kernels do with a bad id when the host check is off."""
    case = SoakCase(ep_size=2, capacity=3, hidden=128, top_k=2, num_experts=4, dtype="bf16",
                    owner=(0, 0, 1, 1), mode="split")
    torch.manual_seed(0)
    inputs = generate_round(case, [3, 1], 3, CPU)
    inputs.topk_ids[0] = torch.tensor([[0, 2], [3, -1], [-1, 9]], dtype=torch.int32)
    inputs.topk_ids[1, 0] = torch.tensor([1, 0], dtype=torch.int32)
    checker = Checker(case, CPU)
    exp = checker.expected_dispatch(inputs)
    pads = checker.padding_ids  # rank 0 pads with 2, rank 1 with 0
    assert pads == [2, 0]
    # Token 1 of rank 0: slot 0 (expert 3) reaches rank 1; the -1 slot reaches no one.
    assert exp.topk_ids[1, 0, 1].tolist() == [3, pads[1]]
    assert exp.topk_ids[0, 0, 1].tolist() == [pads[0], pads[0]]
    assert exp.topk_weights[1, 0, 1, 1] == 0
    assert exp.slot_valid[:, 0, 1].tolist() == [False, True]
    # Token 2 has no valid slot: no rank receives it and it combines to zeros.
    assert exp.slot_valid[:, 0, 2].tolist() == [False, False]
    out = checker.expected_combine(inputs, exp)
    assert torch.equal(out[0, 2], torch.zeros(128, dtype=torch.bfloat16))
    y1 = inputs.y[1].view(2, 3, 128)
    assert torch.equal(out[0, 1], y1[0, 1])


def _soak_args(tmp_path, **changes) -> argparse.Namespace:
    args = soak.parse_args(["--out", str(tmp_path / "soak.json"), "--device", "cpu",
                            "--rounds", "120", "--minutes", "2", "--eager-rounds", "6"])
    for key, value in changes.items():
        setattr(args, key, value)
    return args


def test_soak_loop_on_cpu_against_reference(tmp_path):
    """The soak's loop and generator end to end, the host reference as the kernels."""
    doc = soak.run_soak(_soak_args(tmp_path))
    assert doc["passed"], doc["failures"]
    assert doc["rounds"] >= 120 and doc["mismatches"] == 0
    assert set(doc["per_config"]["ep_size"]) == {str(p) for p in EP_SIZES}
    assert set(doc["per_config"]["dtype"]) == {"bf16", "fp16", "fp8"}
    assert doc["any_rank_zero_rounds"] > 0
    written = json.loads((tmp_path / "soak.json").read_text())
    assert written["rounds"] == doc["rounds"] and written["commit"]


@pytest.mark.parametrize("fault,kind", [("drop_token", "recv_x"),
                                        ("stale_ids", "recv_topk_ids"),
                                        ("sum_in_bf16", "combine")])
def test_soak_fails_on_a_faulty_all_to_all(tmp_path, monkeypatch, fault, kind):
    """A backend with one subtle bug makes the soak report mismatches and fail."""

    class Faulty(ReferenceRanks):
        def dispatch(self, xs, topk_ids, topk_weights=None, *, x_scales=None,
                     runtime_max_tokens=None):
            results = super().dispatch(xs, topk_ids, topk_weights, x_scales=x_scales,
                                       runtime_max_tokens=runtime_max_tokens)
            for res in results:
                real = torch.nonzero(res.valid)
                if fault == "drop_token" and len(real):
                    res.recv_x[int(real[-1])] = 0  # the last received token never arrived
                if fault == "stale_ids" and len(real):
                    res.recv_topk_ids[int(real[0])] = res.padding_id
            return results

        def combine(self, ys, outs):
            outs = super().combine(ys, outs)
            if fault == "sum_in_bf16":  # rounding each partial sum: off by an ulp somewhere
                for out in outs:
                    out.add_(out * 2 ** -7)
            return outs

    monkeypatch.setattr(soak, "make_ranks", lambda case, device, timeout_s: Faulty(case))
    doc = soak.run_soak(_soak_args(tmp_path, rounds=40))
    assert not doc["passed"]
    assert doc["mismatches_by_kind"][kind] > 0
    assert doc["failures"] and "mismatches" in doc["failures"][0]
