"""Loads the ``a2a_one_sided`` torch ops and gives them typed Python wrappers.

Two builds of one extension, named by what they hold (and the torch they
were built against, see :func:`extension_name`):

* ``_C_cuda_torch<v>``: the CUDA kernels plus the layout op and op schemas;
* ``_C_cpu_torch<v>``: the layout op and op schemas only (CPU installs share
  the layout with the kernels; the kernels are then unavailable).

``setup.py`` builds ``_C_cuda`` at install when :func:`kernel_build_decision`
says so (torch has CUDA, a GPU is visible, the toolkit is complete), else
``_C_cpu``. :func:`load` takes ``_C_cuda`` when it was built; otherwise, on a
machine where the kernels can be built now, it JIT-builds them with
``torch.utils.cpp_extension.load`` (first use on a GPU machine after a CPU-side
install); otherwise it takes ``_C_cpu`` (or JIT-builds that). A missing CUDA
toolkit piece becomes one error naming it (:func:`require_kernels`).
Nothing here initialises CUDA at import.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_a2a_plugin import envs

OP_NAMESPACE = "a2a_one_sided"
PHASE_SEND = 1
PHASE_WAIT = 2
PHASE_BOTH = PHASE_SEND | PHASE_WAIT

_SOURCES_CUDA = ("bindings.cpp", "dispatch.cu", "combine.cu")
_HEADERS = ("workspace_layout.h", "launch.h", "device_utils.cuh", "watchdog.h", "watchdog_abi.h")


def csrc_dir() -> Path:
    """The kernel sources: ``csrc/`` of a checkout, or the copy in a wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "csrc", here / "_csrc"):
        if (candidate / "bindings.cpp").is_file():
            return candidate
    raise FileNotFoundError(f"kernel sources not found next to {here}")


def sources_digest() -> str:
    """sha256 (16 hex digits) of the kernel sources and headers in :func:`csrc_dir`.

    setup.py compiles it into the extension (``-DA2A_SOURCES_DIGEST``, a marker
    string read from the file without loading it): an editable install keeps
    its library in the source tree, and after an edit of ``csrc/`` that library
    no longer matches the sources; :func:`load` then builds the sources instead.
    """
    src = csrc_dir()
    digest = hashlib.sha256()
    for name in _SOURCES_CUDA + _HEADERS:
        digest.update((src / name).read_bytes())
    return digest.hexdigest()[:16]


_DIGEST_MARKER = re.compile(rb"A2A_SOURCES_DIGEST=([0-9a-z]+);")


def built_sources_digest(library: Path) -> str | None:
    """The sources digest compiled into ``library``; None if it has none."""
    found = _DIGEST_MARKER.search(library.read_bytes())
    return found.group(1).decode() if found else None


# Toolkit files a CUDA build of ours needs, beyond nvcc: headers our sources
# include (bindings.cpp, *.cu) and those torch's ATen/cuda/CUDAContext.h pulls
# in (cuSPARSE, cuBLAS, cuBLASLt, cuSOLVER); the CUDA runtime to link with.
TOOLKIT_HEADERS = ("cuda_runtime_api.h", "cuda_runtime.h", "cuda.h", "cuda_bf16.h",
                   "cuda_fp16.h", "cusparse.h", "cublas_v2.h", "cublasLt.h", "cusolverDn.h")
TOOLKIT_LIBRARY = "libcudart.so"
# Searched by the host compiler without -I (torch never passes /usr/include).
_SYSTEM_INCLUDE_DIRS = ("/usr/include", "/usr/local/include")


class CudaToolchainError(RuntimeError):
    """The CUDA kernels cannot be built here; the message names what is missing."""


@dataclass(frozen=True)
class CudaToolchain:
    """What torch's extension tools would compile our kernels with.

    Attributes:
        cuda_home: the toolkit folder as torch finds it (``CUDA_HOME`` or
            ``CUDA_PATH``, else two levels above ``nvcc`` on ``PATH``, else
            ``/usr/local/cuda``); None when none was found.
        include_dirs: where the compiler looks for toolkit headers.
        missing: what a CUDA build would lack, one readable item each
            (empty: the toolchain is complete).
    """

    cuda_home: str | None
    include_dirs: tuple[str, ...]
    missing: tuple[str, ...]
    torch_cuda: str | None = torch.version.cuda

    @property
    def complete(self) -> bool:
        return not self.missing

    def problem(self) -> str | None:
        """One sentence naming what is missing, or None when complete."""
        if not self.missing:
            return None
        text = f"cannot build the a2a_one_sided CUDA kernels: missing {'; '.join(self.missing)}"
        if self.torch_cuda is None:
            return text
        return (f"{text} (CUDA_HOME={self.cuda_home or 'not found'}, as torch's extension "
                "tools find it: the CUDA_HOME or CUDA_PATH variable, else the folder above "
                "nvcc's bin/ on PATH, else /usr/local/cuda). Point CUDA_HOME at a complete "
                f"CUDA toolkit for torch's CUDA {self.torch_cuda}.")


