"""Fast detection of a lost EP peer: the abort word and the peer watchdog.

Without it a rank whose peer died waits in its kernel for the device timeout
(``VLLM_A2A_TIMEOUT_S``, 120 s by default). With it:

* :class:`AbortWord`: ``int32[4]`` of host memory per process (pinned and
  mapped into the GPU's address space where CUDA is present), shared by every
  all-to-all of its pool. The kernels' spin-waits poll it every ~20 us of
  waiting (never in a wait that ends sooner: healthy steps do not read it), and
  leave at once when it is raised, recording ``A2APeerLostError``; rounds
  already queued behind that one return at entry (no-ops).
* :class:`PeerWatchdog`: a native thread (``csrc/watchdog.h``) that beats this
  process's ranks' heartbeats in a host shared-memory segment every EP rank of
  the group maps, and watches the others': a peer whose process is gone, or
  whose heartbeat stood still for longer than the interval (default 1 s,
  ``VLLM_A2A_PEER_INTERVAL_S``), raises the abort word of every survivor. The
  thread is C++ so it keeps beating while Python holds the GIL for seconds
  (torch.compile, graph capture, a long prefill): a slow peer is not a lost one.

EP groups of this backend are always one node (the vLLM manager refuses
internode groups), so host shared memory reaches every peer. The segment is
unlinked as soon as every rank mapped it: nothing is left in ``/dev/shm`` when a
process is killed.

Recovery: a process that is gone cannot rejoin (rebuild the group: restart the
engine). A peer that was only stopped (SIGSTOP, a debugger) and resumed can:
every rank calls :meth:`PeerWatchdog.rearm` (``AllToAllPool.recover`` does it
before resetting the workspaces).
"""

from __future__ import annotations

import atexit
import ctypes
import os
import time
import uuid
import weakref

import torch

from vllm_a2a_plugin import ops
from vllm_a2a_plugin.errors import A2AInputError, A2AStateError

# csrc/watchdog_abi.h: AbortField and PeerLostReason.
_ABORT_STATE, _ABORT_PEER, _ABORT_REASON = 0, 1, 2
ABORT_WORD_SIZE = 4
LOST_PROCESS_GONE, LOST_HEARTBEAT, LOST_RAISED_BY_HOST = 1, 2, 3
REASONS = {
    LOST_PROCESS_GONE: "its process is gone",
    LOST_HEARTBEAT: "its heartbeat stopped (process stopped or hung)",
    LOST_RAISED_BY_HOST: "raised by the host",
}
DEFAULT_INTERVAL_S = 1.0
_SHM_DIR = "/dev/shm"
# Watchdogs still running, stopped (as departures) at interpreter exit: their
# thread writes an abort word that Python owns, so it must end before Python
# frees it (a C++ static destructor would run after that).
_running: "weakref.WeakSet[PeerWatchdog]" = weakref.WeakSet()


def reason_text(reason: int) -> str:
    return REASONS.get(reason, f"reason {reason}")


class AbortWord:
    """One process's abort word: ``int32[4]`` host memory, ``[state, peer, reason, 0]``.

    Pinned (and mapped for the GPU) when CUDA is available; plain host memory
    otherwise (the CPU build's watchdog writes it the same way).
    """

    def __init__(self):
        pinned = torch.cuda.is_available()
        # Named `cpu`: a caller's `with torch.device("cuda")` must not move it.
        self.tensor = torch.zeros(ABORT_WORD_SIZE, dtype=torch.int32, device="cpu",
                                  pin_memory=pinned)
        base = self.tensor.data_ptr()
        # Plain host loads through ctypes: no tensor op, well under a microsecond.
        self.state = ctypes.c_int32.from_address(base + 4 * _ABORT_STATE)
        self._peer = ctypes.c_int32.from_address(base + 4 * _ABORT_PEER)
        self._reason = ctypes.c_int32.from_address(base + 4 * _ABORT_REASON)
        self._device_address: int | None = None

    @property
    def raised(self) -> bool:
        return self.state.value != 0

    def lost(self) -> tuple[int, int] | None:
        """``(lost peer, reason)`` once raised, else None."""
        if self.state.value == 0:
            return None
        return int(self._peer.value), int(self._reason.value)

    def device_address(self) -> int:
        """The address the kernels read it through (CUDA only)."""
        if self._device_address is None:
            ops.require_kernels()
            self._device_address = int(
                torch.ops.a2a_one_sided.abort_word_device_address(self.tensor))
        return self._device_address

    def raise_lost(self, peer: int, reason: int = LOST_RAISED_BY_HOST) -> None:
        """Raise it by hand (tests, or an engine that learned of a loss itself).

        Peer and reason first, then the state: x86 and Arm hosts keep these
        plain stores in order for a reader of the same line (the kernels read
        the state, then the rest after a fence).
        """
        if self.state.value:
            return
        self._peer.value = int(peer)
        self._reason.value = int(reason)
        self.state.value = 1

    def clear(self) -> None:
        self.state.value = 0
        self._peer.value = 0
        self._reason.value = 0


