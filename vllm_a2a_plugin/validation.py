"""Input checks shared by every all-to-all implementation, run before any launch.

Each raises :class:`A2AInputError` with a message that names the argument and
prints what was expected and what was given.
"""

from __future__ import annotations

import torch

from vllm_a2a_plugin.errors import A2AInputError
from vllm_a2a_plugin.workspace import AllToAllSpec


def is_capturing() -> bool:
    """True while a CUDA graph is being captured on the current stream (never on CPU torch)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def row_bytes(t: torch.Tensor) -> int:
    """Bytes of one token (row 0 of dimension 0) of ``t``, also when ``t`` has no rows."""
    n = t.element_size()
    for size in t.shape[1:]:
        n *= size
    return n


def check_tensor(t: torch.Tensor, name: str, *, dtype: torch.dtype | tuple[torch.dtype, ...],
                 shape: tuple[int | None, ...], device: torch.device | None) -> None:
    if not isinstance(t, torch.Tensor):
        raise A2AInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    if t.dtype not in dtypes:
        want = " or ".join(str(d) for d in dtypes)
        raise A2AInputError(f"{name} must be {want}, got {t.dtype}")
    if t.dim() != len(shape) or any(w is not None and w != g for w, g in zip(shape, t.shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise A2AInputError(f"{name} must have shape {want}, got {list(t.shape)}")
    if device is not None and t.device != device:
        raise A2AInputError(f"{name} is on {t.device} but the all-to-all runs on {device}")
    if not t.is_contiguous():
        raise A2AInputError(f"{name} must be contiguous (call .contiguous() first)")


def check_dispatch_inputs(
    spec: AllToAllSpec, *, x: torch.Tensor, topk_ids: torch.Tensor,
    topk_weights: torch.Tensor | None, x_scales: torch.Tensor | None,
    extra_payloads: tuple[torch.Tensor, ...], runtime_max_tokens: int,
    device: torch.device | None,
) -> int:
    """Validates one rank's dispatch arguments; returns its token count ``T``."""
    check_tensor(topk_ids, "topk_ids", dtype=torch.int32, shape=(None, spec.top_k),
                 device=device)
    num_tokens = topk_ids.shape[0]
    check_tensor(x, "x", dtype=spec.dispatch_dtype, shape=(num_tokens, spec.hidden_size),
                 device=device)
    if topk_weights is not None:
        check_tensor(topk_weights, "topk_weights", dtype=torch.float32,
                     shape=(num_tokens, spec.top_k), device=device)
    if spec.scale_cols:
        if x_scales is None:
            raise A2AInputError(
                f"x_scales is required: the workspace was sized for {spec.scale_cols} "
                "float32 scales per token"
            )
        check_tensor(x_scales, "x_scales", dtype=torch.float32,
                     shape=(num_tokens, spec.scale_cols), device=device)
    elif x_scales is not None:
        raise A2AInputError("x_scales was given but the workspace has no scale payload "
                            "(AllToAllSpec.scale_cols is 0)")
    if len(extra_payloads) != len(spec.extra_payload_row_bytes):
        raise A2AInputError(
            f"{len(extra_payloads)} extra payloads given, the workspace was sized for "
            f"{len(spec.extra_payload_row_bytes)}"
        )
    for i, (payload, row) in enumerate(zip(extra_payloads, spec.extra_payload_row_bytes)):
        if not isinstance(payload, torch.Tensor) or payload.dim() < 1:
            raise A2AInputError(f"extra payload {i} must be a tensor with a token dimension")
        if payload.shape[0] != num_tokens:
            raise A2AInputError(
                f"extra payload {i} has {payload.shape[0]} rows, expected {num_tokens}"
            )
        got = row_bytes(payload)
        if got != row:
            raise A2AInputError(f"extra payload {i} has {got} bytes per token, expected {row}")
        if device is not None and payload.device != device:
            raise A2AInputError(f"extra payload {i} is on {payload.device}, expected {device}")
        if not payload.is_contiguous():
            raise A2AInputError(f"extra payload {i} must be contiguous")
    if num_tokens > runtime_max_tokens:
        raise A2AInputError(
            f"this rank has {num_tokens} tokens but runtime_max_tokens is {runtime_max_tokens}"
        )
    if runtime_max_tokens > spec.max_tokens_per_rank:
        raise A2AInputError(
            f"runtime_max_tokens ({runtime_max_tokens}) exceeds the workspace's "
            f"max_tokens_per_rank ({spec.max_tokens_per_rank})"
        )
    return num_tokens


NO_EXPERT = -1
"""A top-k id meaning "no expert for this slot" (csrc/launch.h ``kNoExpert``):
vLLM's routers write it for padding tokens (``VLLM_MOE_SKIP_PADDING``). The slot
is skipped: no rank receives it, and combine adds nothing for it."""


def check_expert_ids_in_range(topk_ids: torch.Tensor, num_experts: int) -> None:
    """Host-side range check of top-k ids (one device sync); ``NO_EXPERT`` passes."""
    if topk_ids.numel() == 0:
        return
    bad = ((topk_ids < 0) & (topk_ids != NO_EXPERT)) | (topk_ids >= num_experts)
    if bool(bad.any()):
        token, slot = (int(v) for v in torch.nonzero(bad)[0])
        value = int(topk_ids[token, slot])
        raise A2AInputError(
            f"topk_ids[{token}, {slot}] = {value} is out of range: expert ids must be in "
            f"[0, {num_experts}), or {NO_EXPERT} for a slot without an expert"
        )