def inspect_cuda_toolkit(cuda_home: str | None, include_dirs: list[str] | tuple[str, ...]
                         ) -> CudaToolchain:
    """Check a toolkit folder for what our CUDA build needs (no compiler runs).

    Args:
        cuda_home: toolkit folder (``bin/nvcc``, ``lib64`` or ``lib``), or None.
        include_dirs: the ``-I`` folders torch passes for CUDA headers; the
            system include folders are searched as well.
    """
    if not cuda_home:
        return CudaToolchain(None, tuple(include_dirs),
                             ("a CUDA toolkit (no CUDA_HOME, no nvcc on PATH, no /usr/local/cuda)",))
    home = Path(cuda_home)
    missing = []
    nvcc = home / "bin" / "nvcc"
    if not nvcc.is_file():
        missing.append(f"{nvcc}")
    dirs = [Path(d) for d in dict.fromkeys((*include_dirs, *_SYSTEM_INCLUDE_DIRS))]
    headers = [h for h in TOOLKIT_HEADERS if not any((d / h).is_file() for d in dirs)]
    if headers:
        missing.append(f"headers {', '.join(headers)} (searched {', '.join(map(str, dirs))})")
    lib_dirs = [home / "lib64", home / "lib"]
    if not any((d / TOOLKIT_LIBRARY).exists() for d in lib_dirs):
        missing.append(f"{TOOLKIT_LIBRARY} in {lib_dirs[0]} or {lib_dirs[1]}")
    return CudaToolchain(str(home), tuple(map(str, dirs)), tuple(missing))


def cuda_toolchain() -> CudaToolchain:
    """The toolchain torch's extension tools would use in this process."""
    if torch.version.cuda is None:
        return CudaToolchain(None, (), (f"a CUDA build of torch (this is torch "
                                        f"{torch.__version__}, CPU only)",), torch_cuda=None)
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    include_dirs: list[str] = []
    if home:
        # Torch's own include folders (under its package) hold no toolkit headers.
        torch_dir = Path(torch.__file__).resolve().parent
        include_dirs = [d for d in cpp_extension.include_paths("cuda")
                        if not Path(d).resolve().is_relative_to(torch_dir)]
    return inspect_cuda_toolkit(home, include_dirs)


def cuda_toolchain_available() -> bool:
    """True when torch has CUDA and the toolkit has what our build needs."""
    return cuda_toolchain().complete


@dataclass(frozen=True)
class KernelBuildDecision:
    """Whether to compile the CUDA kernels now, and why (one readable line)."""

    build_cuda: bool
    reason: str


def decide_kernel_build(*, mode: str, toolchain: CudaToolchain, gpu_visible: bool
                        ) -> KernelBuildDecision:
    """The build policy, a pure function of its inputs.

    Args:
        mode: ``VLLM_A2A_BUILD_KERNELS``: ``auto`` builds the kernels when a GPU
            is visible and the toolchain is complete; ``yes`` builds them
            wherever the toolchain is complete (e.g. an image built without a
            GPU) and raises :class:`CudaToolchainError` otherwise; ``no`` never.
        toolchain: from :func:`cuda_toolchain`.
        gpu_visible: ``torch.cuda.is_available()``.
    """
    if mode == "no":
        return KernelBuildDecision(False, "CUDA kernels not built: VLLM_A2A_BUILD_KERNELS=no")
    problem = toolchain.problem()
    if mode == "yes":
        if problem:
            raise CudaToolchainError(f"VLLM_A2A_BUILD_KERNELS=yes, but {problem}")
        return KernelBuildDecision(True, f"building the CUDA kernels with {toolchain.cuda_home}")
    if toolchain.torch_cuda is None:
        return KernelBuildDecision(
            False, f"CUDA kernels not built: torch {torch.__version__} is a CPU build")
    if not gpu_visible:
        later = ("they build on first use on a GPU machine (or set VLLM_A2A_BUILD_KERNELS=yes "
                 "to build them here)")
        if problem:
            later = f"they build on first use on a GPU machine with a complete toolkit; here, {problem}"
        return KernelBuildDecision(
            False, f"CUDA kernels not built: no CUDA GPU is visible; {later}")
    if problem:
        return KernelBuildDecision(False, f"CUDA kernels not built: {problem}")
    return KernelBuildDecision(True, f"building the CUDA kernels with {toolchain.cuda_home}")


