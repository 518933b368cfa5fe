"""The engine tests' greedy comparison and fp8 tolerance, on made-up runs (CPU)."""

from __future__ import annotations

import pytest

from tests.greedy_compare import (LOGPROB_TOL, compare_greedy, fp8_tolerance,
                                  quantization_noise)


def run(prompt: str, steps: list[tuple[int, dict[int, float]]]) -> dict:
    """One engine output: per step (chosen token, {token: logprob})."""
    return {"prompt": prompt, "tokens": [token for token, _ in steps],
            "top_logprobs": [{str(t): lp for t, lp in top.items()} for _, top in steps]}


REFERENCE = [run("p", [(1, {1: -1.0, 2: -1.3}), (3, {3: -2.0, 4: -2.1}), (5, {5: -0.5})])]


def test_identical_runs_compare_identical():
    summary = compare_greedy(REFERENCE, REFERENCE, LOGPROB_TOL["bf16"])
    assert summary["identical"] == 1 and summary["max_logprob_diff"] == 0.0


def test_a_near_tie_within_the_gap_tolerance_counts_as_one_and_stops_the_prompt():
    ours = [run("p", [(1, {1: -1.02}), (4, {4: -2.05}), (9, {9: -7.0})])]
    summary = compare_greedy(ours, REFERENCE, 0.05, gap_tol=0.15)
    assert summary["identical"] == 0
    assert summary["near_tie_divergences"] == [
        {"prompt": "p", "position": 1, "gap": pytest.approx(0.1)}]
    with pytest.raises(AssertionError, match=r"'p' token 1: 4 vs 3, gap 0.1 > 0.05"):
        compare_greedy(ours, REFERENCE, 0.05)


def test_a_logprob_past_the_tolerance_fails_naming_the_token():
    ours = [run("p", [(1, {1: -1.0}), (3, {3: -2.3}), (5, {5: -0.5})])]
    with pytest.raises(AssertionError, match=r"'p' token 1: logprob differs by 0.3 > 0.25"):
        compare_greedy(ours, REFERENCE, LOGPROB_TOL["fp8"])


def test_a_token_outside_the_reference_candidates_fails():
    ours = [run("p", [(7, {7: -0.9}), (3, {3: -2.0}), (5, {5: -0.5})])]
    with pytest.raises(AssertionError):
        compare_greedy(ours, REFERENCE, 10.0)


def test_quantization_noise_reads_matched_logprobs_and_the_first_parting_gap():
    bf16 = [run("p", [(1, {1: -1.0, 2: -1.3}), (3, {3: -2.0, 4: -2.4}), (5, {5: -0.5})]),
            run("q", [(8, {8: -1.0, 9: -1.5})])]
    fp8 = [run("p", [(1, {1: -1.08}), (4, {4: -2.1}), (5, {5: -9.0})]),
           run("q", [(8, {8: -1.03})])]
    # p: 0.08 at token 0, then parts at token 1 with bf16's gap 0.4 (token 2 unread).
    assert quantization_noise(fp8, bf16) == pytest.approx(0.4)
    assert quantization_noise(bf16, bf16) == 0.0


def test_quantization_noise_bounds_a_parting_token_outside_the_candidates_from_below():
    bf16 = [run("p", [(1, {1: -1.0, 2: -1.6})])]
    fp8 = [run("p", [(7, {7: -1.1})])]
    assert quantization_noise(fp8, bf16) == pytest.approx(0.6)


def test_fp8_tolerance_never_drops_below_the_fixed_one_and_scales_with_the_noise():
    assert fp8_tolerance(0.0) == (LOGPROB_TOL["fp8"], LOGPROB_TOL["fp8"])
    assert fp8_tolerance(0.1) == (0.25, pytest.approx(0.4))
    assert fp8_tolerance(0.2) == (pytest.approx(0.4), pytest.approx(0.8))
