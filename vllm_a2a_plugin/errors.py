"""Exceptions raised by the one-sided all-to-all.

Every check that can fail before a kernel launch raises ``A2AInputError`` (a
``ValueError``) whose message names the argument and prints both values. Errors
the device reports after the fact (a peer that never arrived, ranks that
disagree on the step size) raise ``A2ADeviceError`` subclasses built from the
host-mapped error record the kernels write.
"""

from __future__ import annotations


class A2AInputError(ValueError):
    """An argument is unusable: wrong dtype, shape, device, layout or value."""


class A2AStateError(RuntimeError):
    """Operations were called out of order (e.g. combine before dispatch)."""


class A2ADeviceError(RuntimeError):
    """A kernel recorded an error. ``rank``, ``peer`` and ``phase`` say where."""

    def __init__(self, message: str, *, rank: int, peer: int, phase: str, epoch: int):
        super().__init__(message)
        self.rank = rank
        self.peer = peer
        self.phase = phase
        self.epoch = epoch


class A2ATimeoutError(A2ADeviceError, TimeoutError):
    """A rank waited longer than the configured timeout for a peer's flag."""


class A2AMismatchError(A2ADeviceError):
    """Ranks disagreed on a value that must be identical (runtime max tokens)."""