def kernel_build_decision() -> KernelBuildDecision:
    """:func:`decide_kernel_build` for this process (setup.py and :func:`load`)."""
    mode = envs.build_kernels()
    toolchain = cuda_toolchain() if mode != "no" else CudaToolchain(None, (), ())
    gpu_visible = torch.version.cuda is not None and torch.cuda.is_available()
    return decide_kernel_build(mode=mode, toolchain=toolchain, gpu_visible=gpu_visible)


def nvcc_flags() -> list[str]:
    """Flags shared by setup.py and the JIT build: sm_90a (Hopper), sm_100a (Blackwell)."""
    archs = os.environ.get("VLLM_A2A_CUDA_ARCHS", "90a;100a").split(";")
    # No -std: torch's extension tools add the standard its own headers need
    # (torch 2.14's use C++20's <=>, so a fixed -std=c++17 broke the build);
    # our sources compile as C++17 and C++20.
    flags = ["-O3", "--use_fast_math", "-lineinfo", "-DA2A_WITH_CUDA"]
    for arch in filter(None, archs):
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    return flags


# Link libstdc++ as a shared library. Where only its static archive is found by
# the linker (seen on the H100 image: Ubuntu 24.04, g++ 13.3, torch 2.11), the
# extension carried its own copy of the C++ runtime, and every C++ exception it
# threw (every TORCH_CHECK on bad input) crashed the process with SIGSEGV
# instead of reaching Python as a RuntimeError: torch catches with the shared
# runtime. Naming the shared object first makes the archive unused.
LINK_FLAGS = ["-l:libstdc++.so.6"]


def _jit_build(with_cuda: bool) -> None:
    from torch.utils import cpp_extension

    src = csrc_dir()
    sources = [str(src / s) for s in (_SOURCES_CUDA if with_cuda else _SOURCES_CUDA[:1])]
    digest = hashlib.sha256(sources_digest().encode())
    digest.update(f"{torch.__version__}-{torch.version.cuda}-{with_cuda}".encode())
    digest.update(" ".join(nvcc_flags() + LINK_FLAGS).encode())
    name = f"a2a_one_sided_{digest.hexdigest()[:12]}"
    build_root = envs.extension_build_dir() or os.path.join(
        os.path.expanduser("~"), ".cache", "vllm_a2a_plugin"
    )
    build_dir = os.path.join(build_root, name)
    os.makedirs(build_dir, exist_ok=True)
    cflags = ["-O2"] + (["-DA2A_WITH_CUDA"] if with_cuda else [])
    cpp_extension.load(
        name=name,
        sources=sources,
        extra_cflags=cflags,
        extra_cuda_cflags=nvcc_flags() if with_cuda else None,
        extra_include_paths=[str(src)],
        extra_ldflags=LINK_FLAGS,
        build_directory=build_dir,
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=envs.jit_verbose(),
    )


# Why the loaded extension has (or lacks) the CUDA kernels, for require_kernels().
_load_note: list[str] = []


@functools.cache
def load() -> None:
    """Make the ``torch.ops.a2a_one_sided`` ops available (idempotent).

    Order: the installed ``_C_cuda``; else a JIT build of the kernels when
    :func:`kernel_build_decision` allows one here; else ``_C_cpu`` (installed
    or JIT-built).
    """
    if _ops_registered():
        return
    prebuilt_cuda = _prebuilt_library("cuda")
    if prebuilt_cuda is not None:
        torch.ops.load_library(str(prebuilt_cuda))  # registers the ops
        _load_note.append(f"loaded {prebuilt_cuda}")
    else:
        decision = kernel_build_decision()
        _load_note.append(decision.reason)
        if decision.build_cuda:
            _jit_build(with_cuda=True)
        else:
            prebuilt_cpu = _prebuilt_library("cpu")
            if prebuilt_cpu is not None:
                torch.ops.load_library(str(prebuilt_cpu))
            else:
                _jit_build(with_cuda=False)
    if not _ops_registered():
        raise RuntimeError("the a2a_one_sided extension loaded but registered no ops")
    _register_fakes()


