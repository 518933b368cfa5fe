"""The SGLang engine check's pieces that need no GPU: the output conversion
feeds tests/greedy_compare.py, and the counter RPC lands on SGLang's Scheduler."""

from __future__ import annotations

import sys
import types

from tests.greedy_compare import compare_greedy
from vllm_a2a_plugin.testing.sglang_engine_check import _result, install_counter_rpc


def _sglang_output(tokens, chosen_lp, tops):
    # SGLang's meta_info logprob entries: (logprob, token_id, text or None).
    return {"output_ids": tokens, "meta_info": {
        "output_token_logprobs": [(lp, t, None) for lp, t in zip(chosen_lp, tokens)],
        "output_top_logprobs": [[(lp, t, None) for lp, t in top] for top in tops]}}


def test_result_has_chosen_and_top_candidates():
    out = _result("p", _sglang_output([5, 7], [-0.1, -0.2], [[(-0.1, 5), (-2.0, 9)],
                                                          [(-0.2, 7), (-0.22, 3)]]))
    assert out == {"prompt": "p", "tokens": [5, 7],
                   "top_logprobs": [{"5": -0.1, "9": -2.0}, {"7": -0.2, "3": -0.22}]}
    near = _result("p", _sglang_output([5, 3], [-0.12, -1.4], [[(-0.12, 5), (-2.0, 9)],
                                                             [(-1.4, 3), (-1.45, 7)]]))
    # Diverging at a near-tie (gap 0.02 within the bf16 tolerance) passes ...
    assert compare_greedy([near], [out], 0.05)["near_tie_divergences"]
    far = _result("p", _sglang_output([9], [-2.0], [[(-2.0, 9), (-0.1, 5)]]))
    try:
        compare_greedy([far], [{"prompt": "p", "tokens": [5], "top_logprobs": [
            {"5": -0.1, "9": -2.0}]}], 0.05)
    except AssertionError:
        pass
    else:  # ... a clear divergence does not
        raise AssertionError("compare_greedy accepted a divergence of 1.9 nats")


def test_counter_rpc_is_added_to_the_scheduler_when_imported(monkeypatch):
    module = types.ModuleType("sglang.srt.managers.scheduler")
    module.Scheduler = type("Scheduler", (), {})
    monkeypatch.setitem(sys.modules, "sglang.srt.managers.scheduler", module)
    install_counter_rpc()
    assert callable(module.Scheduler.a2a_write_round_counts)
