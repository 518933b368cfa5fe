"""Several logical EP ranks in one process on one GPU (design §8).

Only allocation differs from the multi-GPU path: ``ep_size`` workspaces on one
device and one :class:`OneSidedAllToAll` per rank, all writing through the same
kernels. Two ways to drive them:

* ``"split"``: on the current stream, the send phase of every rank, then the
  wait phase of every rank. No launch ever waits for a kernel that has not
  started, so it also works where kernels are serialised (compute-sanitizer).
* ``"concurrent"``: each rank's fused launches on its own stream, all in
  flight at once, exactly as separate GPUs would run them. Grids are bounded so
  every rank's combine blocks are resident together, and every rank's stream
  needs its own hardware queue: two ranks whose streams share a queue wait on
  each other forever (until the timeout). So concurrent mode requires
  ``CUDA_DEVICE_MAX_CONNECTIONS >= ep_size + 1`` set before CUDA initialises
  (the tests and benchmarks set 32).

Failures: every rank keeps its own sticky device error (see
:meth:`OneSidedAllToAll.check_errors`); :meth:`LocalRanks.dispatch` and
:meth:`LocalRanks.combine` refuse to start while any rank has failed, so one
rank's error never leaves the others half-launched, and :meth:`LocalRanks.recover`
resets all of them together.

Lost peers: the ranks share one abort word (every rank is in this process), and
:meth:`LocalRanks.start_watchdog` runs the peer watchdog over them, one heartbeat
per logical rank; :meth:`LocalRanks.lose_rank` stops one rank's heartbeat, so a
simulated lost peer takes the path a stopped peer process takes.
"""

from __future__ import annotations

from collections.abc import Sequence

import os

import torch

from vllm_a2a_plugin import ops
from vllm_a2a_plugin.all_to_all import PHASE_BOTH, PHASE_SEND, DispatchResult, OneSidedAllToAll
from vllm_a2a_plugin.config import A2AConfig
from vllm_a2a_plugin.errors import A2ADeviceError, A2AInputError
from vllm_a2a_plugin.validation import check_expert_ids_in_range, is_capturing
from vllm_a2a_plugin.watchdog import DEFAULT_INTERVAL_S, AbortWord, PeerWatchdog
from vllm_a2a_plugin.workspace import AllToAllSpec, Workspace

MODES = ("split", "concurrent")
_CUDA_DEFAULT_MAX_CONNECTIONS = 8


def _check_hardware_queues(ep_size: int) -> None:
    raw = os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS", "")
    connections = int(raw) if raw.strip() else _CUDA_DEFAULT_MAX_CONNECTIONS
    if connections < ep_size + 1:
        raise A2AInputError(
            f"concurrent mode with {ep_size} ranks needs CUDA_DEVICE_MAX_CONNECTIONS >= "
            f"{ep_size + 1} (it is {connections}): ranks whose streams share a hardware queue "
            "deadlock. Set it (e.g. 32) before CUDA initialises, or use mode='split'."
        )


