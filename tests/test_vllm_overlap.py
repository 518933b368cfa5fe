"""Dual-batch overlap (vLLM ``--enable-dbo``) through our prepare/finalize, on CPU.

The config gate (vLLM's micro-batching backend list) and the real turn-taking of
vLLM's micro-batch threads (``vllm.v1.worker.ubatching``: ``make_ubatch_contexts``,
the two threads, their CPU hand-offs) with our prepare/finalize inside vLLM's
modular kernel, over gloo ranks and the reference all-to-all. CPU has no CUDA
streams, so the two streams and their events are stand-ins that record what ran
where; everything else is vLLM's own code. The GPU half (our kernels on the
comm stream, two DP engines with DBO) is in tests/test_engine.py.
"""

from __future__ import annotations

import os
import threading

import pytest
import torch

from tests.multiproc import run_ranks
from tests.test_vllm_plugin import run_python

pytest.importorskip("vllm", reason="needs vLLM installed (vLLM env only)")


# vLLM's CPU platform turns DBO off while it checks a config ("not supported on
# CPU"); a CUDA platform keeps it. The tests keep it, as CUDA would, to reach the
# checks and code that run after.
KEEP_DBO_ON_CPU = """
import functools
from vllm.platforms import current_platform
_check = type(current_platform).check_and_update_config.__func__
def _keep_dbo(cls, vllm_config):
    dbo = vllm_config.parallel_config.enable_dbo
    _check(cls, vllm_config)
    vllm_config.parallel_config.enable_dbo = dbo
type(current_platform).check_and_update_config = classmethod(_keep_dbo)
"""


