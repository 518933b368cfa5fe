"""Tunables of the one-sided all-to-all, as one validated, frozen object."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from vllm_a2a_plugin.errors import A2AInputError


@dataclass(frozen=True)
class A2AConfig:
    """Launch and safety settings; defaults suit one rank per GPU.

    Attributes:
        threads_per_block: CUDA threads per block (a multiple of 32); one warp
            moves one piece of a token's row (a row is cut into more pieces
            when there are few tokens, so small batches still fill the GPU).
        max_blocks: upper bound on the grid of each launch; 0 means "as many as
            the work needs, up to 2 per SM". Several logical ranks sharing one
            GPU must bound it so every rank's combine grid is resident at once.
        timeout_s: how long a rank waits for a peer's flag before recording a
            timeout (device side, ``%globaltimer``).
        check_expert_ids: validate top-k ids on the host before each dispatch.
            It costs a device-to-host sync, so it is skipped under CUDA-graph
            capture; the kernels still guard memory and record bad ids.
        peer_lost_exit_s: end the process this long after its peer watchdog saw
            an EP peer lost and nothing rearmed it (0: never; None: from
            ``VLLM_A2A_PEER_LOST_EXIT_S``, else never). For engines, whose step
            may block in a host collective with the lost peer where no wait of
            ours can end it (see :class:`vllm_a2a_plugin.watchdog.PeerWatchdog`).
    """

    threads_per_block: int = 256
    max_blocks: int = 0
    timeout_s: float = 120.0
    check_expert_ids: bool = True
    peer_lost_exit_s: float | None = None

    def __post_init__(self) -> None:
        if self.threads_per_block % 32 or not 32 <= self.threads_per_block <= 1024:
            raise A2AInputError(
                f"threads_per_block ({self.threads_per_block}) must be a multiple of 32 "
                "in [32, 1024]"
            )
        if self.max_blocks < 0:
            raise A2AInputError(f"max_blocks ({self.max_blocks}) must be >= 0")
        if not self.timeout_s > 0:
            raise A2AInputError(f"timeout_s ({self.timeout_s}) must be positive")
        if self.peer_lost_exit_s is not None and not self.peer_lost_exit_s >= 0:
            raise A2AInputError(f"peer_lost_exit_s ({self.peer_lost_exit_s}) must be >= 0")

    @property
    def timeout_ns(self) -> int:
        return int(self.timeout_s * 1e9)

    def replace(self, **changes) -> "A2AConfig":
        return dataclasses.replace(self, **changes)
