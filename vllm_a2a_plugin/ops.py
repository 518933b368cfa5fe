"""Loads the ``a2a_one_sided`` torch ops and gives them typed Python wrappers.

The extension is normally built at install (``setup.py``): with CUDA kernels
when torch has CUDA and ``nvcc`` is found, otherwise a CPU-only build that
registers the layout op and the op schemas. If no built module is importable
(another Python, a source checkout), it is JIT-built on first use with
``torch.utils.cpp_extension.load``. Nothing here initialises CUDA at import.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
from pathlib import Path

import torch

from vllm_a2a_plugin import envs

OP_NAMESPACE = "a2a_one_sided"
PHASE_SEND = 1
PHASE_WAIT = 2
PHASE_BOTH = PHASE_SEND | PHASE_WAIT

_SOURCES_CUDA = ("bindings.cpp", "dispatch.cu", "combine.cu")
_HEADERS = ("workspace_layout.h", "launch.h", "device_utils.cuh")


def csrc_dir() -> Path:
    """The kernel sources: ``csrc/`` of a checkout, or the copy in a wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "csrc", here / "_csrc"):
        if (candidate / "bindings.cpp").is_file():
            return candidate
    raise FileNotFoundError(f"kernel sources not found next to {here}")


def cuda_toolchain_available() -> bool:
    """True when torch has CUDA and nvcc can be found (kernels can be built)."""
    if torch.version.cuda is None:
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None or shutil.which("nvcc") is not None


def nvcc_flags() -> list[str]:
    """Flags shared by setup.py and the JIT build: sm_90a (Hopper), sm_100a (Blackwell)."""
    archs = os.environ.get("VLLM_A2A_CUDA_ARCHS", "90a;100a").split(";")
    flags = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "-DA2A_WITH_CUDA"]
    for arch in filter(None, archs):
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    return flags


def _jit_build() -> None:
    from torch.utils import cpp_extension

    src = csrc_dir()
    with_cuda = cuda_toolchain_available()
    sources = [str(src / s) for s in (_SOURCES_CUDA if with_cuda else _SOURCES_CUDA[:1])]
    digest = hashlib.sha256()
    for name in _SOURCES_CUDA + _HEADERS:
        digest.update((src / name).read_bytes())
    digest.update(f"{torch.__version__}-{torch.version.cuda}-{with_cuda}".encode())
    digest.update(" ".join(nvcc_flags()).encode())
    name = f"a2a_one_sided_{digest.hexdigest()[:12]}"
    build_root = envs.extension_build_dir() or os.path.join(
        os.path.expanduser("~"), ".cache", "vllm_a2a_plugin"
    )
    build_dir = os.path.join(build_root, name)
    os.makedirs(build_dir, exist_ok=True)
    cflags = ["-O2", "-std=c++17"] + (["-DA2A_WITH_CUDA"] if with_cuda else [])
    cpp_extension.load(
        name=name,
        sources=sources,
        extra_cflags=cflags,
        extra_cuda_cflags=nvcc_flags() if with_cuda else None,
        extra_include_paths=[str(src)],
        build_directory=build_dir,
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=envs.jit_verbose(),
    )


@functools.cache
def load() -> None:
    """Make the ``torch.ops.a2a_one_sided`` ops available (idempotent)."""
    if _ops_registered():
        return
    prebuilt = _prebuilt_library()
    if prebuilt is not None:
        torch.ops.load_library(str(prebuilt))  # registers the ops
    else:
        _jit_build()
    if not _ops_registered():
        raise RuntimeError("the a2a_one_sided extension loaded but registered no ops")
    _register_fakes()


def _prebuilt_library() -> Path | None:
    """The extension setup.py built for this interpreter, if any.

    It is a plain shared library (no Python module init), loaded with
    ``torch.ops.load_library``; the suffix must match this Python's ABI.
    """
    import importlib.machinery

    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = here / f"_C{suffix}"
        if candidate.is_file():
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
    for op in ("dispatch", "combine"):
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
        raise RuntimeError(
            "the a2a_one_sided extension was built without CUDA (nvcc was not found "
            "at build time); reinstall with nvcc on PATH or set CUDA_HOME."
        )


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
             "combine_epoch", "header_bytes")
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
