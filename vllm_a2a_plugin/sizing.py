"""Workspace memory before launch: ours, flashinfer's and DeepEP's for one model.

:func:`moe_shapes` reads the MoE shapes (hidden size, routed experts, top-k)
from a Hugging Face ``config.json``; :func:`size_report` gives, per distinct
shape, the bytes our workspace takes per rank and in total (from the C++
layout, :meth:`WorkspaceLayout.for_spec`, the same call the pool's allocation
makes) beside the sizes flashinfer's ``MoeAlltoAll`` and DeepEP's buffers ask
for the same configuration, computed from their published formulas
(:func:`flashinfer_moe_a2a_bytes_per_rank`, :func:`deepep_low_latency_bytes`,
:func:`deepep_normal_nvl_bytes`; each docstring names its source).

The workspace of a layer shape is shared by every MoE layer of that shape, so
the number of layers does not multiply it; a second micro-batch (vLLM's
``--enable-dbo``, SGLang's ``--enable-two-batch-overlap``) doubles it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vllm_a2a_plugin.workspace import AllToAllSpec, WorkspaceLayout

FP8_BLOCK = 128  # vLLM's fp8 block quantisation: one float32 scale per 128 values

# (routed experts, top-k) field names by model family, first match wins:
# Qwen2/3-MoE: num_experts / num_experts_per_tok; DeepSeek-V2/V3, Kimi-K2:
# n_routed_experts / num_experts_per_tok; Mixtral, Llama 4, gpt-oss, Phi-MoE:
# num_local_experts / num_experts_per_tok (gpt-oss: experts_per_token);
# DBRX: ffn_config.moe_num_experts / moe_top_k; OLMoE, Granite-MoE: num_experts.
_EXPERT_FIELDS = ("n_routed_experts", "num_local_experts", "num_experts", "moe_num_experts")
_TOP_K_FIELDS = ("num_experts_per_tok", "experts_per_token", "moe_top_k", "top_k")
_HIDDEN_FIELDS = ("hidden_size", "d_model", "n_embd")


@dataclass(frozen=True)
class MoeShape:
    """One MoE layer shape of a model.

    Attributes:
        hidden_size: elements per token ``H``.
        num_experts: routed (global) experts ``E``; shared experts never travel.
        top_k: experts per token ``K``.
        num_moe_layers: how many layers have this shape (they share one
            workspace); 0 when the config does not say.
        source: which config section it came from (``""`` = top level).
    """

    hidden_size: int
    num_experts: int
    top_k: int
    num_moe_layers: int = 0
    source: str = ""


def _first(section: dict, names: tuple[str, ...]):
    for name in names:
        value = section.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return name, value
    return None, None


def _moe_layers(section: dict) -> int:
    layers = section.get("num_hidden_layers") or section.get("n_layers") or 0
    if not isinstance(layers, int):
        return 0
    dense = section.get("first_k_dense_replace", 0) or 0  # DeepSeek: first k layers dense
    step = section.get("moe_layer_freq") or section.get("decoder_sparse_step") or 1
    if isinstance(step, int) and step > 1:
        return len([i for i in range(dense, layers) if (i + 1) % step == 0])
    return max(layers - int(dense), 0)


def _shape_of(section: dict, source: str) -> MoeShape | None:
    ffn = section.get("ffn_config") if isinstance(section.get("ffn_config"), dict) else {}
    _, experts = _first(section, _EXPERT_FIELDS)
    if experts is None:
        _, experts = _first(ffn, _EXPERT_FIELDS)
    _, top_k = _first(section, _TOP_K_FIELDS)
    if top_k is None:
        _, top_k = _first(ffn, _TOP_K_FIELDS)
    _, hidden = _first(section, _HIDDEN_FIELDS)
    if experts is None or top_k is None or hidden is None or experts < 2:
        return None
    return MoeShape(hidden_size=hidden, num_experts=experts, top_k=top_k,
                    num_moe_layers=_moe_layers(section), source=source)


def load_config(path: str | Path) -> dict:
    """``config.json`` itself, or the one in a Hugging Face-style model folder."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no model config at {path} (give a config.json or a folder "
                                "holding one)")
    with path.open() as f:
        return json.load(f)


def moe_shapes(config: dict) -> list[MoeShape]:
    """Every distinct MoE shape of a Hugging Face config: the top level and nested
    sections (``text_config`` of multimodal models, ...).

    Raises:
        ValueError: the config names no routed experts / top-k / hidden size
            (a dense model, or field names this reader does not know).
    """
    sections = [("", config)] + [(name, value) for name, value in config.items()
                                 if isinstance(value, dict) and name != "ffn_config"]
    shapes: dict[tuple[int, int, int], MoeShape] = {}
    for source, section in sections:
        shape = _shape_of(section, source)
        if shape is not None:
            shapes.setdefault((shape.hidden_size, shape.num_experts, shape.top_k), shape)
    if not shapes:
        raise ValueError(
            "no MoE layer found in this config: expected routed experts "
            f"({' / '.join(_EXPERT_FIELDS)}), top-k ({' / '.join(_TOP_K_FIELDS)}) and "
            f"hidden size ({' / '.join(_HIDDEN_FIELDS)}); model_type="
            f"{config.get('model_type')!r}")
    return list(shapes.values())


