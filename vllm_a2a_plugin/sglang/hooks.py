"""The one module that patches SGLang, so ``--moe-a2a-backend a2a_one_sided`` works.

SGLang 0.5.23 chooses the MoE all-to-all by a closed list of names and has no
dispatcher registry. These patches wrap (never copy) what they extend, each
with a comment naming it; function wraps go through SGLang's own
``HookRegistry`` (which also rebinds ``from X import Y`` copies).

Runtime value: ``MoeA2ABackend("a2a_one_sided")`` is SGLang's
``MoeA2ABackend.CUSTOMIZED``, the member SGLang keeps for an outside backend
(adding an Enum member at runtime would need Enum internals). Our backend is a
one-sided, rank-major all-to-all whose combine sums every token's expert
outputs back on its source rank: exactly what SGLang's runtime checks of
``is_flashinfer()`` mean, so that predicate answers True for it too.

Patched (and why):
  * ``ExecMoe.moe_a2a_backend`` / ``ServerArgs.moe_a2a_backend`` (the Literal
    and the argparse ``choices``) and ``Spec.speculative_moe_a2a_backend``'s
    choices gain our name: the flag parses, ``--help`` lists it, and draft
    models may name it (by default they inherit the target's backend).
  * ``MoeA2ABackend._missing_``: our name -> ``CUSTOMIZED`` (it raises on
    unknown names; ``initialize_moe_config`` converts the flag with it).
  * ``MoeA2ABackend.is_flashinfer``: True for our backend. Every runtime site
    keyed on it applies to a one-sided rank-major all-to-all (0.5.23):
      - ``layers/moe/utils.post_experts_output_is_complete``: our combine
        already summed each token on its source rank (no EP all-reduce after);
      - ``utils/common.require_mlp_tp_gather``: DP-synchronised token counts,
        which give every EP rank the same runtime max tokens (and CUDA-graph
        bucket);
      - ``models/{deepseek_v2,glm4_moe,qwen2_moe,step3p5,nemotron_h,xllm}``:
        shared experts run with TP=1 beside an EP all-to-all, ``_enable_a2a_moe``
        paths, no shared/routed overlap outside capture;
      - ``quantization/modelopt_quant._use_nvfp4_dispatch``: NVFP4 models are
        refused by our dispatcher (bf16/fp16/fp8 only) before it matters;
      - ``fused_moe_triton/layer.create_moe_dispatcher``: wrapped below, so our
        dispatcher is returned before the flashinfer branch is reached.
  * ``fused_moe_triton.layer.create_moe_dispatcher``: returns our dispatcher.
  * ``arg_groups/overrides._A2A_EP_SPANNING_BACKENDS``: gains our name, so EP
    spans the TP group (``ep_size = tp_size``) as for every EP all-to-all.
  * ``arg_groups/overrides._a2a_fusion_adjustments``: for us, like flashinfer,
    ``--disable-shared-experts-fusion``: fused shared experts would be extra
    local experts of every rank, which an owner-routed all-to-all cannot reach.

Left alone on purpose (every other place SGLang 0.5.23 tests the name):
  * ``is_none()`` checks (dozens; models, dp_attention, forward_batch_info,
    cuda_graph setup, eplb, lora, pd hooks, validation hooks): we are an EP
    all-to-all, "not none" is the right answer everywhere.
  * ``is_deepep()/is_mooncake()/is_mori()/is_nixl()/is_pplx()/is_deepep_v2()/
    is_megamoe()/is_flashinfer_megamoe()/is_ascend_*()`` and
    ``is_deepep_class_backend()``: DeepEP-family layouts (per-rank fused shared
    slots, low-latency modes, TBO/SBO, their CUDA-graph and memory rules) that
    we do not have; False is right.
  * ``is_customized()`` in ``forward_batch_info.enable_num_token_non_padded``:
    True for us; the non-padded count is computed, harmless and cheap.
  * ``MoeA2ABackend.supports_aiter``: ROCm aiter paths; we are CUDA only.
  * String compares in ``arg_groups``: ``moe_hook.validate_flashinfer_a2a_token_budget``
    (flashinfer's workspace env var; ours is sized from the same prefill bound
    and refuses larger batches with a message), ``layernorm_sp_hook`` /
    ``model_overrides/qwen3_moe`` / ``deepseek_v4_hook`` / ``speculative_hook``
    DSpark / ``parallel_hook`` Kimi-K3 shared-TP / ``mega_moe_hook`` /
    ``minimax_m3`` (model-specific allow-lists that name flashinfer, deepep or
    megamoe kernels we do not provide: SGLang's own error then names the
    supported backends), ``memory_hook`` / ``cuda_graph_hook`` DeepEP sizing,
    ``overrides._a2a_backend_overrides`` (Waterfill forces deepep: SGLang
    logs it), ``lora_hook`` / ``pd_disaggregation_hook`` / ``validation_hook``
    ("not none" is right).
  * ``FusedOpPool`` fused functions are keyed by the a2a name (``"customized"``
    has none): runners with a modular path (Triton, DeepGEMM, triton_kernels)
    take our STANDARD output through their pre-permute path; fused-only
    runners (flashinfer_*, marlin, cutlass, hpc_ops) stop at SGLang's own
    "requires a fused func" error.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable
from typing import Annotated, Literal, get_args, get_origin

from vllm_a2a_plugin import BACKEND_NAME
from vllm_a2a_plugin.import_hooks import when_imported

logger = logging.getLogger(__name__)

SUPPORTED_SGLANG_VERSIONS = ("0.5.23",)

_lock = threading.Lock()
_installed = False
# Set once this process converted our flag value to MoeA2ABackend.CUSTOMIZED.
_selected = False

_SERVER_ARGS = "sglang.srt.server_args"
_MOE_UTILS = "sglang.srt.layers.moe.utils"
_MOE_LAYER = "sglang.srt.layers.moe.fused_moe_triton.layer"
_OVERRIDES = "sglang.srt.arg_groups.overrides"


class UnsupportedSglangVersionError(RuntimeError):
    pass


def check_sglang_version(version: str | None = None) -> str:
    """Raise one clear error unless the installed SGLang is a supported release."""
    if version is None:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as dist_version

        try:
            version = dist_version("sglang")
        except PackageNotFoundError:
            raise UnsupportedSglangVersionError(
                f"vllm-a2a-plugin's SGLang integration needs sglang "
                f"{' or '.join(SUPPORTED_SGLANG_VERSIONS)}; sglang is not installed") from None
    if version.split("+")[0] not in SUPPORTED_SGLANG_VERSIONS:
        raise UnsupportedSglangVersionError(
            f"vllm-a2a-plugin supports sglang {' or '.join(SUPPORTED_SGLANG_VERSIONS)}; found "
            f"sglang {version}. Install sglang==0.5.23, or keep this plugin from loading with "
            "SGLANG_PLUGINS=<the plugins you want>.")
    return version


def install() -> None:
    """Apply every patch now or when its module is imported (idempotent)."""
    global _installed
    with _lock:
        if _installed:
            return
        check_sglang_version()
        # Argument parsing must see our name in every process that parses;
        # server_args is imported by every SGLang process anyway.
        _patch_server_args(importlib.import_module(_SERVER_ARGS))
        _patch_overrides(importlib.import_module(_OVERRIDES))
        # MoE modules are heavy (Triton, runners): patched when first imported.
        when_imported(_MOE_UTILS, _patch_moe_utils)
        when_imported(_MOE_LAYER, _patch_moe_layer)
        _installed = True


def ours_selected() -> bool:
    """True once this process mapped ``--moe-a2a-backend a2a_one_sided`` to SGLang's enum."""
    return _selected