def extension_name(kind: str) -> str:
    """Module name of the installed extension for this torch: ``_C_<kind>_torch<version>``.

    ``kind`` is ``cuda`` or ``cpu``. The torch version is in the name because
    C++ extensions only load with the torch they were built against, and one
    source tree may be installed (editable, built in place) into several
    environments, e.g. one per supported vLLM with its own torch.
    """
    tag = re.sub(r"[^0-9A-Za-z]+", "_", torch.__version__)
    return f"_C_{kind}_torch{tag}"


def _prebuilt_library(kind: str, here: Path | None = None) -> Path | None:
    """The extension setup.py built for this interpreter and torch, if any, and
    only if it was built from the sources beside it now (the digest compiled
    into it; a library without one is trusted, as older builds had none).

    It is a plain shared library (no Python module init), loaded with
    ``torch.ops.load_library``; the suffix must match this Python's ABI.
    """
    import importlib.machinery

    here = here or Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = here / f"{extension_name(kind)}{suffix}"
        if not candidate.is_file():
            continue
        built_from = built_sources_digest(candidate)
        if built_from not in (None, "unknown", sources_digest()):
            _load_note.append(f"{candidate.name} was built from other sources than "
                              f"{csrc_dir()} holds now; building those instead")
            return None
        return candidate
    return None


def _ops_registered() -> bool:
    try:
        torch.ops.a2a_one_sided.workspace_layout.default  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


def _register_fakes() -> None:
    # The ops return nothing and only mutate their marked arguments, so tracing
    # (torch.compile, meta tensors) needs no shapes from them.
    for op in ("dispatch", "combine", "dispatch_planned", "combine_planned"):
        qualname = f"{OP_NAMESPACE}::{op}"
        try:
            torch.library.register_fake(qualname)(lambda *args, **kwargs: None)
        except RuntimeError as exc:  # already registered in this process
            if "already" not in str(exc):
                raise


def kernels_available() -> bool:
    """True when this process can run the CUDA kernels (built with CUDA, GPU present)."""
    if not torch.cuda.is_available():
        return False
    load()
    return bool(torch.ops.a2a_one_sided.built_with_cuda())


def kernel_status() -> str:
    """One line for people: can this process run the CUDA kernels, and if not, why."""
    load()
    how = "; ".join(_load_note) or "the ops were already registered"
    if not torch.ops.a2a_one_sided.built_with_cuda():
        return how
    if not torch.cuda.is_available():
        return f"CUDA kernels built ({how}), but no CUDA GPU is visible"
    return f"CUDA kernels ready ({how})"


def require_kernels() -> None:
    """Raise a clear error when the CUDA kernels cannot run here."""
    if torch.version.cuda is None:
        raise RuntimeError(
            f"vllm_a2a_plugin's kernels need a CUDA build of torch; this is torch "
            f"{torch.__version__} (CPU only). Use the reference all-to-all on CPU."
        )
    if not torch.cuda.is_available():
        raise RuntimeError("vllm_a2a_plugin's kernels need a CUDA GPU; none is visible.")
    load()
    if not torch.ops.a2a_one_sided.built_with_cuda():
        raise CudaToolchainError(
            f"the a2a_one_sided extension has no CUDA kernels here ({'; '.join(_load_note)})")


def workspace_layout(
    *, ep_size: int, max_tokens_per_rank: int, top_k: int,
    payload_row_bytes: list[int], combine_row_bytes: int,
) -> list[int]:
    """Offsets from C++: ``[header, ids, weights, payload..., combine, total]``."""
    load()
    return list(
        torch.ops.a2a_one_sided.workspace_layout(
            ep_size, max_tokens_per_rank, top_k, list(payload_row_bytes), combine_row_bytes
        )
    )


def header_field_offsets() -> dict[str, int]:
    """Byte offsets of the header's fields (for tests and debugging)."""
    load()
    names = ("dispatch_flags", "combine_flags", "sender_runtime_tokens", "dispatch_epoch",
             "combine_epoch", "aborted", "header_bytes")
    return dict(zip(names, torch.ops.a2a_one_sided.header_field_offsets()))


def limits() -> dict[str, int]:
    """Compile-time limits of the kernels: ranks, payloads, top-k, experts."""
    load()
    names = ("max_ranks", "max_payloads", "max_top_k", "max_experts")
    return dict(zip(names, torch.ops.a2a_one_sided.limits()))


def combine_max_resident_blocks(device: int, threads_per_block: int) -> int:
    require_kernels()
    return int(torch.ops.a2a_one_sided.combine_max_resident_blocks(device, threads_per_block))


def max_threads_per_block(device: int) -> int:
    """The largest CUDA block both kernels can launch with on ``device`` (0: unknown)."""
    require_kernels()
    return int(torch.ops.a2a_one_sided.max_threads_per_block(device))