def our_spec(shape: MoeShape, *, ep_size: int, max_tokens: int, dtype: str) -> AllToAllSpec:
    """The :class:`AllToAllSpec` vLLM's prepare/finalize builds for this layer.

    ``dtype``: ``"bf16"`` (bf16 dispatch and combine) or ``"fp8"`` (fp8 with
    1x128 block scales dispatched, bf16 combine: block-fp8 checkpoints).
    ``max_tokens``: vLLM's ``max_num_batched_tokens`` (the capacity per rank).
    """
    if dtype == "bf16":
        return AllToAllSpec(ep_size=ep_size, max_tokens_per_rank=max_tokens,
                            hidden_size=shape.hidden_size, top_k=shape.top_k,
                            num_experts=shape.num_experts)
    if dtype == "fp8":
        if shape.hidden_size % FP8_BLOCK:
            raise ValueError(f"fp8 block dispatch needs hidden_size ({shape.hidden_size}) "
                             f"divisible by {FP8_BLOCK}")
        return AllToAllSpec(ep_size=ep_size, max_tokens_per_rank=max_tokens,
                            hidden_size=shape.hidden_size, top_k=shape.top_k,
                            num_experts=shape.num_experts, dispatch_dtype=torch.float8_e4m3fn,
                            scale_cols=shape.hidden_size // FP8_BLOCK)
    raise ValueError(f"dtype must be bf16 or fp8, got {dtype!r}")


def flashinfer_moe_a2a_bytes_per_rank(*, ep_size: int, max_num_tokens: int,
                                      dispatch_payload_bytes_per_token: int,
                                      combine_payload_bytes_per_token: int,
                                      eplb_stats_num_experts: int = 0) -> int:
    """flashinfer 0.7.2's ``moe_a2a_get_workspace_size_per_rank`` (the workspace
    ``MoeAlltoAll`` / ``moe_ep.NVLinkOneSidedAlltoAll`` allocates per rank).

    Source: ``flashinfer/comm/trtllm_moe_alltoall.py``
    (``moe_a2a_get_workspace_size_per_rank``: 128-byte padded aux data +
    ``ep * tokens * dispatch payload`` + ``ep * tokens * combine payload``) and
    the aux data from ``csrc/trtllm_moe_alltoall.cu`` (``calculateOffsets``:
    flag and token counter, send/recv counters and completion flags per rank,
    ``max_num_tokens * kMaxTopK(22)`` target ranks and send indices, each
    region 128-byte aligned).
    """
    def pad(x: int, to: int = 128) -> int:
        return (x + to - 1) // to * to

    max_top_k = 22
    aux = 4 + 4 + ep_size * 4 + ep_size * 4
    aux = pad(aux) + ep_size * 4
    aux = pad(aux) + ep_size * 4
    aux = pad(aux) + max_num_tokens * max_top_k * 4
    aux = pad(aux) + max_num_tokens * max_top_k * 4
    aux = pad(aux) + ep_size * eplb_stats_num_experts * 4
    aux = pad(aux)
    return (pad(aux) + pad(ep_size * max_num_tokens * dispatch_payload_bytes_per_token)
            + pad(ep_size * max_num_tokens * combine_payload_bytes_per_token))


def flashinfer_bytes_for(shape: MoeShape, *, ep_size: int, max_tokens: int, dtype: str) -> int:
    """flashinfer's workspace for the payloads vLLM's flashinfer one-sided
    prepare sends: hidden states (+ fp8 block scales), top-k ids (int32) and
    weights (float32) dispatched, bf16 rows combined."""
    hidden_bytes = shape.hidden_size * (1 if dtype == "fp8" else 2)
    scales = shape.hidden_size // FP8_BLOCK * 4 if dtype == "fp8" else 0
    dispatch = hidden_bytes + scales + shape.top_k * 4 + shape.top_k * 4
    return flashinfer_moe_a2a_bytes_per_rank(
        ep_size=ep_size, max_num_tokens=max_tokens,
        dispatch_payload_bytes_per_token=dispatch,
        combine_payload_bytes_per_token=shape.hidden_size * 2)


def deepep_low_latency_bytes(*, num_max_dispatch_tokens_per_rank: int, hidden: int,
                             num_experts: int) -> int:
    """DeepEP's ``Buffer.get_low_latency_rdma_size_hint`` (the RDMA buffer of
    its low-latency kernels; vLLM's DeepEP-LL manager asks for exactly this).

    Source: DeepEP ``csrc/config.hpp`` (``LowLatencyLayout``,
    ``get_low_latency_rdma_size_hint``): two (odd/even) send, receive and
    signalling buffers; a dispatch message is ``16 + max(2H, H + H/128 * 4)``
    bytes, a combine message ``H/128 * 4 + 2H``; receive buffers hold
    ``num_experts * tokens`` messages; rounded up past a 128-byte multiple.
    """
    num_scales = hidden // 128
    dispatch_msg = 16 + max(hidden * 2, hidden + num_scales * 4)
    combine_msg = num_scales * 4 + hidden * 2
    send = max(num_max_dispatch_tokens_per_rank * dispatch_msg,
               num_experts * num_max_dispatch_tokens_per_rank * combine_msg)
    recv = max(num_experts * num_max_dispatch_tokens_per_rank * dispatch_msg,
               num_experts * num_max_dispatch_tokens_per_rank * combine_msg)
    signalling = (num_experts * 4 + 127) // 128 * 128
    total = 2 * send + 2 * recv + 2 * signalling
    return (total + 128) // 128 * 128


def deepep_normal_nvl_bytes(*, hidden_bytes: int, num_ranks: int, num_sms: int = 20,
                            num_max_nvl_chunked_recv_tokens: int = 256) -> int:
    """DeepEP's ``Config.get_nvl_buffer_size_hint`` for its normal (high-throughput)
    kernels within one node, with its default ``Buffer.num_sms = 20`` and
    ``get_dispatch_config`` for 2..8 ranks (256 receive tokens per channel).

    Source: DeepEP ``csrc/config.hpp`` (``get_nvl_buffer_size_hint``) and
    ``deep_ep/buffer.py`` (``get_dispatch_config``). The buffer is a ring per
    channel and rank, so it does not grow with the batch. vLLM's DeepEP
    managers allocate ``VLLM_DEEPEP_BUFFER_SIZE_MB`` (default 1 GiB) of NVLink
    buffer instead of the hint.
    """
    max_nvl_peers, max_top_k, max_scales, source_meta = 8, 128, 128, 8
    if num_ranks > max_nvl_peers:
        raise ValueError("the NVLink hint here covers one node (<= 8 ranks)")
    channels = num_sms // 2
    rows = channels * num_ranks * num_max_nvl_chunked_recv_tokens
    total = channels * num_ranks * (2 * 1 + 3) * 4
    total += rows * (hidden_bytes + source_meta + max_top_k * 8 + max_top_k * 4 + max_scales * 4)
    return (total + 127) // 128 * 128


@dataclass(frozen=True)
class ShapeSize:
    """Bytes for one MoE shape (per rank unless named ``total``)."""

    shape: MoeShape
    ours_per_rank: int
    ours_total: int
    flashinfer_per_rank: int
    deepep_low_latency_per_rank: int
    deepep_normal_nvl_per_rank: int | None


def size_report(shapes: list[MoeShape], *, ep_size: int, max_tokens: int, dtype: str = "bf16",
                micro_batches: int = 1) -> list[ShapeSize]:
    """Workspace bytes per distinct shape; ``micro_batches`` (1 or 2) workspaces
    of ours each. The baselines are given for one micro-batch (DeepEP's
    low-latency buffer is already double: its two odd/even halves)."""
    if micro_batches not in (1, 2):
        raise ValueError(f"micro_batches must be 1 or 2, got {micro_batches}")
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    out = []
    for shape in shapes:
        spec = our_spec(shape, ep_size=ep_size, max_tokens=max_tokens, dtype=dtype)
        ours = WorkspaceLayout.for_spec(spec).total_bytes * micro_batches
        hidden_bytes = shape.hidden_size * (1 if dtype == "fp8" else 2)
        out.append(ShapeSize(
            shape=shape, ours_per_rank=ours, ours_total=ours * ep_size,
            flashinfer_per_rank=flashinfer_bytes_for(shape, ep_size=ep_size,
                                                     max_tokens=max_tokens, dtype=dtype),
            deepep_low_latency_per_rank=deepep_low_latency_bytes(
                num_max_dispatch_tokens_per_rank=max_tokens, hidden=shape.hidden_size,
                num_experts=shape.num_experts),
            deepep_normal_nvl_per_rank=(deepep_normal_nvl_bytes(hidden_bytes=hidden_bytes,
                                                                num_ranks=ep_size)
                                        if ep_size <= 8 else None)))
    return out


def report_as_dict(sizes: list[ShapeSize]) -> list[dict]:
    return [{**asdict(s), "shape": asdict(s.shape)} for s in sizes]