def test_dbo_config_validates_with_our_backend(tmp_path):
    """EngineArgs with --enable-dbo and our backend: vLLM's micro-batching check
    passes, the config keeps our name, and other backends are still refused."""
    from vllm_a2a_plugin.testing.tiny_moe import make_tiny_moe

    model = make_tiny_moe(tmp_path / "tiny-moe")
    proc = run_python(f"""
        KEEP_DBO_ON_CPU = {KEEP_DBO_ON_CPU!r}
        import pickle
        from vllm.plugins import load_general_plugins
        load_general_plugins()
        exec(KEEP_DBO_ON_CPU, {{}})
        from vllm.engine.arg_utils import EngineArgs
        common = dict(model={str(model)!r}, enable_expert_parallel=True, data_parallel_size=2,
                      enforce_eager=True, max_model_len=256, enable_dbo=True,
                      dbo_decode_token_threshold=2, dbo_prefill_token_threshold=2)
        cfg = EngineArgs(all2all_backend="a2a_one_sided", **common).create_engine_config()
        pc = cfg.parallel_config
        assert pc.all2all_backend == "a2a_one_sided" and pc.use_ubatching and pc.num_ubatches == 2
        assert pickle.loads(pickle.dumps(cfg)).parallel_config.all2all_backend == "a2a_one_sided"
        try:
            EngineArgs(all2all_backend="allgather_reducescatter", **common).create_engine_config()
        except Exception as exc:  # pydantic wraps vLLM's AssertionError
            assert "Microbatching currently only supports" in str(exc), exc
        else:
            raise AssertionError("vLLM's micro-batching check no longer refuses other backends")
        print("OK")
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK" in proc.stdout


class _Stream:
    """A CUDA stream stand-in that logs the events it waits for."""

    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def wait_event(self, event) -> None:
        self.log.append(("wait", self.name, event.name))


def _stand_in_streams(log: list):
    """Patches vLLM's ubatching module to run on CPU: stream switching goes to a
    per-thread 'current stream', events record where they were recorded."""
    import vllm.v1.worker.ubatching as ubatching

    current = threading.local()
    default = _Stream("default", log)
    counter = iter(range(10 ** 6))

    class Event:
        def __init__(self, *args, **kwargs):
            self.name = f"event{next(counter)}"

        def record(self, stream=None) -> None:
            log.append(("record", stream.name, self.name))

    ubatching.current_stream = lambda: getattr(current, "stream", default)
    ubatching.torch.cuda.set_stream = lambda stream: setattr(current, "stream", stream)
    ubatching.torch.Event = Event
    return lambda: getattr(current, "stream", default)


def _rank_dbo(rank, world_size, port, schedule):
    os.environ["VLLM_TARGET_DEVICE"] = "cpu"
    os.environ["VLLM_A2A_DBO_SCHEDULE"] = schedule
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    exec(KEEP_DBO_ON_CPU, {})
    from vllm.config import ParallelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.model_executor.layers.fused_moe import modular_kernel as mk
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.all2all_utils import maybe_make_prepare_finalize
    from vllm.model_executor.layers.fused_moe.config import FUSED_MOE_UNQUANTIZED_CONFIG
    from vllm.v1.worker import ubatching

    from tests.test_vllm_modular_kernel import (NUM_EXPERTS, TOP_K, _tokens, _weights, dense_moe,
                                                moe_layer_config)
    from tests.torch_experts import UnreducedTorchExperts
    from vllm_a2a_plugin.reference import ReferenceAllToAll
    from vllm_a2a_plugin.vllm.compat import modular_kernel_has_supports_dbo
    from vllm_a2a_plugin.vllm.manager import ep_manager, ep_round_counts
    from vllm_a2a_plugin.vllm.prepare_finalize import OneSidedPrepareAndFinalize

    log: list = []
    current_stream = _stand_in_streams(log)

    parallel = ParallelConfig(data_parallel_size=world_size, data_parallel_rank=rank,
                              enable_expert_parallel=True, all2all_backend="a2a_one_sided",
                              distributed_executor_backend="external_launcher", enable_dbo=True,
                              dbo_decode_token_threshold=2, dbo_prefill_token_threshold=2)
    config = VllmConfig(parallel_config=parallel)
    with set_current_vllm_config(config):
        init_distributed_environment(world_size, rank, f"tcp://127.0.0.1:{port}", 0, "gloo")
        initialize_model_parallel(1, 1)
        moe, expert_map = moe_layer_config(world_size, rank, TOP_K, parallel)
        pf = maybe_make_prepare_finalize(moe, FUSED_MOE_UNQUANTIZED_CONFIG,
                                         allow_new_interface=True)
        assert isinstance(pf, OneSidedPrepareAndFinalize) and pf.micro_batches == 2
        first, second = pf.all_to_alls
        assert isinstance(first, ReferenceAllToAll) and second is not first
        assert pf.supports_dbo() and pf.dbo_schedule == schedule
        # 0.33 asks supports_dbo() and keeps the synchronous path for the comm-stream
        # schedule; 0.32 needs the async one; receive hooks are the async path.
        assert pf.supports_async() == (schedule == "recv_hooks"
                                       or not modular_kernel_has_supports_dbo())
        kernel = mk.FusedMoEKernel(pf, UnreducedTorchExperts(moe, FUSED_MOE_UNQUANTIZED_CONFIG))

        w1, w2 = _weights()
        local = torch.nonzero(expert_map != -1).flatten()
        # Micro-batches of different sizes; rank 1's second one is empty.
        counts = [[3, 4], [2, 0]][rank]
        inputs = [_tokens(rank + 20 * ub, counts[ub], TOP_K) for ub in range(2)]

        # Which micro-batch's all-to-all ran, and on which stream, per call.
        calls: list = []
        for index, a2a in enumerate(pf.all_to_alls):
            for name in ("dispatch", "combine", "wait_dispatch", "wait_combine"):
                original = getattr(a2a, name)

                def traced(*args, _original=original, _name=name, _index=index, **kwargs):
                    # The thread's name, not dbo_current_ubatch_id(): vLLM runs a
                    # pending hook after unregistering the exiting thread.
                    calls.append((_index, _name, threading.current_thread().name,
                                  current_stream().name))
                    return _original(*args, **kwargs)

                setattr(a2a, name, traced)

        compute, comm = _Stream("compute", log), _Stream("comm", log)
        barrier = threading.Barrier(3)
        contexts = ubatching.make_ubatch_contexts(2, compute, comm, [None, None], barrier)
        results: dict = {}
        failures: list = []

        def run(ub: int) -> None:
            try:
                with contexts[ub]:
                    x, weights, ids = inputs[ub]
                    results[ub] = kernel.apply(x, w1[local], w2[local], weights, ids,
                                               MoEActivation.SILU, NUM_EXPERTS, expert_map, False)
            except BaseException as exc:  # noqa: BLE001 - re-raised on the main thread
                failures.append(exc)
                for ctx in contexts:  # let the other thread finish instead of hanging
                    ctx.cpu_wait_event.set()

        threads = [threading.Thread(target=run, args=(ub,), name=str(ub)) for ub in range(2)]
        for thread in threads:
            thread.start()
        barrier.wait()
        contexts[0].cpu_wait_event.set()
        for thread in threads:
            thread.join(120)
        assert not failures, failures
        assert not any(thread.is_alive() for thread in threads)

        for ub in range(2):
            torch.testing.assert_close(results[ub], dense_moe(*inputs[ub], w1, w2),
                                       rtol=1e-4, atol=1e-5)

        waits = [entry for entry in log if entry[0] == "wait"]
        if schedule == "comm_stream":
            # Each micro-batch used its own all-to-all, fused, on the comm stream,
            # and the threads took turns: both dispatches before either combine.
            assert calls == [(0, "dispatch", "0", "comm"), (1, "dispatch", "1", "comm"),
                             (0, "combine", "0", "comm"), (1, "combine", "1", "comm")], calls
            # The comm stream waited for the compute recorded before each launch,
            # and the compute stream for each launch before going on.
            assert [w[1] for w in waits] == ["comm", "compute"] * 4, waits
        else:
            # Send launches on the compute stream; each wait launch ran on the
            # *other* micro-batch's thread (vLLM's receive hooks), before the
            # micro-batch that owns it went on.
            assert calls == [
                (0, "dispatch", "0", "compute"), (0, "wait_dispatch", "1", "compute"),
                (1, "dispatch", "1", "compute"), (1, "wait_dispatch", "0", "compute"),
                (0, "combine", "0", "compute"), (0, "wait_combine", "1", "compute"),
                (1, "combine", "1", "compute"), (1, "wait_combine", "0", "compute")], calls
            assert waits == [], waits  # no stream switch at all
        counters = ep_round_counts()
        assert counters["dispatches_by_micro_batch"] == [1, 1], counters
        assert counters["overlapped_prepare_calls"] == 2, counters
        # Outside a split step the same layer runs synchronously on micro-batch 0's
        # all-to-all, on the caller's stream, with no hand-off.
        calls.clear()
        x, weights, ids = _tokens(rank + 40, 2, TOP_K)
        kernel.apply(x, w1[local], w2[local], weights, ids, MoEActivation.SILU, NUM_EXPERTS,
                     expert_map, False)
        main = threading.current_thread().name
        assert calls == [(0, "dispatch", main, "default"), (0, "combine", main, "default")], calls
        ep_manager().destroy()


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["comm_stream", "recv_hooks"])
def test_two_micro_batches_take_turns_through_vllm_ubatch_contexts(schedule):
    run_ranks(_rank_dbo, 2, schedule)