class LocalRanks:
    """``spec.ep_size`` ranks on one CUDA device, driven together.

    Args:
        spec: what each step may carry.
        mode: ``"split"`` or ``"concurrent"`` (see module docstring).
        expert_owner: owner table shared by all ranks (default linear).
        config: launch settings; in concurrent mode ``max_blocks`` is capped so
            that all ranks' combine grids fit on the GPU at once.
        device: CUDA device (default current).
        abort: the abort word every rank's kernels poll (default: a new one,
            this object's own).
    """

    def __init__(self, spec: AllToAllSpec, *, mode: str = "split",
                 expert_owner: torch.Tensor | None = None, config: A2AConfig | None = None,
                 device: torch.device | str | None = None, abort: AbortWord | None = None):
        if mode not in MODES:
            raise A2AInputError(f"mode must be one of {MODES}, got {mode!r}")
        self.spec = spec
        self.mode = mode
        self.workspace = Workspace.allocate_local(spec, device)
        config = config or A2AConfig()
        if mode == "concurrent":
            _check_hardware_queues(spec.ep_size)
            device_index = self.workspace.device.index or 0
            resident = ops.combine_max_resident_blocks(device_index, config.threads_per_block)
            share = max(1, resident // spec.ep_size)
            if config.max_blocks == 0 or config.max_blocks > share:
                config = config.replace(max_blocks=share)
        self.config = config
        self.abort = abort if abort is not None else AbortWord()
        self.watchdog: PeerWatchdog | None = None
        self.ranks = [OneSidedAllToAll(self.workspace, r, expert_owner=expert_owner,
                                       config=config, abort=self.abort)
                      for r in range(spec.ep_size)]
        self._streams = ([torch.cuda.Stream(self.workspace.device) for _ in self.ranks]
                         if mode == "concurrent" else [])

    def _run_concurrently(self, work) -> list:
        """Runs ``work(rank)`` for every rank on its own stream, joined back."""
        current = torch.cuda.current_stream(self.workspace.device)
        results = []
        for rank, stream in enumerate(self._streams):
            stream.wait_stream(current)
            with torch.cuda.stream(stream):
                results.append(work(rank))
        for stream in self._streams:
            current.wait_stream(stream)
        return results

    def dispatch(self, xs: Sequence[torch.Tensor], topk_ids: Sequence[torch.Tensor],
                 topk_weights: Sequence[torch.Tensor | None] | None = None, *,
                 x_scales: Sequence[torch.Tensor | None] | None = None,
                 extra_payloads: Sequence[tuple[torch.Tensor, ...]] | None = None,
                 runtime_max_tokens: int | None = None) -> list[DispatchResult]:
        """Dispatch for every rank; per-rank lists indexed by rank.

        ``runtime_max_tokens`` defaults to the largest rank's token count.
        """
        self._raise_if_any_failed()
        p = self.spec.ep_size
        if len(xs) != p or len(topk_ids) != p:
            raise A2AInputError(f"need one x and one topk_ids per rank ({p})")
        weights = topk_weights if topk_weights is not None else [None] * p
        scales = x_scales if x_scales is not None else [None] * p
        extras = extra_payloads if extra_payloads is not None else [()] * p
        m = runtime_max_tokens
        if m is None:
            m = max(int(t.shape[0]) for t in topk_ids)
        # Anything that can synchronise the device (the id check, allocations) runs
        # for every rank before any rank launches: a launched rank may be waiting
        # for one that is not launched yet.
        check_ids = self.config.check_expert_ids and not is_capturing()
        if check_ids:
            for ids in topk_ids:
                check_expert_ids_in_range(ids, self.spec.num_experts)

        def send(rank: int, phases: int) -> DispatchResult:
            return self.ranks[rank].dispatch(
                xs[rank], topk_ids[rank], weights[rank], x_scales=scales[rank],
                extra_payloads=tuple(extras[rank]), runtime_max_tokens=m, phases=phases,
                check_expert_ids=False)

        if self.mode == "split":
            for rank in range(p):
                send(rank, PHASE_SEND)
            return [a2a.wait_dispatch() for a2a in self.ranks]
        return self._run_concurrently(lambda rank: send(rank, PHASE_BOTH))

    def combine_inputs(self) -> list[torch.Tensor]:
        return [a2a.combine_input() for a2a in self.ranks]

    def combine(self, ys: Sequence[torch.Tensor | None] | None = None,
                outs: Sequence[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
        """Combine for every rank; returns each rank's ``[T_r, H]`` output."""
        self._raise_if_any_failed()
        p = self.spec.ep_size
        ys = ys if ys is not None else [None] * p
        outs = outs if outs is not None else [None] * p
        outs = [a2a.combine_output(out) for a2a, out in zip(self.ranks, outs)]
        if self.mode == "split":
            for rank in range(p):
                self.ranks[rank].combine(ys[rank], out=outs[rank], phases=PHASE_SEND)
            return [a2a.wait_combine() for a2a in self.ranks]
        return self._run_concurrently(
            lambda rank: self.ranks[rank].combine(ys[rank], out=outs[rank], phases=PHASE_BOTH))

    def _raise_if_any_failed(self) -> None:
        """Raise the lowest failed rank's error (read from host memory, no sync)."""
        for a2a in self.ranks:
            a2a.check_errors()

    def failures(self) -> dict[int, A2ADeviceError]:
        """Every rank's recorded device error, by rank (reads host memory only)."""
        return {rank: a2a.failure for rank, a2a in enumerate(self.ranks)
                if a2a.failure is not None}

    def synchronize(self) -> None:
        """Wait for the device, read every rank's error record, raise the first.

        Every failed rank keeps its error (sticky), not only the one raised.
        """
        torch.cuda.synchronize(self.workspace.device)
        failed = self.failures()
        if failed:
            self.ranks[min(failed)].check_errors()

    def start_watchdog(self, interval_s: float = DEFAULT_INTERVAL_S,
                       tick_s: float | None = None) -> PeerWatchdog:
        """Run the peer watchdog over these ranks (one heartbeat per rank, all
        beaten by this process's watchdog thread); stopped by :meth:`close`."""
        if self.watchdog is None:
            self.watchdog = PeerWatchdog.start_local(self.spec.ep_size, abort=self.abort,
                                                     interval_s=interval_s, tick_s=tick_s)
        return self.watchdog

    def lose_rank(self, rank: int, lost: bool = True) -> None:
        """Test hook: stop (``lost=False``: restart) one rank's heartbeat; the
        watchdog then reports it lost after its interval, as for a stopped process."""
        if self.watchdog is None:
            raise A2AInputError("lose_rank needs the watchdog: call start_watchdog() first")
        self.watchdog.pause_heartbeat(rank, lost)

    def close(self) -> None:
        """Stop the watchdog (if started)."""
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None

    def recover(self) -> None:
        """Make every rank usable again after a device error (see
        :meth:`OneSidedAllToAll.recover`): clears a lost-peer abort (every rank
        is here, so the group agrees at once; restart a rank's heartbeat with
        ``lose_rank(rank, False)`` first, or it is reported lost again), waits
        for the device, zeroes every rank's workspace header once, forgets every
        rank's error and step."""
        if self.watchdog is not None:
            self.watchdog.rearm()
        else:
            self.abort.clear()
        self.workspace.reinitialize()
        for a2a in self.ranks:
            a2a.recover(reinitialize_workspace=False)
