"""The kernels compile on their own (no torch) for Hopper and Blackwell, and the
CUDA half of the bindings compiles against torch's headers where a CUDA build of
torch brings the CUDA headers it needs (CI's vLLM 0.33 venv), GPU or not."""

from __future__ import annotations

import os
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


def _cuda_header_dirs() -> list[Path]:
    """Folders holding the CUDA headers torch's CUDA headers include (cuda_runtime.h,
    cusparse.h): the toolkit's, or the nvidia wheels a CUDA build of torch installs."""
    import torch

    roots = [Path(torch.__file__).resolve().parent.parent / "nvidia"]
    dirs = [d for root in roots if root.is_dir() for d in root.glob("*/include")]
    home = os.environ.get("CUDA_HOME")
    if home:
        dirs.append(Path(home) / "include")
    return dirs


def test_bindings_compile_with_cuda(tmp_path):
    """bindings.cpp with A2A_WITH_CUDA, syntax only (no toolkit libraries, no GPU):
    the launch-plan and op code that CPU-only builds leave out still compiles."""
    import sysconfig

    import torch
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        pytest.skip("torch is a CPU build: it has no CUDA headers to compile against")
    dirs = _cuda_header_dirs()
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler on PATH")
    includes = [*cpp_extension.include_paths(), *map(str, dirs),
                sysconfig.get_paths()["include"], str(CSRC)]

    def syntax_check(source: Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            [compiler, "-std=c++20", "-fsyntax-only", "-DA2A_WITH_CUDA",
             *(f"-I{d}" for d in includes), str(source)],
            capture_output=True, text=True, timeout=600)

    # torch's own CUDA headers first: where they do not compile (headers some
    # venvs' nvidia wheels lack, e.g. crt/host_defines.h), nothing of ours is wrong.
    probe = tmp_path / "torch_cuda_headers.cpp"
    probe.write_text("#include <ATen/cuda/CUDAContext.h>\n#include <c10/cuda/CUDAGuard.h>\n")
    proc = syntax_check(probe)
    if proc.returncode != 0:
        first = next((line for line in proc.stderr.splitlines() if "error" in line), "")
        pytest.skip(f"torch's CUDA headers do not compile here with {[str(d) for d in dirs]}: "
                    f"{first.strip()}")
    proc = syntax_check(CSRC / "bindings.cpp")
    assert proc.returncode == 0, proc.stderr[-4000:]


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


def test_a_library_built_from_other_sources_is_not_loaded(tmp_path):
    """setup.py compiles the sources digest into the library; an editable
    install's library built from sources since edited is skipped (load() builds
    the sources instead); one without a digest is trusted."""
    import importlib.machinery

    from vllm_a2a_plugin import ops

    library = tmp_path / f"{ops.extension_name('cpu')}{importlib.machinery.EXTENSION_SUFFIXES[0]}"
    library.write_bytes(b"\x7fELF no marker")
    assert ops._prebuilt_library("cpu", here=tmp_path) == library
    library.write_bytes(b"\x00A2A_SOURCES_DIGEST=" + ops.sources_digest().encode() + b";\x00")
    assert ops._prebuilt_library("cpu", here=tmp_path) == library
    library.write_bytes(b"\x00A2A_SOURCES_DIGEST=0123456789abcdef;\x00")
    assert ops._prebuilt_library("cpu", here=tmp_path) is None
    assert len(ops.sources_digest()) == 16


def test_installed_library_carries_the_digest_of_these_sources():
    """The library this checkout's install built (if any) names the sources it
    was built from, and they are the sources here (reinstall after editing csrc/)."""
    from vllm_a2a_plugin import ops

    library = ops._prebuilt_library("cuda") or ops._prebuilt_library("cpu")
    if library is None:
        pytest.skip("no installed library beside the sources (nothing built, or built from "
                    "other sources: load() JIT-builds then)")
    assert ops.built_sources_digest(library) == ops.sources_digest()
