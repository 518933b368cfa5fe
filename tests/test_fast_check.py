"""The hot path's cheap input check never accepts what the full check refuses.

``DispatchInputFastCheck.passes`` decides most dispatches with cheap attribute
reads; whenever it says True, :func:`check_dispatch_inputs` must accept the same
arguments, and for every kind of bad input it must say False (the caller then
runs the full check, which raises with its message).
"""

from __future__ import annotations

import pytest
import torch

from vllm_a2a_plugin.errors import A2AInputError
from vllm_a2a_plugin.validation import DispatchInputFastCheck, check_dispatch_inputs
from vllm_a2a_plugin.workspace import AllToAllSpec

SPECS = {
    "bf16": AllToAllSpec(ep_size=2, max_tokens_per_rank=8, hidden_size=256, top_k=4,
                         num_experts=8),
    "fp8_scales": AllToAllSpec(ep_size=2, max_tokens_per_rank=8, hidden_size=256, top_k=4,
                               num_experts=8, dispatch_dtype=torch.float8_e4m3fn, scale_cols=2),
}


def good_inputs(spec: AllToAllSpec, device: str, n: int = 5) -> dict:
    return dict(
        x=torch.zeros((n, spec.hidden_size), dtype=spec.dispatch_dtype, device=device),
        topk_ids=torch.zeros((n, spec.top_k), dtype=torch.int32, device=device),
        topk_weights=torch.zeros((n, spec.top_k), dtype=torch.float32, device=device),
        x_scales=(torch.zeros((n, spec.scale_cols), dtype=torch.float32, device=device)
                  if spec.scale_cols else None),
        extra_payloads=(), runtime_max_tokens=6)


def mutations(spec: AllToAllSpec, ok: dict) -> dict[str, dict]:
    """Inputs that each break one rule of check_dispatch_inputs."""
    n, h, k = ok["x"].shape[0], spec.hidden_size, spec.top_k
    dev = ok["x"].device
    wide = torch.zeros((h, n), dtype=spec.dispatch_dtype, device=dev)
    bad = {
        "x dtype": {"x": ok["x"].float()},
        "x rows": {"x": ok["x"][:-1]},
        "x hidden": {"x": torch.zeros((n, h + 16), dtype=spec.dispatch_dtype, device=dev)},
        "x on cpu": {"x": ok["x"].cpu()},
        "x not contiguous": {"x": wide.t()},
        "ids dtype": {"topk_ids": ok["topk_ids"].long()},
        "ids top-k": {"topk_ids": torch.zeros((n, k + 1), dtype=torch.int32, device=dev)},
        "ids 1-d": {"topk_ids": torch.zeros((n,), dtype=torch.int32, device=dev)},
        "ids on cpu": {"topk_ids": ok["topk_ids"].cpu()},
        "weights dtype": {"topk_weights": ok["topk_weights"].half()},
        "weights shape": {"topk_weights": ok["topk_weights"][:, :-1]},
        "weights on cpu": {"topk_weights": ok["topk_weights"].cpu()},
        "M below T": {"runtime_max_tokens": n - 1},
        "M above capacity": {"runtime_max_tokens": spec.max_tokens_per_rank + 1},
        "unexpected extra payload": {"extra_payloads": (ok["x"],)},
    }
    if spec.scale_cols:
        bad["scales missing"] = {"x_scales": None}
        bad["scales shape"] = {"x_scales": torch.zeros((n, spec.scale_cols + 1), device=dev)}
        bad["scales dtype"] = {"x_scales": ok["x_scales"].double()}
        bad["scales on cpu"] = {"x_scales": ok["x_scales"].cpu()}
    else:
        bad["scales given"] = {"x_scales": torch.zeros((n, 2), device=dev)}
    return bad


def fast(spec: AllToAllSpec, device: torch.device, args: dict) -> bool:
    return DispatchInputFastCheck(spec, device).passes(
        args["x"], args["topk_ids"], args["topk_weights"], args["x_scales"],
        args["extra_payloads"], args["runtime_max_tokens"])


@pytest.mark.parametrize("name", sorted(SPECS))
def test_cpu_tensors_go_to_the_full_check(name):
    """Without CUDA tensors the fast form never decides (and never raises)."""
    spec = SPECS[name]
    ok = good_inputs(spec, "cpu")
    assert not fast(spec, torch.device("cuda", 0), ok)
    assert not fast(spec, torch.device("cpu"), ok)
    check_dispatch_inputs(spec, device=torch.device("cpu"), **ok)  # the full check accepts


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(SPECS))
def test_fast_check_agrees_with_the_full_check(name):
    spec = SPECS[name]
    device = torch.device("cuda", 0)
    ok = good_inputs(spec, "cuda")
    assert fast(spec, device, ok)
    assert check_dispatch_inputs(spec, device=device, **ok) == 5
    assert fast(spec, device, {**ok, "topk_weights": None})
    empty = good_inputs(spec, "cuda", n=0)
    assert fast(spec, device, empty)
    for what, change in mutations(spec, ok).items():
        args = {**ok, **change}
        assert not fast(spec, device, args), f"fast check accepted: {what}"
        with pytest.raises(A2AInputError):
            check_dispatch_inputs(spec, device=device, **args)
    # A tensor subclass (here nn.Parameter) is left to the full check, which accepts it.
    sub = {**ok, "x": torch.nn.Parameter(ok["x"], requires_grad=False)}
    assert sub["x"].__class__ is not torch.Tensor
    assert not fast(spec, device, sub)
    check_dispatch_inputs(spec, device=device, **sub)
