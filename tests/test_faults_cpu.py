"""Device-error messages and the sticky failure state, without a GPU.

The kernels write an int32[8] error record (csrc/launch.h ``ErrorField``);
these tests feed hand-written records to :func:`error_from_record` and to the
host-side check of :class:`OneSidedAllToAll` (on a host tensor standing in for
the pinned, device-mapped record). The GPU side is tests/test_faults_gpu.py.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from vllm_a2a_plugin.all_to_all import OneSidedAllToAll, error_from_record
from vllm_a2a_plugin.config import A2AConfig
from vllm_a2a_plugin.errors import (A2ADeviceError, A2AExpertIdError, A2AMismatchError,
                                    A2APeerLostError, A2AStateError, A2ATimeoutError)
from vllm_a2a_plugin.watchdog import LOST_HEARTBEAT, LOST_PROCESS_GONE, AbortWord
from vllm_a2a_plugin.workspace import AllToAllSpec

# status, rank, peer, phase, epoch, detail0, detail1, unused
TIMEOUT = [1, 2, 5, 1, 7, 6, 0, 0]
MISMATCH = [2, 0, 3, 0, 4, 16, 8, 0]
BAD_ID = [3, 1, -1, 0, 0, 1 << 20, 5, 0]
# rank 0 left its combine wait for peer 1 at epoch 9: rank 2's process is gone
PEER_LOST = [4, 0, 2, 1, 9, LOST_PROCESS_GONE, 1, 0]


def test_timeout_message_names_rank_peer_phase_epoch():
    err = error_from_record(TIMEOUT, timeout_s=0.25)
    assert isinstance(err, A2ATimeoutError) and isinstance(err, TimeoutError)
    assert (err.rank, err.peer, err.phase, err.epoch) == (2, 5, "combine", 7)
    assert "rank 2 timed out after 0.25 s in combine waiting for peer 5 (epoch 7" in str(err)
    assert "recover()" in str(err)
    assert err.record == tuple(TIMEOUT)


def test_mismatch_message():
    err = error_from_record(MISMATCH, timeout_s=1)
    assert isinstance(err, A2AMismatchError)
    assert (err.rank, err.peer, err.phase, err.epoch) == (0, 3, "dispatch", 4)
    assert "rank 0 used runtime_max_tokens=8 in dispatch but peer 3 used 16" in str(err)


def test_bad_id_message_says_what_the_kernel_did():
    """A bad id skips one slot; the token's other slots were delivered.
    (-1 itself is no longer an error: it marks a slot without an expert.)"""
    err = error_from_record(BAD_ID, timeout_s=1, num_experts=64)
    assert isinstance(err, A2AExpertIdError) and isinstance(err, A2ADeviceError)
    msg = str(err)
    assert "rank 1 dispatched top-k id 1048576 for its token 5, outside [0, 64) and not -1" in msg
    assert "skipped that top-k slot" in msg
    assert "other, valid slots were delivered and combined as usual" in msg
    assert "Mark a slot without an expert with -1" in msg
    assert "not sent to any expert" not in msg  # the old, wrong claim
    assert "[0, num_experts)" in str(error_from_record(BAD_ID, timeout_s=1))


def test_unknown_and_incomplete_records():
    err = error_from_record([9, 3, 1, 0, 2, 0, 0, 0], timeout_s=1)
    assert type(err) is A2ADeviceError and "status 9" in str(err) and err.rank == 3
    err = error_from_record([-1, 0, 0, 0, 0, 0, 0, 0], timeout_s=1)
    assert "still incomplete" in str(err)


def test_again_keeps_type_and_fields():
    first = error_from_record(TIMEOUT, timeout_s=0.25)
    repeat = first.again()
    assert type(repeat) is A2ATimeoutError and repeat is not first
    assert (repeat.rank, repeat.peer, repeat.phase, repeat.epoch) == (2, 5, "combine", 7)
    assert str(repeat).startswith(str(first)) and "raised again" in str(repeat)
    assert repeat.__cause__ is first


def test_peer_lost_message_names_lost_peer_phase_epoch_and_reason():
    err = error_from_record(PEER_LOST, timeout_s=120)
    assert isinstance(err, A2APeerLostError) and isinstance(err, A2ADeviceError)
    assert not isinstance(err, A2ATimeoutError)  # ours, not a generic timeout
    assert (err.rank, err.peer, err.phase, err.epoch) == (0, 2, "combine", 9)
    assert err.reason == "its process is gone" and err.waited_for == 1
    msg = str(err)
    assert "EP rank 2 was lost (its process is gone); rank 0 stopped combine at epoch 9" in msg
    assert "while waiting for peer 1" in msg and "VLLM_A2A_PEER_INTERVAL_S" in msg
    assert "restart the engine" in msg
    repeat = err.again()
    assert type(repeat) is A2APeerLostError and repeat.reason == err.reason
    assert repeat.waited_for == 1 and "raised again" in str(repeat)


def _host_only_all_to_all() -> OneSidedAllToAll:
    """The error-state part of a OneSidedAllToAll over a host record (no CUDA)."""
    a2a = object.__new__(OneSidedAllToAll)
    a2a.spec = AllToAllSpec(ep_size=2, max_tokens_per_rank=4, hidden_size=128, top_k=1,
                            num_experts=8)
    a2a.config = A2AConfig(timeout_s=0.25)
    a2a._error_record = torch.zeros(8, dtype=torch.int32, device="cpu")
    a2a._error_status = ctypes.c_int32.from_address(a2a._error_record.data_ptr())
    a2a._failure = None
    a2a._failure_raised = False
    a2a.rank = 0
    a2a._phase = "idle"
    return a2a


def test_check_errors_is_sticky():
    a2a = _host_only_all_to_all()
    a2a.check_errors()  # a zero record: nothing
    assert a2a.failure is None
    a2a._error_record.copy_(torch.tensor(TIMEOUT, dtype=torch.int32))
    with pytest.raises(A2ATimeoutError) as first:
        a2a.check_errors()
    assert "raised again" not in str(first.value)
    # Even if the record were cleared behind its back, the object keeps refusing.
    a2a._error_record.zero_()
    with pytest.raises(A2ATimeoutError, match="raised again") as second:
        a2a.check_errors()
    assert (second.value.rank, second.value.peer, second.value.phase) == (2, 5, "combine")
    assert a2a.failure is first.value
    a2a.reset_error()
    a2a.check_errors()


def test_failure_is_read_without_raising():
    a2a = _host_only_all_to_all()
    a2a._error_record.copy_(torch.tensor(BAD_ID, dtype=torch.int32))
    err = a2a.failure
    assert isinstance(err, A2AExpertIdError) and "outside [0, 8)" in str(err)
    with pytest.raises(A2AExpertIdError) as raised:  # first raise: the original
        a2a.check_errors()
    assert raised.value is err


def test_a_raised_abort_word_fails_the_next_call_without_a_kernel_record():
    """A peer lost between steps: no kernel of this rank was waiting, so the record
    stays empty; the next call still raises A2APeerLostError, from the abort word."""
    a2a = _host_only_all_to_all()
    a2a.abort = AbortWord()
    a2a._abort_state = a2a.abort.state
    a2a.check_errors()
    a2a.abort.raise_lost(1, LOST_HEARTBEAT)
    with pytest.raises(A2APeerLostError) as raised:
        a2a.check_errors()
    err = raised.value
    assert (err.peer, err.phase, err.epoch, err.waited_for) == (1, "dispatch", 0, -1)
    assert "heartbeat stopped" in str(err) and "epoch not recorded" in str(err)
    with pytest.raises(A2APeerLostError, match="raised again"):
        a2a.check_errors()
    # recover() refuses while the group has not cleared the word together.
    with pytest.raises(A2AStateError, match="abort word is still raised"):
        a2a.recover()


def test_a_kernel_record_wins_over_the_abort_word():
    a2a = _host_only_all_to_all()
    a2a.abort = AbortWord()
    a2a._abort_state = a2a.abort.state
    a2a.abort.raise_lost(2, LOST_PROCESS_GONE)
    a2a._error_record.copy_(torch.tensor(PEER_LOST, dtype=torch.int32))
    with pytest.raises(A2APeerLostError) as raised:
        a2a.check_errors()
    assert (raised.value.phase, raised.value.epoch, raised.value.waited_for) == ("combine", 9, 1)
