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


class DispatchInputFastCheck:
    """A cheap yes/no form of :func:`check_dispatch_inputs` for the per-call path.

    ``passes(...)`` is True only when :func:`check_dispatch_inputs` would accept
    the same arguments; False means "not sure": the caller then runs the full
    check, which raises with its message (or accepts what the fast form left to
    it: tensor subclasses, extra payloads, devices other than one CUDA device).
    It reads each tensor's dtype, shape, device and contiguity with the cheapest
    attribute for each (no ``torch.device`` objects, no generators), which took
    the check from ~5 us to ~1.5 us per dispatch (CPU measurement, 4 tensors).

    Args:
        spec: the workspace spec the inputs must fit.
        device: the CUDA device the all-to-all runs on.
    """

    def __init__(self, spec: AllToAllSpec, device: torch.device):
        self._top_k = spec.top_k
        self._hidden = spec.hidden_size
        self._x_dtype = spec.dispatch_dtype
        self._scale_cols = spec.scale_cols
        self._capacity = spec.max_tokens_per_rank
        self._has_extras = bool(spec.extra_payload_row_bytes)
        self._cuda_index = device.index if device.type == "cuda" and device.index is not None \
            else None

    def passes(self, x: torch.Tensor, topk_ids: torch.Tensor,
               topk_weights: torch.Tensor | None, x_scales: torch.Tensor | None,
               extra_payloads: tuple, runtime_max_tokens: int) -> bool:
        """True when every argument certainly passes :func:`check_dispatch_inputs`."""
        index = self._cuda_index
        if index is None or extra_payloads or self._has_extras:
            return False
        tensor = torch.Tensor
        if (topk_ids.__class__ is not tensor or topk_ids.dtype is not torch.int32
                or not topk_ids.is_cuda or topk_ids.get_device() != index
                or not topk_ids.is_contiguous()):
            return False
        shape = topk_ids.shape
        if len(shape) != 2 or shape[1] != self._top_k:
            return False
        n = shape[0]
        if not n <= runtime_max_tokens <= self._capacity:
            return False
        if (x.__class__ is not tensor or x.dtype is not self._x_dtype
                or x.shape != (n, self._hidden) or not x.is_cuda
                or x.get_device() != index or not x.is_contiguous()):
            return False
        if topk_weights is not None and (
                topk_weights.__class__ is not tensor or topk_weights.dtype is not torch.float32
                or topk_weights.shape != (n, self._top_k) or not topk_weights.is_cuda
                or topk_weights.get_device() != index or not topk_weights.is_contiguous()):
            return False
        if self._scale_cols:
            return (x_scales is not None and x_scales.__class__ is tensor
                    and x_scales.dtype is torch.float32
                    and x_scales.shape == (n, self._scale_cols) and x_scales.is_cuda
                    and x_scales.get_device() == index and x_scales.is_contiguous())
        return x_scales is None


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
