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
    from vllm_a2a_plugin.sglang.hooks import install

    install()