def _hook(target: str, hook: Callable) -> None:
    """Wrap ``target`` with an AROUND hook through SGLang's HookRegistry, now."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookSource, HookType

    HookRegistry.register(target, hook, HookType.AROUND,
                          source=HookSource(plugin_name=BACKEND_NAME, dist_name="vllm-a2a-plugin"))
    HookRegistry.apply_hooks()  # idempotent: already patched targets are skipped


# -------------------------------------------------------------- server args
def _with_our_name(annotated):
    """``Annotated[Literal[...] | Optional[str], Arg(choices=[...])]`` plus our name."""
    import msgspec

    if get_origin(annotated) is not Annotated:
        raise UnsupportedSglangVersionError(
            f"unexpected annotation of SGLang's moe_a2a_backend field: {annotated!r}")
    inner, *metadata = get_args(annotated)
    if get_origin(inner) is Literal and BACKEND_NAME not in get_args(inner):
        inner = Literal[(*get_args(inner), BACKEND_NAME)]  # type: ignore[valid-type]
    new_metadata = []
    for meta in metadata:
        choices = getattr(meta, "choices", None)
        if choices is not None and BACKEND_NAME not in choices:
            meta = msgspec.structs.replace(meta, choices=[*choices, BACKEND_NAME])
        new_metadata.append(meta)
    return Annotated[(inner, *new_metadata)]  # type: ignore[valid-type]


def _extend_field(cls, name: str) -> None:
    from typing import get_type_hints

    hint = get_type_hints(cls, include_extras=True)[name]
    cls.__annotations__[name] = _with_our_name(hint)


def _patch_server_args(server_args_module) -> None:
    """Extends ExecMoe.moe_a2a_backend, Spec.speculative_moe_a2a_backend and
    their copies on ServerArgs (argparse reads ServerArgs' annotations)."""
    from sglang.srt.arg_groups.fields.exec_ import ExecMoe
    from sglang.srt.arg_groups.fields.spec import Spec

    server_args_cls = server_args_module.ServerArgs
    for cls, name in ((ExecMoe, "moe_a2a_backend"), (Spec, "speculative_moe_a2a_backend"),
                      (server_args_cls, "moe_a2a_backend"),
                      (server_args_cls, "speculative_moe_a2a_backend")):
        _extend_field(cls, name)


def _patch_overrides(overrides) -> None:
    """Extends overrides._A2A_EP_SPANNING_BACKENDS; wraps _a2a_fusion_adjustments."""
    if BACKEND_NAME not in overrides._A2A_EP_SPANNING_BACKENDS:
        overrides._A2A_EP_SPANNING_BACKENDS = overrides._A2A_EP_SPANNING_BACKENDS | {BACKEND_NAME}

    # Wraps overrides._a2a_fusion_adjustments (flashinfer's rule, for us too).
    def a2a_fusion_adjustments(original, view):
        if view.moe_a2a_backend == BACKEND_NAME:
            logger.warning("%s MoE A2A is enabled. --disable-shared-experts-fusion is "
                           "automatically set.", BACKEND_NAME)
            return {"disable_shared_experts_fusion": True}
        return original(view)

    _hook(f"{_OVERRIDES}._a2a_fusion_adjustments", a2a_fusion_adjustments)


# ------------------------------------------------------------ runtime enum
def _patch_moe_utils(moe_utils) -> None:
    """Wraps MoeA2ABackend._missing_ and MoeA2ABackend.is_flashinfer."""
    backend_cls = moe_utils.MoeA2ABackend

    # Wraps MoeA2ABackend._missing_: our flag value is SGLang's CUSTOMIZED member.
    def missing(original, cls, value):
        if value == BACKEND_NAME:
            global _selected
            _selected = True
            return cls.CUSTOMIZED
        return original(cls, value)

    # Wraps MoeA2ABackend.is_flashinfer: see the module docstring for every caller.
    def is_flashinfer(original, self):
        return original(self) or (_selected and self is backend_cls.CUSTOMIZED)

    _hook(f"{_MOE_UTILS}.MoeA2ABackend._missing_", missing)
    _hook(f"{_MOE_UTILS}.MoeA2ABackend.is_flashinfer", is_flashinfer)


# ------------------------------------------------------------------ factory
def _patch_moe_layer(layer_module) -> None:
    """Wraps fused_moe_triton.layer.create_moe_dispatcher."""

    def create_moe_dispatcher(original, moe_runner_config, quant_method):
        if _selected and layer_module.get_moe_a2a_backend().is_customized():
            from vllm_a2a_plugin.sglang.dispatcher import OneSidedDispatcher

            return OneSidedDispatcher.from_sglang(moe_runner_config, quant_method)
        return original(moe_runner_config, quant_method)

    _hook(f"{_MOE_LAYER}.create_moe_dispatcher", create_moe_dispatcher)
