"""The only place that reads environment variables (vLLM's ``envs.py`` pattern).

Values are read when asked for, not at import, so tests can set them.
"""

from __future__ import annotations

import os


def timeout_seconds(default: float) -> float:
    """``VLLM_A2A_TIMEOUT_S``: how long a rank waits for a peer before failing."""
    raw = os.environ.get("VLLM_A2A_TIMEOUT_S")
    if raw is None or raw == "":
        return default
    value = float(raw)
    if value <= 0:
        raise ValueError(f"VLLM_A2A_TIMEOUT_S must be positive, got {raw!r}")
    return value


def check_expert_ids(default: bool) -> bool:
    """``VLLM_A2A_CHECK_IDS``: validate top-k ids on the host (costs a sync)."""
    raw = os.environ.get("VLLM_A2A_CHECK_IDS")
    if raw is None or raw == "":
        return default
    return raw.strip().lower() in ("1", "true", "yes", "on")


def extension_build_dir() -> str | None:
    """``VLLM_A2A_BUILD_DIR``: where the JIT build of the extension goes."""
    return os.environ.get("VLLM_A2A_BUILD_DIR") or None


def build_kernels() -> str:
    """``VLLM_A2A_BUILD_KERNELS``: ``auto`` (default), ``yes`` or ``no``.

    When the CUDA kernels are compiled (at install and on first use): ``auto``
    when torch has CUDA, a GPU is visible and the toolkit is complete; ``yes``
    wherever the toolkit is complete (an error naming what is missing
    otherwise), e.g. an image built on a machine without a GPU; ``no`` never.
    """
    raw = (os.environ.get("VLLM_A2A_BUILD_KERNELS") or "auto").strip().lower()
    aliases = {"1": "yes", "true": "yes", "on": "yes", "0": "no", "false": "no", "off": "no"}
    raw = aliases.get(raw, raw)
    if raw not in ("auto", "yes", "no"):
        raise ValueError(f"VLLM_A2A_BUILD_KERNELS must be auto, yes or no, got {raw!r}")
    return raw


def jit_verbose() -> bool:
    """``VLLM_A2A_JIT_VERBOSE``: print the compiler's output during a JIT build."""
    return os.environ.get("VLLM_A2A_JIT_VERBOSE", "") not in ("", "0")


def workspace_allocation() -> str:
    """``VLLM_A2A_WORKSPACE``: ``auto`` (default), ``symmetric`` or ``cuda_ipc``.

    ``auto`` uses torch symmetric memory when every EP rank has its own GPU and
    falls back to CUDA IPC when ranks share one or symmetric memory fails.
    """
    raw = (os.environ.get("VLLM_A2A_WORKSPACE") or "auto").strip().lower()
    if raw not in ("auto", "symmetric", "cuda_ipc"):
        raise ValueError(
            f"VLLM_A2A_WORKSPACE must be auto, symmetric or cuda_ipc, got {raw!r}")
    return raw


def single_rank_test_mode() -> bool:
    """``VLLM_A2A_TEST_SINGLE_RANK_EP``: test-only engine mode, see
    :mod:`vllm_a2a_plugin.vllm.single_rank_mode`."""
    return os.environ.get("VLLM_A2A_TEST_SINGLE_RANK_EP", "") not in ("", "0")


def peer_interval_seconds(default: float) -> float:
    """``VLLM_A2A_PEER_INTERVAL_S``: how long a peer's heartbeat may stand still
    before the watchdog reports it lost (``0`` turns the watchdog off: then only
    the device timeout ends a wait on a lost peer)."""
    raw = os.environ.get("VLLM_A2A_PEER_INTERVAL_S")
    if raw is None or raw == "":
        return default
    value = float(raw)
    if value < 0:
        raise ValueError(f"VLLM_A2A_PEER_INTERVAL_S must be >= 0, got {raw!r}")
    return value


# Set by the vLLM plugin in vLLM's engine core process before it starts its
# workers, so they (who inherit it) know their parent is that engine core.
ENGINE_CORE_PID = "VLLM_A2A_ENGINE_CORE_PID"


def engine_core_parent_pid() -> int:
    """The pid of vLLM's engine core if it is this process's parent (this is one
    of its workers), else 0: the process a worker that exits after a loss ends
    too (see :class:`vllm_a2a_plugin.watchdog.PeerWatchdog`)."""
    raw = os.environ.get(ENGINE_CORE_PID, "")
    if not raw.isdigit():
        return 0
    pid = int(raw)
    return pid if pid == os.getppid() else 0


# In vLLM and SGLang engines: a DP rank that lost an EP peer cannot go on (its
# group cannot be rebuilt in place), so a rank whose step is blocked with the
# lost peer ends rather than serve a frozen endpoint.
ENGINE_PEER_LOST_EXIT_S = 5.0


def peer_lost_exit_seconds(default: float = 0.0) -> float:
    """``VLLM_A2A_PEER_LOST_EXIT_S``: end the process this long after the watchdog
    saw a peer lost and nothing rearmed it (``0``: never; unset: ``default``).
    For engines whose step can block in a host collective with the lost peer."""
    raw = os.environ.get("VLLM_A2A_PEER_LOST_EXIT_S")
    if raw is None or raw == "":
        return default
    value = float(raw)
    if value < 0:
        raise ValueError(f"VLLM_A2A_PEER_LOST_EXIT_S must be >= 0, got {raw!r}")
    return value


DBO_SCHEDULES = ("comm_stream", "recv_hooks")


def dbo_schedule() -> str:
    """``VLLM_A2A_DBO_SCHEDULE``: how our all-to-all runs in steps vLLM splits
    for dual-batch overlap (``--enable-dbo``).

    ``comm_stream`` (default): each fused dispatch/combine on vLLM's comm stream
    while the other micro-batch computes (data movement and waiting both hidden).
    ``recv_hooks``: DeepEP-low-latency's pattern: the send launch on the compute
    stream, the wait launch handed to vLLM as a receive hook that the other
    micro-batch runs after its own work (only the waiting is hidden).
    """
    raw = (os.environ.get("VLLM_A2A_DBO_SCHEDULE") or DBO_SCHEDULES[0]).strip().lower()
    if raw not in DBO_SCHEDULES:
        raise ValueError(
            f"VLLM_A2A_DBO_SCHEDULE must be one of {', '.join(DBO_SCHEDULES)}, got {raw!r}")
    return raw


def engine_config():
    """The :class:`~vllm_a2a_plugin.config.A2AConfig` of the vLLM and SGLang
    integrations, from the environment: device timeout 120 s, no host check of
    expert ids (the engines' routers produce valid ids; the kernels still guard
    memory), and the lost-peer exit after ``ENGINE_PEER_LOST_EXIT_S``."""
    from vllm_a2a_plugin.config import A2AConfig

    return A2AConfig(timeout_s=timeout_seconds(120.0),
                     check_expert_ids=check_expert_ids(False),
                     peer_lost_exit_s=peer_lost_exit_seconds(ENGINE_PEER_LOST_EXIT_S))
