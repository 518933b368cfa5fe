"""Bad dispatch / combine arguments are refused before any launch, with a message.

Two guards check each call's arguments: the Python check
(:func:`check_dispatch_inputs`, messages that name the argument) and the planned
C++ ops (``dispatch_planned`` / ``combine_planned``), which check plain CUDA
tensors against their launch plan before they launch. ``OneSidedAllToAll``
leaves plain CUDA tensors to the op alone (the hot path: no Python check,
it sets the eager host time) and runs the Python check when the op refused, to
raise with its message. So the op must refuse everything the Python check
refuses: each rule broken in :func:`mutations` is tried against both.
"""

from __future__ import annotations

import pytest
import torch

from vllm_a2a_plugin.errors import A2AInputError
from vllm_a2a_plugin.validation import check_dispatch_inputs
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
    """Inputs that each break one rule of check_dispatch_inputs (on a CUDA device)."""
    n, h, k = ok["x"].shape[0], spec.hidden_size, spec.top_k
    dev = ok["x"].device
    wide = torch.zeros((h, n), dtype=spec.dispatch_dtype, device=dev)
    bad = {
        "x dtype": {"x": ok["x"].float()},
        "x same bytes, other dtype": {"x": torch.zeros((n, h * ok["x"].element_size() // 4),
                                                       dtype=torch.float32, device=dev)},
        "x rows": {"x": ok["x"][:-1]},
        "x hidden": {"x": torch.zeros((n, h + 16), dtype=spec.dispatch_dtype, device=dev)},
        "x 3-d, same bytes": {"x": ok["x"].view(n, h // 2, 2)},
        "x on cpu": {"x": ok["x"].cpu()},
        "x not contiguous": {"x": wide.t()},
        "ids dtype": {"topk_ids": ok["topk_ids"].long()},
        "ids top-k": {"topk_ids": torch.zeros((n, k + 1), dtype=torch.int32, device=dev)},
        "ids 1-d": {"topk_ids": torch.zeros((n,), dtype=torch.int32, device=dev)},
        "ids on cpu": {"topk_ids": ok["topk_ids"].cpu()},
        "weights dtype": {"topk_weights": ok["topk_weights"].half()},
        "weights shape": {"topk_weights": ok["topk_weights"][:, :-1].contiguous()},
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


@pytest.mark.parametrize("name", sorted(SPECS))
def test_python_check_refuses_every_mutation(name):
    """On CPU tensors (the device rules aside): each mutation breaks a rule."""
    spec = SPECS[name]
    cpu = torch.device("cpu")
    ok = good_inputs(spec, "cpu")
    assert check_dispatch_inputs(spec, device=cpu, **ok) == 5
    assert check_dispatch_inputs(spec, device=cpu, **good_inputs(spec, "cpu", n=0)) == 0
    for what, change in mutations(spec, ok).items():
        if "on cpu" in what:
            continue
        with pytest.raises(A2AInputError):
            check_dispatch_inputs(spec, device=cpu, **{**ok, **change})
    assert check_dispatch_inputs(spec, device=cpu, **ok) == 5


def _one_rank(spec: AllToAllSpec):
    """The all-to-all of a one-rank copy of ``spec``: every round completes alone."""
    import dataclasses

    from vllm_a2a_plugin import A2AConfig, OneSidedAllToAll, Workspace

    spec = dataclasses.replace(spec, ep_size=1)
    return OneSidedAllToAll(Workspace.allocate_local(spec, torch.device("cuda", 0)), 0,
                            config=A2AConfig(timeout_s=5.0))


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(SPECS))
def test_planned_op_refuses_what_the_python_check_refuses(name):
    """The C++ guard on its own: called directly, the planned dispatch raises for
    every mutation it can be given (it takes no extra payloads) and launches nothing."""
    spec = SPECS[name]
    a2a = _one_rank(spec)
    plan = a2a._launch_plan()
    ok = good_inputs(spec, "cuda")
    op = torch.ops.a2a_one_sided.dispatch_planned

    def call(args: dict) -> None:
        op(plan, a2a._buffer, args["x"], args["x_scales"], args["topk_ids"],
           args["topk_weights"], args["runtime_max_tokens"], 3)

    for what, change in mutations(spec, ok).items():
        if "extra_payloads" in change:
            continue
        with pytest.raises(RuntimeError):
            call({**ok, **change})
        with pytest.raises(A2AInputError):  # and the Python check agrees
            check_dispatch_inputs(a2a.spec, device=a2a.device, **{**ok, **change})
    assert a2a.completed_rounds() == (0, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(SPECS))
def test_dispatch_and_combine_refuse_bad_arguments_with_the_python_message(name):
    """Through OneSidedAllToAll: every mutation raises A2AInputError (the Python
    check's message, also where the C++ op refused first), the state stays as it
    was and no kernel ran; good arguments (a tensor subclass too) work after."""
    spec = SPECS[name]
    a2a = _one_rank(spec)
    ok = good_inputs(spec, "cuda")
    for what, change in mutations(spec, ok).items():
        args = {**ok, **change}
        with pytest.raises(A2AInputError):
            a2a.dispatch(args["x"], args["topk_ids"], args["topk_weights"],
                         x_scales=args["x_scales"], extra_payloads=args["extra_payloads"],
                         runtime_max_tokens=args["runtime_max_tokens"])
        assert a2a.phase == "idle", what
    with pytest.raises(A2AInputError, match="x must be"):
        a2a.dispatch(ok["x"].float(), ok["topk_ids"], x_scales=ok["x_scales"])
    assert a2a.completed_rounds() == (0, 0)

    # A good round; a tensor subclass takes the Python check and is accepted.
    x = torch.nn.Parameter(ok["x"], requires_grad=False)
    a2a.dispatch(x, ok["topk_ids"], ok["topk_weights"], x_scales=ok["x_scales"],
                 runtime_max_tokens=6)
    n, h = ok["x"].shape
    dtype = spec.combine_dtype
    bad_outs = {
        "dtype": torch.empty((n, h), dtype=torch.float32, device="cuda"),
        "same bytes, other dtype": torch.empty((n, h // 2), dtype=torch.float32, device="cuda"),
        "rows": torch.empty((n + 1, h), dtype=dtype, device="cuda"),
        "3-d": torch.empty((n, h // 2, 2), dtype=dtype, device="cuda"),
        "on cpu": torch.empty((n, h), dtype=dtype),
        "not contiguous": torch.empty((h, n), dtype=dtype, device="cuda").t(),
    }
    for what, out in bad_outs.items():
        with pytest.raises(A2AInputError, match="out "):
            a2a.combine(out=out)
        assert a2a.phase == "dispatched", what
    out = torch.empty((n, h), dtype=dtype, device="cuda")
    assert a2a.combine(out=out) is out
    assert a2a.completed_rounds() == (1, 1)
