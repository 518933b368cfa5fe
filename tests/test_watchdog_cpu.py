"""The peer watchdog on CPU (no GPU needed): its native thread, the shared
segment and the abort word, over gloo with real processes (killed, stopped,
slow, departing) and with logical ranks in one process (a paused heartbeat).

What the kernels do with a raised abort word is tested on the GPU
(tests/test_faults_gpu.py); here the abort word is read from the host.
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import threading
import time

import pytest
import torch.multiprocessing as mp

from vllm_a2a_plugin import ops
from vllm_a2a_plugin.errors import A2AInputError, A2AStateError
from vllm_a2a_plugin.testing.serve import free_port
from vllm_a2a_plugin.watchdog import (LOST_HEARTBEAT, LOST_PROCESS_GONE, AbortWord,
                                      PeerWatchdog)

INTERVAL_S = 0.4
# Wall-clock slack for a loaded 2-core CI machine (the thread ticks every
# interval / 10; a killed process is seen on the next tick).
SLACK_S = 1.0


def _wait_raised(abort: AbortWord, timeout_s: float) -> float | None:
    """Seconds until ``abort`` was raised, or None if it stayed clear."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if abort.raised:
            return time.monotonic() - start
        time.sleep(0.005)
    return None


def _stays_clear(abort: AbortWord, seconds: float) -> bool:
    return _wait_raised(abort, seconds) is None


# ------------------------------------------------------------ one process
def test_paused_logical_rank_is_lost_after_the_interval_and_rearm_clears():
    abort = AbortWord()
    watchdog = PeerWatchdog.start_local(3, abort=abort, interval_s=0.2)
    try:
        assert _stays_clear(abort, 0.6)  # three intervals, every heartbeat alive
        assert watchdog.alive_ranks() == 3
        watchdog.pause_heartbeat(1)
        paused_at = time.monotonic()
        waited = _wait_raised(abort, 0.2 + SLACK_S)
        assert waited is not None, "a paused heartbeat was never reported"
        # Not before the interval, counted from the last beat: that came up to one
        # tick (interval / 10) before the pause, so one tick early is on time.
        assert time.monotonic() - paused_at >= 0.2 - 0.2 / 10 - 0.01
        assert abort.lost() == (1, LOST_HEARTBEAT)
        assert watchdog.group_loss() == (1, LOST_HEARTBEAT)
        watchdog.pause_heartbeat(1, False)
        watchdog.rearm()
        assert not abort.raised and watchdog.group_loss() is None
        assert _stays_clear(abort, 0.6)
    finally:
        watchdog.stop()


def test_python_holding_the_gil_does_not_stop_the_heartbeat():
    """The thread is native: Python blocked for 5x the interval in a C call that
    keeps the GIL (a long compile, graph capture) is slow, not lost."""
    abort = AbortWord()
    watchdog = PeerWatchdog.start_local(2, abort=abort, interval_s=0.2)
    try:
        ticks = watchdog.ticks()
        # PyDLL keeps the GIL during the call (CDLL would release it).
        ctypes.PyDLL(None).usleep(ctypes.c_uint(int(5 * 0.2 * 1e6)))
        assert watchdog.ticks() > ticks + 5, "the thread did not run while the GIL was held"
        assert not abort.raised
    finally:
        watchdog.stop()


def test_bad_arguments_raise_before_starting():
    with pytest.raises(A2AInputError, match="interval_s"):
        PeerWatchdog.start_local(2, abort=AbortWord(), interval_s=0)
    with pytest.raises(A2AInputError, match="tick_s"):
        PeerWatchdog.start_local(2, abort=AbortWord(), interval_s=0.1, tick_s=0.5)
    watchdog = PeerWatchdog.start_local(2, abort=AbortWord(), interval_s=0.5)
    try:
        with pytest.raises(A2AInputError, match="not driven by this process"):
            watchdog.pause_heartbeat(5)
    finally:
        watchdog.stop()
    with pytest.raises(A2AStateError, match="stopped"):
        watchdog.ticks()


