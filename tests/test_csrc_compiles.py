"""The kernels compile on their own (no torch) for Hopper and Blackwell."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "csrc"
NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("arch", ["90a", "100a"])
def test_kernels_compile_with_nvcc(arch, tmp_path):
    for source in ("dispatch.cu", "combine.cu"):
        proc = subprocess.run(
            [NVCC, "-std=c++17", "-O3", "--use_fast_math", "-Xptxas", "-v",
             f"-gencode=arch=compute_{arch},code=sm_{arch}", "-I", str(CSRC), "-c",
             str(CSRC / source), "-o", str(tmp_path / f"{source}.o")],
            capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        assert (tmp_path / f"{source}.o").stat().st_size > 0
        assert f"sm_{arch}" in proc.stderr  # ptxas reported on the requested target


def test_bindings_build_for_cpu_torch():
    """The CPU-only extension (layout op + schemas) is what CPU installs load."""
    import torch

    from vllm_a2a_plugin import ops

    ops.load()
    assert torch.ops.a2a_one_sided.workspace_layout.default is not None
    schema = str(torch.ops.a2a_one_sided.dispatch.default._schema)
    assert "Tensor(a!) workspace" in schema and "int error_record_ptr" in schema
    planned = str(torch.ops.a2a_one_sided.dispatch_planned.default._schema)
    assert "int plan, Tensor(a!) workspace" in planned
    assert "Tensor(b!) out" in str(torch.ops.a2a_one_sided.combine_planned.default._schema)
    if torch.version.cuda is None:
        assert not torch.ops.a2a_one_sided.built_with_cuda()
