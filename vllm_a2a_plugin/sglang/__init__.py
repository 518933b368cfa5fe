"""SGLang adapter: ``--moe-a2a-backend a2a_one_sided``.

* :func:`register`: the ``sglang.srt.plugins`` entry point (SGLang's
  ``load_plugins()`` runs it in every SGLang process);
* :mod:`vllm_a2a_plugin.sglang.hooks`: the one module that patches SGLang;
* :mod:`vllm_a2a_plugin.sglang.dispatcher`: our ``BaseDispatcher``.

Nothing here imports vLLM; nothing in :mod:`vllm_a2a_plugin.vllm` imports SGLang.
"""

from __future__ import annotations


def register() -> None:
    """SGLang general-plugin entry point (idempotent, never touches CUDA)."""
    import os

    from vllm_a2a_plugin.sglang.hooks import install

    install()
    # Engine tests only: lets Engine.collective_rpc read our device counters
    # (vllm_a2a_plugin.testing.sglang_engine_check).
    if os.environ.get("VLLM_A2A_SGLANG_COUNTERS_RPC") == "1":
        from vllm_a2a_plugin.testing.sglang_engine_check import install_counter_rpc

        install_counter_rpc()