def test_raise_lost_by_hand_and_clear():
    abort = AbortWord()
    assert abort.lost() is None
    abort.raise_lost(3)
    assert abort.raised and abort.lost() == (3, 3)
    abort.raise_lost(1)  # the first loss stays
    assert abort.lost() == (3, 3)
    abort.clear()
    assert not abort.raised


def test_segment_is_gone_from_shm_once_started():
    before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    watchdog = PeerWatchdog.start_local(2, abort=AbortWord(), interval_s=0.5)
    try:
        after = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
        assert not [n for n in after - before if n.startswith("a2a_watchdog_")]
    finally:
        watchdog.stop()


# ------------------------------------------------------------ processes
def _worker(rank: int, world: int, port: int, scenario: str, out) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    abort = AbortWord()
    watchdog = PeerWatchdog.start_for_group(dist.group.WORLD, abort=abort,
                                            interval_s=INTERVAL_S)
    out.put(("ready", rank, os.getpid()))
    if scenario == "kill":
        # The parent kills the last rank; the others report what they saw.
        if rank == world - 1:
            time.sleep(60)
        raised = _wait_raised(abort, 10.0)
        out.put(("seen", rank, abort.lost(), time.time() if raised is not None else None))
        watchdog.stop(depart=False)
        return
    if scenario == "stop":
        # The parent stops rank 1, then resumes it after rank 0 reported the loss;
        # rank 1 then finds the loss too (the shared word), and both rearm.
        raised = _wait_raised(abort, 10.0)
        out.put(("seen", rank, abort.lost(), time.time() if raised is not None else None))
        watchdog.rearm(dist.group.WORLD)
        out.put(("rearmed", rank, _stays_clear(abort, 3 * INTERVAL_S), None))
    elif scenario == "slow":
        # Rank 1 blocks in C with the GIL held for 5x the interval: slow, not lost.
        dist.barrier()
        if rank == 1:
            ctypes.PyDLL(None).usleep(ctypes.c_uint(int(5 * INTERVAL_S * 1e6)))
        else:
            time.sleep(5 * INTERVAL_S)
        dist.barrier()
        out.put(("quiet", rank, not abort.raised, None))
    elif scenario == "depart":
        # Rank 1 leaves on purpose (engine shutdown): not a loss.
        if rank == 1:
            watchdog.stop(depart=True)
            out.put(("quiet", rank, True, None))
            return
        out.put(("quiet", rank, _stays_clear(abort, 4 * INTERVAL_S), None))
    watchdog.stop()
    dist.destroy_process_group()


def _start(world: int, scenario: str):
    ops.load()  # build (or find) the extension once, before the children import it
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, scenario, out), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    return procs, out


def _collect(out, kind: str, count: int, timeout_s: float = 120) -> dict:
    found = {}
    deadline = time.monotonic() + timeout_s
    while len(found) < count:
        try:
            msg = out.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"only {sorted(found)} reported {kind!r}") from None
        if msg[0] == kind:
            found[msg[1]] = msg[2:]
    return found


def _finish(procs) -> None:
    for p in procs:
        p.join(30)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)


def test_killed_process_is_lost_by_every_survivor_within_a_tick():
    procs, out = _start(3, "kill")
    try:
        ready = _collect(out, "ready", 3)
        time.sleep(2 * INTERVAL_S)  # every thread past its first ticks
        killed_at = time.time()
        os.kill(ready[2][0], signal.SIGKILL)  # stays a zombie until joined: /proc says 'Z'
        seen = _collect(out, "seen", 2)
        for rank in (0, 1):
            lost, seen_at = seen[rank]
            assert lost == (2, LOST_PROCESS_GONE), (rank, lost)
            # Seen on a tick (interval / 10), not after the interval.
            assert seen_at - killed_at < INTERVAL_S / 10 + SLACK_S / 2, seen_at - killed_at
    finally:
        _finish(procs)


