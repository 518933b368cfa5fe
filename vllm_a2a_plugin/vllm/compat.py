"""What differs between the vLLM releases this plugin supports (0.32.x, 0.33.x).

Everything version-specific in the plugin is here, so the rest of
``vllm_a2a_plugin.vllm`` reads the same for every supported release. Read from
the 0.32.0 and 0.33.0 wheels: the interfaces we implement or wrap
(``FusedMoEPrepareAndFinalizeModular``'s abstract methods and the
``prepare``/``finalize`` signatures, ``maybe_make_prepare_finalize``,
``All2AllManagerBase``, the communicators' constructors) are identical; 0.33
adds ``supports_dbo()`` (defaults to ``supports_async()``; see
:func:`modular_kernel_has_supports_dbo`) and
``FusedMoEQuantConfig.is_scale_transposed`` (see
:func:`activation_scales_transposed`).
"""

from __future__ import annotations

# Release series we support -> the release we test it with (CI installs each).
TESTED_VLLM = {"0.32": "0.32.0", "0.33": "0.33.0"}
SUPPORTED_VLLM_SERIES = tuple(TESTED_VLLM)
NEWEST_VLLM = TESTED_VLLM[SUPPORTED_VLLM_SERIES[-1]]


class UnsupportedVllmVersionError(RuntimeError):
    pass


def _supported_text() -> str:
    return " or ".join(f"{series}.x" for series in SUPPORTED_VLLM_SERIES)


def vllm_series(version: str) -> str:
    """``"0.33"`` for ``"0.33.0"``, ``"0.33.1+cu130"``, ``"0.33.0rc1"``..."""
    return ".".join(version.split("+")[0].split(".")[:2])


def check_vllm_version(version: str | None = None) -> str:
    """Raise one clear error unless the installed vLLM is a supported release.

    Returns the version checked (the installed one when ``version`` is None).
    """
    if version is None:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as dist_version

        try:
            version = dist_version("vllm")
        except PackageNotFoundError:
            raise UnsupportedVllmVersionError(
                f"vllm-a2a-plugin's vLLM integration needs vLLM {_supported_text()}; "
                "vLLM is not installed") from None
    if vllm_series(version) not in TESTED_VLLM:
        tested = " and ".join(TESTED_VLLM.values())
        raise UnsupportedVllmVersionError(
            f"vllm-a2a-plugin supports vLLM {_supported_text()} (tested with {tested}); "
            f"found vLLM {version}. Install vllm=={NEWEST_VLLM} (or "
            f"{' / '.join(list(TESTED_VLLM.values())[:-1])}), or keep this plugin from "
            "loading with VLLM_PLUGINS=<the plugins you want>.")
    return version


def activation_scales_transposed(quant_config) -> bool:
    """True when vLLM asks for column-major block scales (``[H / 128, T]``).

    vLLM 0.33 added ``FusedMoEQuantConfig.is_scale_transposed`` (set only for
    FlashInfer TRT-LLM fp8 block experts, whose ``_supports_parallel_config``
    accepts allgather_reducescatter, deepep_v2 and FlashInfer's NVLink
    backends, not ours); 0.32 has no such field and always
    quantises to row-major ``[T, H / 128]`` scales, which is what we dispatch.
    """
    return bool(getattr(quant_config, "is_scale_transposed", False))


def modular_kernel_has_supports_dbo() -> bool:
    """True where the modular kernel asks ``prepare_finalize.supports_dbo()`` (0.33).

    0.33 runs a synchronous prepare/finalize under dual-batch overlap when it
    says ``supports_dbo()``; 0.32 has no such method and asserts that DBO is
    off on the synchronous path, so there a prepare/finalize must take the
    async entry points (``prepare_async`` / ``finalize_async``) to run under it.
    """
    import vllm.model_executor.layers.fused_moe.modular_kernel as mk

    return hasattr(mk.FusedMoEPrepareAndFinalizeModular, "supports_dbo")
