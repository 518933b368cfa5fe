"""Builds the ``vllm_a2a_plugin`` extension at install.

* ``vllm_a2a_plugin._C_cuda_torch<version>`` (the CUDA kernels for sm_90a and sm_100a;
  override with VLLM_A2A_CUDA_ARCHS, e.g. "90a") when
  ``ops.kernel_build_decision()`` says so: torch has CUDA, a GPU is visible and
  the CUDA toolkit as torch's extension tools find it (CUDA_HOME) has every
  header and library the build needs. ``VLLM_A2A_BUILD_KERNELS=yes`` builds
  them without a GPU (and fails with one message naming what the toolkit
  lacks); ``=no`` never builds them.
* otherwise ``vllm_a2a_plugin._C_cpu_torch<version>``, a CPU-only build (workspace layout op
  and op schemas), so CPU installs share the layout with the kernels; the
  install says why the kernels were not built, and a GPU machine JIT-builds
  them on first use (``vllm_a2a_plugin/ops.py``).

Entry points come from the top-level entry_points.txt (one source of truth).
Install without build isolation so the build sees the torch you run with:
``pip install --no-build-isolation -e .``
"""

import configparser
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent
sys.path.insert(0, str(ROOT))


def read_entry_points() -> dict[str, list[str]]:
    parser = configparser.ConfigParser()
    parser.optionxform = str
    parser.read(ROOT / "entry_points.txt")
    return {group: [f"{k} = {v}" for k, v in parser[group].items()] for group in parser.sections()}


class BuildPyWithSources(build_py):
    """Ship csrc/ inside the wheel (vllm_a2a_plugin/_csrc) for JIT rebuilds."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "vllm_a2a_plugin" / "_csrc"
        target.mkdir(parents=True, exist_ok=True)
        for src in (ROOT / "csrc").iterdir():
            if src.is_file():
                shutil.copy2(src, target / src.name)


def extensions():
    if os.environ.get("VLLM_A2A_SKIP_BUILD"):
        return [], {}
    import torch  # noqa: F401
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    from vllm_a2a_plugin.ops import (LINK_FLAGS, extension_name, kernel_build_decision,
                                     nvcc_flags, sources_digest)

    include = [str(ROOT / "csrc")]
    # Unquoted: build.ninja runs the command through a shell; bindings.cpp
    # turns the token into its marker string.
    digest = f"-DA2A_SOURCES_DIGEST={sources_digest()}"
    decision = kernel_build_decision()
    # pip shows this with -v; the install script prints ops.kernel_status() too.
    print(f"vllm-a2a-plugin: {decision.reason}", file=sys.stderr)
    if decision.build_cuda:
        ext = CUDAExtension(
            f"vllm_a2a_plugin.{extension_name('cuda')}",
            sources=["csrc/bindings.cpp", "csrc/dispatch.cu", "csrc/combine.cu"],
            include_dirs=include,
            extra_compile_args={"cxx": ["-O2", "-DA2A_WITH_CUDA", digest],
                                "nvcc": nvcc_flags()},
            extra_link_args=LINK_FLAGS,
        )
    else:
        ext = CppExtension(
            f"vllm_a2a_plugin.{extension_name('cpu')}",
            sources=["csrc/bindings.cpp"],
            include_dirs=include,
            extra_compile_args=["-O2", digest],
            extra_link_args=LINK_FLAGS,
        )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extensions()
cmdclass["build_py"] = BuildPyWithSources
setup(ext_modules=ext_modules, cmdclass=cmdclass, entry_points=read_entry_points())
