"""How the install decides whether to compile the CUDA kernels (CPU only).

A fake toolkit folder in ``tmp_path`` stands for CUDA_HOME: complete, or
lacking the pieces that broke installs on machines with a CUDA build of torch
and no full toolkit (``cuda_runtime_api.h`` when nvcc sits outside a toolkit
folder, ``cusparse.h`` in a minimal toolkit)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vllm_a2a_plugin import envs, ops

ROOT = Path(__file__).resolve().parent.parent


def make_toolkit(root: Path, *, without: tuple[str, ...] = (), lib_dir: str = "lib64") -> Path:
    """A folder shaped like a CUDA toolkit, minus the named files."""
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / lib_dir).mkdir()
    files = [f"include/{h}" for h in ops.TOOLKIT_HEADERS]
    files += ["bin/nvcc", f"{lib_dir}/{ops.TOOLKIT_LIBRARY}"]
    for rel in files:
        if Path(rel).name not in without:
            (root / rel).write_text("")
    return root


def test_complete_toolkit_is_complete(tmp_path):
    home = make_toolkit(tmp_path / "cuda")
    toolchain = ops.inspect_cuda_toolkit(str(home), [str(home / "include")])
    assert toolchain.complete and toolchain.problem() is None
    assert toolchain.cuda_home == str(home)


def test_runtime_in_lib_instead_of_lib64_is_accepted(tmp_path):
    home = make_toolkit(tmp_path / "cuda", lib_dir="lib")
    assert ops.inspect_cuda_toolkit(str(home), [str(home / "include")]).complete


def test_minimal_toolkit_names_the_missing_library_headers(tmp_path):
    """A toolkit without cuSPARSE/cuBLAS headers: the one message names them and the folder."""
    home = make_toolkit(tmp_path / "cuda", without=("cusparse.h", "cublas_v2.h"))
    toolchain = ops.inspect_cuda_toolkit(str(home), [str(home / "include")])
    assert not toolchain.complete
    problem = toolchain.problem()
    assert "cusparse.h, cublas_v2.h" in problem
    assert "cuda_runtime_api.h" not in problem
    assert str(home / "include") in problem
    if toolchain.torch_cuda is not None:
        assert f"CUDA_HOME={home}" in problem


def test_nvcc_outside_a_toolkit_names_the_runtime_header(tmp_path):
    """nvcc on PATH in <prefix>/bin without <prefix>/include: torch guesses <prefix>."""
    prefix = tmp_path / "usr_local"
    (prefix / "bin").mkdir(parents=True)
    (prefix / "bin" / "nvcc").write_text("#!/bin/sh\n")
    toolchain = ops.inspect_cuda_toolkit(str(prefix), [str(prefix / "include")])
    problem = toolchain.problem()
    assert "cuda_runtime_api.h" in problem
    assert f"{ops.TOOLKIT_LIBRARY} in {prefix / 'lib64'}" in problem
    assert str(prefix / "bin" / "nvcc") not in problem


def test_headers_found_in_an_extra_include_dir(tmp_path):
    """CUDA_INC_PATH-style extra folders (torch passes them with -I) count."""
    home = make_toolkit(tmp_path / "cuda", without=("cusolverDn.h",))
    extra = tmp_path / "more_include"
    extra.mkdir()
    (extra / "cusolverDn.h").write_text("")
    assert not ops.inspect_cuda_toolkit(str(home), [str(home / "include")]).complete
    assert ops.inspect_cuda_toolkit(str(home), [str(home / "include"), str(extra)]).complete


def test_no_toolkit_at_all():
    toolchain = ops.inspect_cuda_toolkit(None, [])
    assert "no CUDA_HOME, no nvcc on PATH" in toolchain.problem()


def _toolchain(tmp_path, complete: bool, torch_cuda="13.0") -> ops.CudaToolchain:
    home = make_toolkit(tmp_path / "cuda", without=() if complete else ("cusparse.h",))
    found = ops.inspect_cuda_toolkit(str(home), [str(home / "include")])
    return ops.CudaToolchain(found.cuda_home, found.include_dirs, found.missing, torch_cuda)


@pytest.mark.parametrize("complete", [True, False])
def test_auto_without_a_gpu_never_compiles_and_says_why(tmp_path, complete):
    decision = ops.decide_kernel_build(mode="auto", toolchain=_toolchain(tmp_path, complete),
                                       gpu_visible=False)
    assert not decision.build_cuda
    assert "no CUDA GPU is visible" in decision.reason
    assert ("cusparse.h" in decision.reason) == (not complete)


def test_auto_with_a_gpu(tmp_path):
    good = ops.decide_kernel_build(mode="auto", toolchain=_toolchain(tmp_path / "a", True),
                                   gpu_visible=True)
    assert good.build_cuda
    bad = ops.decide_kernel_build(mode="auto", toolchain=_toolchain(tmp_path / "b", False),
                                  gpu_visible=True)
    assert not bad.build_cuda and "cusparse.h" in bad.reason


def test_auto_with_cpu_torch(tmp_path):
    decision = ops.decide_kernel_build(
        mode="auto", toolchain=_toolchain(tmp_path, True, torch_cuda=None), gpu_visible=False)
    assert not decision.build_cuda and "CPU build" in decision.reason


def test_yes_builds_without_a_gpu_or_raises_one_clear_error(tmp_path):
    assert ops.decide_kernel_build(mode="yes", toolchain=_toolchain(tmp_path / "a", True),
                                   gpu_visible=False).build_cuda
    with pytest.raises(ops.CudaToolchainError, match=r"VLLM_A2A_BUILD_KERNELS=yes.*cusparse\.h"):
        ops.decide_kernel_build(mode="yes", toolchain=_toolchain(tmp_path / "b", False),
                                gpu_visible=True)


def test_no_never_builds(tmp_path):
    assert not ops.decide_kernel_build(mode="no", toolchain=_toolchain(tmp_path, True),
                                       gpu_visible=True).build_cuda


def test_build_kernels_setting(monkeypatch):
    for raw, expected in [("", "auto"), ("AUTO", "auto"), ("1", "yes"), ("yes", "yes"),
                          ("off", "no")]:
        monkeypatch.setenv("VLLM_A2A_BUILD_KERNELS", raw)
        assert envs.build_kernels() == expected
    monkeypatch.setenv("VLLM_A2A_BUILD_KERNELS", "sometimes")
    with pytest.raises(ValueError, match="auto, yes or no"):
        envs.build_kernels()


def _setup_py(tmp_path, **env) -> subprocess.CompletedProcess:
    """``setup.py --name``: runs the build decision (as pip does) without compiling."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")}
    full_env.update(env)
    return subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=300)