_process_abort: AbortWord | None = None


def process_abort_word() -> AbortWord:
    """The abort word of all-to-alls made without one (tests, :class:`LocalRanks`)."""
    global _process_abort
    if _process_abort is None:
        _process_abort = AbortWord()
    return _process_abort


def _segment_path() -> str:
    directory = _SHM_DIR if os.path.isdir(_SHM_DIR) else "/tmp"
    return os.path.join(directory, f"a2a_watchdog_{os.getpid()}_{uuid.uuid4().hex[:12]}")


def _create_segment(num_ranks: int) -> str:
    ops.load()
    path = _segment_path()
    size = int(torch.ops.a2a_one_sided.watchdog_segment_bytes(num_ranks))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)  # zero-filled: no rank alive, no loss
    finally:
        os.close(fd)
    return path


class PeerWatchdog:
    """The native watchdog thread of this process (see the module docstring).

    Use :meth:`start_for_group` (one rank per process, collective over the EP
    group's CPU group) or :meth:`start_local` (every rank in this process:
    logical ranks on one GPU).

    Args:
        segment_path: the shared segment, already sized.
        num_ranks: EP ranks of the group.
        my_ranks: the ranks this process drives (their heartbeats beat here).
        abort: the abort word it raises.
        interval_s: how long a heartbeat may stand still before its rank is lost.
        tick_s: how often the thread beats and looks (default interval / 10).
        exit_after_s: end this process (exit code 75) this long after a loss
            nobody rearmed; 0 never. For engines: a step blocked in a host
            collective with the lost peer (a gloo all-reduce waiting on a
            stopped peer) is ended by nothing else, and the engine's front end
            reports a dead engine (``VLLM_A2A_PEER_LOST_EXIT_S``).
        end_parent_pid: with ``exit_after_s``: end this process's parent too
            (SIGTERM, then SIGKILL a second later) before exiting, if that pid
            is still the parent then; 0 never. For vLLM's engine core, which
            may wait in its own data-parallel all-reduce with the lost peer's
            engine while its worker (this process) exits.
    """

    def __init__(self, *, segment_path: str, num_ranks: int, my_ranks: list[int],
                 abort: AbortWord, interval_s: float = DEFAULT_INTERVAL_S,
                 tick_s: float | None = None, exit_after_s: float = 0.0,
                 end_parent_pid: int = 0):
        if interval_s <= 0:
            raise A2AInputError(f"interval_s must be positive, got {interval_s}")
        tick_s = interval_s / 10 if tick_s is None else tick_s
        if not 0 < tick_s <= interval_s:
            raise A2AInputError(f"tick_s ({tick_s}) must be in (0, interval_s={interval_s}]")
        if exit_after_s < 0:
            raise A2AInputError(f"exit_after_s must be >= 0, got {exit_after_s}")
        ops.load()
        self.num_ranks = num_ranks
        self.my_ranks = list(my_ranks)
        self.abort = abort
        self.interval_s = interval_s
        self.tick_s = tick_s
        self.exit_after_s = exit_after_s
        self.end_parent_pid = end_parent_pid
        self._handle = int(torch.ops.a2a_one_sided.watchdog_start(
            segment_path, num_ranks, self.my_ranks, abort.tensor, int(interval_s * 1e9),
            max(1, int(tick_s * 1e9)), int(exit_after_s * 1e9), int(end_parent_pid)))
        _running.add(self)

    @classmethod
    def start_for_group(cls, cpu_group, *, abort: AbortWord,
                        interval_s: float = DEFAULT_INTERVAL_S,
                        tick_s: float | None = None,
                        exit_after_s: float = 0.0,
                        end_parent_pid: int = 0) -> "PeerWatchdog":
        """Start the watchdogs of an EP group, one rank per process: collective.

        Rank 0 creates the segment and names it through ``cpu_group``; every
        rank maps it and starts its thread; after a barrier (every rank's pid
        and heartbeat are in place) rank 0 unlinks it.
        """
        import torch.distributed as dist

        rank, world = dist.get_rank(cpu_group), dist.get_world_size(cpu_group)
        name = [_create_segment(world) if rank == 0 else None]
        dist.broadcast_object_list(name, src=dist.get_global_rank(cpu_group, 0),
                                   group=cpu_group)
        watchdog = cls(segment_path=name[0], num_ranks=world, my_ranks=[rank], abort=abort,
                       interval_s=interval_s, tick_s=tick_s, exit_after_s=exit_after_s,
                       end_parent_pid=end_parent_pid)
        dist.barrier(group=cpu_group)
        if rank == 0:
            os.unlink(name[0])
        return watchdog

    @classmethod
    def start_local(cls, num_ranks: int, *, abort: AbortWord,
                    interval_s: float = DEFAULT_INTERVAL_S,
                    tick_s: float | None = None,
                    exit_after_s: float = 0.0,
                    end_parent_pid: int = 0) -> "PeerWatchdog":
        """A watchdog for ``num_ranks`` logical ranks all driven by this process:
        the same thread and segment, so :meth:`pause_heartbeat` on one of them
        takes the path a stopped peer process takes."""
        path = _create_segment(num_ranks)
        try:
            return cls(segment_path=path, num_ranks=num_ranks, my_ranks=list(range(num_ranks)),
                       abort=abort, interval_s=interval_s, tick_s=tick_s,
                       exit_after_s=exit_after_s, end_parent_pid=end_parent_pid)
        finally:
            os.unlink(path)

    # ------------------------------------------------------------- test hooks
    def pause_heartbeat(self, rank: int, paused: bool = True) -> None:
        """Stop (or restart) the heartbeat of one of this process's ranks, as if
        its process had stopped: the other ranks report it lost after the interval."""
        if rank not in self.my_ranks:
            raise A2AInputError(f"rank {rank} is not driven by this process ({self.my_ranks})")
        torch.ops.a2a_one_sided.watchdog_pause(self._check_running(), rank, paused)

    # ------------------------------------------------------------------ state
    def _check_running(self) -> int:
        if not self._handle:
            raise A2AStateError("this watchdog was stopped")
        return self._handle

    def group_loss(self) -> tuple[int, int] | None:
        """``(lost peer, reason)`` the group agreed on (the shared word), or None."""
        lost, peer, reason, _, _ = torch.ops.a2a_one_sided.watchdog_state(self._check_running())
        return (int(peer), int(reason)) if lost else None

    def ticks(self) -> int:
        """Rounds the thread ran (it is alive when this grows)."""
        return int(torch.ops.a2a_one_sided.watchdog_state(self._check_running())[3])

    def alive_ranks(self) -> int:
        """Ranks with a running heartbeat slot (departed ranks excluded)."""
        return int(torch.ops.a2a_one_sided.watchdog_state(self._check_running())[4])

    # --------------------------------------------------------------- lifetime
    def rearm(self, cpu_group=None) -> None:
        """Forget a loss so the group can go on: collective over ``cpu_group``
        (None: every rank is in this process).

        Only for a peer that was stopped and resumed (or a loss raised by hand):
        a peer whose process is gone cannot rejoin, and this raises instead of
        waiting on it in a barrier.
        """
        loss = self.abort.lost() or self.group_loss()
        if loss is not None and loss[1] == LOST_PROCESS_GONE:
            raise A2AStateError(
                f"EP rank {loss[0]}'s process is gone: the group cannot recover; rebuild it "
                "(restart the engine)")
        handle = self._check_running()
        if cpu_group is None:
            torch.ops.a2a_one_sided.watchdog_clear_group(handle)
            self._rearm_here(handle)
            return
        import torch.distributed as dist

        # Nobody acts on the old loss after the first barrier (every rank stopped
        # launching); the word is cleared before the second, and each rank clears
        # its own abort word only after its thread restarted its clocks.
        dist.barrier(group=cpu_group)
        if dist.get_rank(cpu_group) == 0:
            torch.ops.a2a_one_sided.watchdog_clear_group(handle)
        dist.barrier(group=cpu_group)
        self._rearm_here(handle)
        dist.barrier(group=cpu_group)

    def _rearm_here(self, handle: int) -> None:
        torch.ops.a2a_one_sided.watchdog_rearm(handle)
        # The thread takes the request on its next tick; until then it may still
        # hold the old loss (it writes the abort word only on a new one).
        ticks = self.ticks()
        deadline = time.monotonic() + 10 * self.tick_s + 1.0
        while self.ticks() < ticks + 2 and time.monotonic() < deadline:
            time.sleep(self.tick_s / 4)
        self.abort.clear()

    def stop(self, *, depart: bool = True) -> None:
        """Stop the thread. ``depart``: this process leaves on purpose, so peers
        stop watching its ranks (shutdown is not a loss). Idempotent."""
        if self._handle:
            torch.ops.a2a_one_sided.watchdog_stop(self._handle, depart)
            self._handle = 0

    def __del__(self):
        try:
            self.stop()
        except Exception:  # noqa: BLE001 - interpreter teardown
            pass


@atexit.register
def _stop_running_watchdogs() -> None:
    for watchdog in list(_running):
        try:
            watchdog.stop(depart=True)
        except Exception:  # noqa: BLE001 - interpreter teardown
            pass
