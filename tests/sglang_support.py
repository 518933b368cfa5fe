"""What the SGLang tests share: importing SGLang's MoE layers, or the one reason not to.

SGLang 0.5.23 imports its compiled ``sgl_kernel`` package from its MoE and
quantization modules whenever ``torch.cuda`` is available (e.g.
``layers/quantization/compressed_tensors/schemes/compressed_tensors_w8a8_int8.py``),
and that wheel is built for SGLang's torch 2.14.1 only. So on a GPU machine with
another torch, those modules cannot be imported, and that alone is a skip; every
other import error still fails the test.
"""

from __future__ import annotations

import importlib

import pytest

SGLANG_MOE_LAYER = "sglang.srt.layers.moe.fused_moe_triton.layer"


def import_or_skip_without_sgl_kernel(module: str = SGLANG_MOE_LAYER):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != "sgl_kernel":
            raise
        pytest.skip(f"importing {module} needs SGLang's compiled sgl_kernel on a CUDA "
                    f"machine, and it is not installed here (its wheel is built for torch "
                    f"2.14.1): {exc}")
