"""The engine-run helpers (vllm_a2a_plugin/testing/serve.py) on a stand-in server:
Python's own http.server on 127.0.0.1, so the waiting, log capture and shutdown
logic is checked on CPU; the engine tests use the same helpers with vLLM."""

from __future__ import annotations

import os
import sys

import pytest

from vllm_a2a_plugin.testing.serve import (free_port, server_log_tail, start_logged,
                                           stop_server, wait_healthy)


def test_wait_healthy_then_stop_removes_the_log(tmp_path):
    (tmp_path / "health").write_text("ok")  # GET /health answers 200
    port = free_port()
    proc = start_logged([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                        cwd=str(tmp_path))
    try:
        wait_healthy(proc, port, timeout_s=30)
        assert "GET /health" in server_log_tail(proc)
    finally:
        stop_server(proc)
    assert proc.poll() is not None
    assert not os.path.exists(proc.log_path)


def test_a_server_that_dies_is_reported_with_its_output(tmp_path):
    proc = start_logged([sys.executable, "-c", "print('engine failed: out of memory')"],
                        cwd=str(tmp_path))
    proc.wait(30)
    with pytest.raises(AssertionError, match="exited early(.|\\n)*engine failed: out of memory"):
        wait_healthy(proc, free_port(), timeout_s=30)
    stop_server(proc)
