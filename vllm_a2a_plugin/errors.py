"""Exceptions raised by the one-sided all-to-all.

Every check that can fail before a kernel launch raises ``A2AInputError`` (a
``ValueError``) whose message names the argument and prints both values. Errors
the device reports after the fact (a peer that never arrived, ranks that
disagree on the step size, an expert id out of range, a peer the watchdog saw
die or stop) raise ``A2ADeviceError`` subclasses built from the host-mapped
error record the kernels write (or, for a lost peer that no kernel was waiting
for yet, from the process's abort word).

Device errors are sticky: once an all-to-all object has seen one, every later
call on it raises the same error at once (no kernel is launched) until
``OneSidedAllToAll.recover()`` ran on every rank of the group.
"""

from __future__ import annotations


class A2AInputError(ValueError):
    """An argument is unusable: wrong dtype, shape, device, layout or value."""


class A2AStateError(RuntimeError):
    """Operations were called out of order (e.g. combine before dispatch)."""


class A2ADeviceError(RuntimeError):
    """A kernel recorded an error. ``rank``, ``peer``, ``phase`` and ``epoch`` say where.

    Attributes:
        rank: the EP rank whose kernel recorded the error.
        peer: the peer it concerns (the one waited for, or whose value
            disagreed), ``-1`` when none.
        phase: ``"dispatch"`` or ``"combine"``.
        epoch: the operation's epoch (1 = the first dispatch or combine after
            the workspace was created or recovered); 0 when not recorded.
        record: the raw int32 error record the kernels wrote, or None.
    """

    def __init__(self, message: str, *, rank: int, peer: int, phase: str, epoch: int,
                 record: tuple[int, ...] | None = None):
        super().__init__(message)
        self.rank = rank
        self.peer = peer
        self.phase = phase
        self.epoch = epoch
        self.record = record

    def again(self) -> "A2ADeviceError":
        """A fresh exception of the same type and fields, saying it is a repeat.

        Raised by every call made on a failed all-to-all (a new object each time,
        so tracebacks do not pile up on one instance).
        """
        repeat = type(self)(
            f"{self.args[0]} [raised again: this all-to-all failed earlier and refuses work "
            "until recover() runs on every rank]",
            rank=self.rank, peer=self.peer, phase=self.phase, epoch=self.epoch,
            record=self.record)
        repeat.__cause__ = self
        return repeat


class A2ATimeoutError(A2ADeviceError, TimeoutError):
    """A rank waited longer than the configured timeout for a peer's flag."""


class A2AMismatchError(A2ADeviceError):
    """Ranks disagreed on a value that must be identical (runtime max tokens)."""


class A2AExpertIdError(A2ADeviceError):
    """A top-k id outside ``[0, num_experts)`` reached the kernels (host check off)."""


class A2APeerLostError(A2ADeviceError):
    """The peer watchdog saw an EP rank lost: its process is gone, or its heartbeat
    stopped for longer than the interval (``VLLM_A2A_PEER_INTERVAL_S``).

    ``peer`` is the lost rank (the one every survivor names), ``phase`` and
    ``epoch`` the operation this rank left (epoch 0: no wait of this rank was
    running when the loss was seen). Extra attributes:

    Attributes:
        reason: why the peer counts as lost, in words.
        waited_for: the peer the interrupted wait was for (-1 when none).
    """

    def __init__(self, message: str, *, rank: int, peer: int, phase: str, epoch: int,
                 record: tuple[int, ...] | None = None, reason: str | None = None,
                 waited_for: int | None = None):
        super().__init__(message, rank=rank, peer=peer, phase=phase, epoch=epoch, record=record)
        if reason is None or waited_for is None:
            # again() rebuilds from the base fields: the record holds both (see
            # all_to_all.error_from_record: detail0 = reason, detail1 = waited for).
            from vllm_a2a_plugin.watchdog import reason_text

            rec = record or (0,) * 8
            reason = reason if reason is not None else reason_text(rec[5])
            waited_for = waited_for if waited_for is not None else rec[6]
        self.reason = reason
        self.waited_for = waited_for