def test_setup_py_with_an_incomplete_cuda_home_installs_without_kernels(tmp_path):
    """torch's extension tools read CUDA_HOME; the install goes on without the
    kernels and says why, naming the missing header when torch has CUDA."""
    home = make_toolkit(tmp_path / "cuda", without=("cusparse.h",))
    proc = _setup_py(tmp_path, CUDA_HOME=str(home), VLLM_A2A_BUILD_KERNELS="auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "vllm-a2a-plugin" in proc.stdout
    assert "vllm-a2a-plugin: CUDA kernels not built" in proc.stderr
    if torch.version.cuda is None:
        assert "CPU build" in proc.stderr
    elif not torch.cuda.is_available():
        assert "no CUDA GPU is visible" in proc.stderr and "cusparse.h" in proc.stderr
    else:
        assert "cusparse.h" in proc.stderr


def test_setup_py_forced_build_fails_with_one_message(tmp_path):
    home = make_toolkit(tmp_path / "cuda", without=("cuda_runtime_api.h",))
    proc = _setup_py(tmp_path, CUDA_HOME=str(home), VLLM_A2A_BUILD_KERNELS="yes")
    assert proc.returncode != 0
    assert "CudaToolchainError: VLLM_A2A_BUILD_KERNELS=yes, but cannot build" in proc.stderr
    expected = "cuda_runtime_api.h" if torch.version.cuda is not None else "a CUDA build of torch"
    assert expected in proc.stderr


def test_kernel_status_says_why_not_on_this_machine():
    status = ops.kernel_status()
    if not torch.ops.a2a_one_sided.built_with_cuda():
        assert status.startswith("CUDA kernels not built: "), status
        with pytest.raises(RuntimeError) as info:
            ops.require_kernels()
        if torch.cuda.is_available():  # the one error names what the toolkit lacks
            assert isinstance(info.value, ops.CudaToolchainError) and status in str(info.value)
    elif torch.cuda.is_available():
        assert status.startswith("CUDA kernels ready"), status
    else:
        assert "no CUDA GPU is visible" in status