def test_stopped_process_is_lost_then_rejoins_after_rearm():
    procs, out = _start(2, "stop")
    try:
        ready = _collect(out, "ready", 2)
        time.sleep(2 * INTERVAL_S)
        stopped_at = time.time()
        os.kill(ready[1][0], signal.SIGSTOP)
        try:
            seen0 = _collect(out, "seen", 1)
            lost, seen_at = seen0[0]
            assert lost == (1, LOST_HEARTBEAT)
            # The interval runs from the stopped process's last beat, up to one
            # tick (interval / 10) before the SIGSTOP: one tick early is on time.
            assert (INTERVAL_S - INTERVAL_S / 10 - 0.01 <= seen_at - stopped_at
                    < INTERVAL_S + SLACK_S)
        finally:
            os.kill(ready[1][0], signal.SIGCONT)
        seen1 = _collect(out, "seen", 1)
        assert seen1[1][0] == (1, LOST_HEARTBEAT), "the resumed rank must name the same loss"
        rearmed = _collect(out, "rearmed", 2)
        assert rearmed[0][0] and rearmed[1][0], rearmed
    finally:
        _finish(procs)


def test_peer_blocked_with_the_gil_for_five_intervals_is_not_lost():
    procs, out = _start(2, "slow")
    try:
        quiet = _collect(out, "quiet", 2)
        assert quiet[0][0] and quiet[1][0], quiet
    finally:
        _finish(procs)


def test_departed_peer_is_not_lost():
    procs, out = _start(2, "depart")
    try:
        quiet = _collect(out, "quiet", 2)
        assert quiet[0][0], "a rank that left on purpose was reported lost"
    finally:
        _finish(procs)


def _lose_and_wait(exit_after_s: float, end_engine_core: bool = False) -> None:
    """Lose a peer (a paused logical rank) and wait to be ended by the watchdog;
    ``end_engine_core``: as a vLLM worker, whose parent named itself its engine core."""
    from vllm_a2a_plugin import envs

    abort = AbortWord()
    watchdog = PeerWatchdog.start_local(
        2, abort=abort, interval_s=0.2, exit_after_s=exit_after_s,
        end_parent_pid=envs.engine_core_parent_pid() if end_engine_core else 0)
    watchdog.pause_heartbeat(1)
    time.sleep(30)  # ended by the watchdog long before this


def test_unhandled_loss_ends_the_process_when_asked():
    """With exit_after_s, a process still alive that long after a loss nobody
    rearmed exits with code 75 (an engine blocked in a host collective)."""
    ops.load()
    proc = mp.get_context("spawn").Process(target=_lose_and_wait, args=(0.3,), daemon=True)
    started = time.monotonic()
    proc.start()
    proc.join(25)
    assert proc.exitcode == 75, proc.exitcode
    assert time.monotonic() - started < 25


