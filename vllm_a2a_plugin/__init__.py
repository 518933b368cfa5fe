"""vllm-a2a-plugin: one-sided expert-parallel MoE all-to-all for LLM serving.

Public API (imported lazily so ``import vllm_a2a_plugin`` stays cheap and never
touches CUDA):

* :func:`register`: the ``vllm.general_plugins`` entry point;
* :func:`padding_expert_id`: the id padded top-k slots carry (never ``-1``);
* :class:`AllToAllSpec`, :class:`Workspace`, :class:`OneSidedAllToAll`,
  :class:`LocalRanks`, :class:`A2AConfig`: the all-to-all itself;
* :mod:`vllm_a2a_plugin.reference`: pure-torch semantics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
BACKEND_NAME = "a2a_one_sided"

_LAZY = {
    "padding_expert_id": "vllm_a2a_plugin.padding",
    "AllToAllSpec": "vllm_a2a_plugin.workspace",
    "Workspace": "vllm_a2a_plugin.workspace",
    "OneSidedAllToAll": "vllm_a2a_plugin.all_to_all",
    "DispatchResult": "vllm_a2a_plugin.all_to_all",
    "PHASE_BOTH": "vllm_a2a_plugin.all_to_all",
    "PHASE_SEND": "vllm_a2a_plugin.all_to_all",
    "LocalRanks": "vllm_a2a_plugin.local_ranks",
    "A2AConfig": "vllm_a2a_plugin.config",
    "A2AInputError": "vllm_a2a_plugin.errors",
    "A2AStateError": "vllm_a2a_plugin.errors",
    "A2ADeviceError": "vllm_a2a_plugin.errors",
    "A2ATimeoutError": "vllm_a2a_plugin.errors",
    "A2AMismatchError": "vllm_a2a_plugin.errors",
    "A2APeerLostError": "vllm_a2a_plugin.errors",
    "A2AExpertIdError": "vllm_a2a_plugin.errors",
}

__all__ = ["BACKEND_NAME", "register", *_LAZY]

if TYPE_CHECKING:
    from vllm_a2a_plugin.all_to_all import PHASE_BOTH, PHASE_SEND, DispatchResult, OneSidedAllToAll
    from vllm_a2a_plugin.config import A2AConfig
    from vllm_a2a_plugin.errors import (A2ADeviceError, A2AExpertIdError, A2AInputError,
                                        A2AMismatchError, A2APeerLostError, A2AStateError,
                                        A2ATimeoutError)
    from vllm_a2a_plugin.local_ranks import LocalRanks
    from vllm_a2a_plugin.padding import padding_expert_id
    from vllm_a2a_plugin.workspace import AllToAllSpec, Workspace


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vllm_a2a_plugin' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


def register() -> None:
    """vLLM general-plugin entry point: make ``--all2all-backend a2a_one_sided`` work.

    Idempotent and cheap: it patches vLLM's config now (vLLM has already imported
    it when plugins load) and installs import hooks for the modules it extends
    later; it never initialises CUDA. See :mod:`vllm_a2a_plugin.vllm.hooks`.
    """
    from vllm_a2a_plugin.vllm.hooks import install

    install()
