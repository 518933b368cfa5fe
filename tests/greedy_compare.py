"""Greedy-token comparison of two engine runs (``engine_check`` JSON outputs).

Each output is ``{"prompt": str, "tokens": [int], "top_logprobs": [{str(token):
logprob}]}``: per generated token, the most likely tokens' logprobs and the
chosen one's.
"""

from __future__ import annotations

# Logprob tolerance (nats) between our path and vLLM's own on the same tokens, and
# the largest gap at which a differing greedy token still counts as a near-tie:
# partial sums reduced per EP rank in bf16, then summed in fp32 across ranks, round
# differently from one fp32 sum over all experts (and Triton picks tiles by M).
# fp8 (vLLM's quantization="fp8", dynamic per-tensor activations): each EP rank
# quantises what it received with one scale, the DP=1 reference its whole batch
# with another, so the 3-bit-mantissa rounding itself differs (seen on an H100:
# 0.109 nats at the 8th token of a prompt whose tokens all matched). Where the
# scales' token sets differ by construction (several DP ranks), the fp8 tolerance
# is measured per run instead: see fp8_tolerance.
LOGPROB_TOL = {"bf16": 0.05, "fp8": 0.25}


def compare_greedy(ours: list[dict], reference: list[dict], tol: float,
                   gap_tol: float | None = None) -> dict:
    """Same greedy tokens as the reference, or a near-tie where they part.

    Per prompt: every common token's logprob within ``tol`` of the reference's;
    at the first differing token, ours is among the reference's top candidates
    within ``gap_tol`` (default ``tol``) of the reference's choice (rounding may
    pick either), and the rest of that sequence is not compared (it continues
    from another token). Raises AssertionError naming prompt and position.
    """
    gap_tol = tol if gap_tol is None else gap_tol
    by_prompt = {o["prompt"]: o for o in reference}
    summary = {"prompts": len(ours), "identical": 0, "near_tie_divergences": [],
               "max_logprob_diff": 0.0}
    for mine in ours:
        ref = by_prompt[mine["prompt"]]
        assert len(mine["tokens"]) == len(ref["tokens"]), mine["prompt"]
        for i, (a, b) in enumerate(zip(mine["tokens"], ref["tokens"])):
            ref_top = ref["top_logprobs"][i]
            if a != b:
                assert str(a) in ref_top, (mine["prompt"], i, a, ref_top)
                gap = ref_top[str(b)] - ref_top[str(a)]
                assert gap <= gap_tol, (f"{mine['prompt']!r} token {i}: {a} vs {b}, "
                                        f"gap {gap:.3g} > {gap_tol:.3g}")
                summary["near_tie_divergences"].append(
                    {"prompt": mine["prompt"], "position": i, "gap": gap})
                break
            diff = abs(mine["top_logprobs"][i][str(a)] - ref_top[str(b)])
            summary["max_logprob_diff"] = max(summary["max_logprob_diff"], diff)
            assert diff <= tol, (f"{mine['prompt']!r} token {i}: logprob differs by "
                                 f"{diff:.3g} > {tol:.3g}")
        else:
            summary["identical"] += 1
    return summary


def quantization_noise(quantized: list[dict], unquantized: list[dict]) -> float:
    """How far vLLM's own quantized run moves from its unquantized run, in nats.

    Per prompt, while both chose the same tokens: the largest difference of the
    chosen token's logprob; at the first token where they part: the unquantized
    run's gap between its choice and the quantized run's (or, where that token
    is not among its top candidates, its choice's lead over its weakest listed
    candidate, a lower bound). The largest over all prompts.
    """
    by_prompt = {o["prompt"]: o for o in unquantized}
    noise = 0.0
    for q in quantized:
        u = by_prompt[q["prompt"]]
        for i, (a, b) in enumerate(zip(q["tokens"], u["tokens"])):
            u_top = u["top_logprobs"][i]
            if a != b:
                weakest = min(u_top.values())
                noise = max(noise, u_top[str(b)] - u_top.get(str(a), weakest))
                break
            noise = max(noise, abs(q["top_logprobs"][i][str(a)] - u_top[str(b)]))
    return noise


def fp8_tolerance(noise: float) -> tuple[float, float]:
    """(logprob tolerance, near-tie gap tolerance) for comparing our fp8 run
    with vLLM's fp8 run when the two quantise different token sets.

    ``noise`` is :func:`quantization_noise` of vLLM's fp8 run against its bf16
    run on the same requests: what per-tensor fp8 does to these logprobs. Ours
    carries noise of the same kind against the bf16 values (other scales, same
    format), so by the triangle inequality one token's logprob may differ by up
    to twice that, and a gap between two tokens by up to four times. Never
    below the fixed fp8 tolerance; a wrong expert, weight or dropped token
    moves logprobs by whole nats, far past either.
    """
    base = LOGPROB_TOL["fp8"]
    return max(base, 2 * noise), max(base, 4 * noise)