@pytest.mark.parametrize("fault", ["kill", "stop"])
def test_benchmark_victim_process_beats_the_shared_slot(fault):
    """benchmarks/fault_detection.py's victim writes the slot layout of
    csrc/watchdog.h from Python: alive while it beats, lost when killed/stopped."""
    import subprocess
    import sys

    from benchmarks.fault_detection import _VICTIM
    from vllm_a2a_plugin.watchdog import _create_segment

    path = _create_segment(3)
    abort = AbortWord()
    watchdog = PeerWatchdog(segment_path=path, num_ranks=3, my_ranks=[0, 1], abort=abort,
                            interval_s=INTERVAL_S)
    proc = subprocess.Popen([sys.executable, "-c", _VICTIM, path, "2", str(INTERVAL_S / 10)])
    try:
        deadline = time.monotonic() + 30
        while watchdog.alive_ranks() < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.unlink(path)
        assert watchdog.alive_ranks() == 3, "the victim never marked its slot alive"
        assert _stays_clear(abort, 3 * INTERVAL_S)
        os.kill(proc.pid, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        assert _wait_raised(abort, INTERVAL_S + SLACK_S) is not None
        assert abort.lost() == (2, LOST_PROCESS_GONE if fault == "kill" else LOST_HEARTBEAT)
    finally:
        proc.kill()
        proc.wait()
        watchdog.stop(depart=False)


def _report_then_exit(out) -> None:
    from tests.test_faults_gpu import put_before_exit

    put_before_exit(out, ("lost", 0, os.getpid()))
    os._exit(0)  # as a child whose group is broken: no interpreter teardown


def test_message_put_before_os_exit_reaches_the_parent():
    """tests/test_faults_gpu.py's children that end with os._exit (their peer was
    killed) report through put_before_exit: a bare Queue.put only hands the
    message to a feeder thread that os._exit ends first (a trial lost 5 of 5
    messages sent that way), and the parent then waits out its whole deadline for a
    message that never comes."""
    ctx = mp.get_context("spawn")
    for _ in range(3):
        out = ctx.Queue()
        proc = ctx.Process(target=_report_then_exit, args=(out,), daemon=True)
        proc.start()
        try:
            kind, _, pid = out.get(timeout=60)
            assert (kind, pid) == ("lost", proc.pid)
        finally:
            proc.join(30)
        assert proc.exitcode == 0


def _engine_core_with_a_worker(ignore_sigterm: bool) -> None:
    """A stand-in for vLLM's engine core: names itself for its worker (as the
    plugin does in the real one), starts a worker that loses a peer, then waits
    as if blocked in its data-parallel all-reduce with the lost engine
    (``ignore_sigterm``: a C++ wait that Python's SIGTERM handler never
    interrupts)."""
    from vllm_a2a_plugin import envs

    if ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.environ[envs.ENGINE_CORE_PID] = str(os.getpid())
    worker = mp.get_context("spawn").Process(target=_lose_and_wait, args=(0.3, True))
    worker.start()
    time.sleep(60)  # ended by the worker's watchdog long before this


@pytest.mark.parametrize("ignore_sigterm", [True, False], ids=["blocked", "responsive"])
def test_worker_exiting_after_a_loss_ends_its_engine_core(ignore_sigterm):
    """A worker whose watchdog ends it after an unhandled loss ends its engine
    core parent first: SIGTERM, and SIGKILL a second later if that was not
    enough (a blocked engine core stays alive otherwise, and its front end
    would wait forever)."""
    ops.load()
    engine = mp.get_context("spawn").Process(target=_engine_core_with_a_worker,
                                             args=(ignore_sigterm,))
    engine.start()
    engine.join(40)
    if engine.exitcode is None:
        engine.kill()
        engine.join(5)
        pytest.fail("the engine core stand-in was not ended by its worker's watchdog")
    assert engine.exitcode == (-signal.SIGKILL if ignore_sigterm else -signal.SIGTERM)


def test_engine_core_parent_pid_only_for_the_parent(monkeypatch):
    from vllm_a2a_plugin import envs

    monkeypatch.setenv(envs.ENGINE_CORE_PID, str(os.getppid()))
    assert envs.engine_core_parent_pid() == os.getppid()
    monkeypatch.setenv(envs.ENGINE_CORE_PID, str(os.getpid()))  # the engine core itself
    assert envs.engine_core_parent_pid() == 0
    monkeypatch.setenv(envs.ENGINE_CORE_PID, "not a pid")
    assert envs.engine_core_parent_pid() == 0
    monkeypatch.delenv(envs.ENGINE_CORE_PID)
    assert envs.engine_core_parent_pid() == 0


class _StopBeforeWorkers(Exception):
    pass


class _ExecutorStandIn:
    """Enough of an executor for ``MultiprocExecutor._init_executor`` to reach
    the point where it would size and start its workers."""

    def shutdown(self):
        pass

    def _get_parallel_sizes(self):
        raise _StopBeforeWorkers


def _executor_marks(out) -> None:
    from vllm_a2a_plugin import envs
    from vllm_a2a_plugin.vllm import hooks

    os.environ.pop(envs.ENGINE_CORE_PID, None)
    hooks.install()  # what vLLM's load_general_plugins() runs
    from vllm.v1.executor.multiproc_executor import MultiprocExecutor

    try:
        MultiprocExecutor._init_executor(_ExecutorStandIn())
    except _StopBeforeWorkers:
        pass
    out.put((os.getpid(), os.environ.get(envs.ENGINE_CORE_PID)))


def test_engine_core_names_itself_before_starting_workers():
    """vLLM's MultiprocExecutor, run in a child process (the engine core), names
    that process's pid for the workers it is about to start; in the user's main
    process it does not (a worker never ends that one)."""
    pytest.importorskip("vllm", reason="vLLM is not installed (vLLM envs only)")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_executor_marks, args=(out,), name="EngineCore_DP0", daemon=True)
    proc.start()
    pid, value = out.get(timeout=180)
    proc.join(30)
    assert value == str(pid)


def test_main_process_is_never_named_for_workers(monkeypatch):
    pytest.importorskip("vllm", reason="vLLM is not installed (vLLM envs only)")
    from vllm_a2a_plugin import envs
    from vllm_a2a_plugin.vllm import hooks

    monkeypatch.delenv(envs.ENGINE_CORE_PID, raising=False)
    hooks.install()
    from vllm.v1.executor.multiproc_executor import MultiprocExecutor

    with pytest.raises(_StopBeforeWorkers):
        MultiprocExecutor._init_executor(_ExecutorStandIn())
    assert envs.ENGINE_CORE_PID not in os.environ


def test_offline_client_raises_when_its_engine_core_dies():
    """vLLM's offline client (``SyncMPClient``) blocked in ``get_output`` when
    the engine-core monitor finds its engine dead (what our watchdog's exit of
    a blocked engine core looks like to it): it raises ``EngineDeadError``
    instead of waiting forever. The client is vLLM's own, shut down the way its
    monitor does it; only the engine processes are absent."""
    pytest.importorskip("vllm", reason="vLLM is not installed (vLLM envs only)")
    import weakref

    from vllm_a2a_plugin.vllm import hooks

    hooks.install()
    from vllm.v1.engine.core_client import BackgroundResources, SyncMPClient
    from vllm.v1.engine.exceptions import EngineDeadError

    def client_without_engines():
        client = SyncMPClient.__new__(SyncMPClient)
        client.resources = BackgroundResources(ctx=None)
        client._finalizer = weakref.finalize(client, client.resources)
        client.outputs_queue = queue.Queue()
        return client

    client = client_without_engines()
    raised = queue.Queue()

    def generate():
        try:
            client.get_output()
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            raised.put(error)

    waiter = threading.Thread(target=generate, daemon=True)
    waiter.start()
    client.resources.engine_dead = True  # vLLM's MPClientEngineMonitor, then:
    client.shutdown()
    assert isinstance(raised.get(timeout=5), EngineDeadError)
    waiter.join(5)

    alive = client_without_engines()  # a normal shutdown queues nothing
    alive.shutdown()
    assert alive.outputs_queue.empty()


def test_engines_end_a_blocked_rank_by_default_and_the_variable_decides(monkeypatch):
    """The vLLM and SGLang integrations end a rank 5 s after a loss nothing
    handled (a DP rank without its EP peer cannot go on); library users keep
    "never" unless they set the variable; 0 turns it off for engines too."""
    from vllm_a2a_plugin import A2AConfig, envs

    monkeypatch.delenv("VLLM_A2A_PEER_LOST_EXIT_S", raising=False)
    assert envs.engine_config().peer_lost_exit_s == envs.ENGINE_PEER_LOST_EXIT_S == 5.0
    assert A2AConfig().peer_lost_exit_s is None and envs.peer_lost_exit_seconds() == 0.0
    monkeypatch.setenv("VLLM_A2A_PEER_LOST_EXIT_S", "0")
    assert envs.engine_config().peer_lost_exit_s == 0.0
    monkeypatch.setenv("VLLM_A2A_PEER_LOST_EXIT_S", "2.5")
    assert envs.engine_config().peer_lost_exit_s == 2.5
    with pytest.raises(A2AInputError):
        A2AConfig(peer_lost_exit_s=-1.0)
