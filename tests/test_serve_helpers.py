"""The engine-run helpers (vllm_a2a_plugin/testing/serve.py) on a stand-in server:
Python's own http.server on 127.0.0.1, so the waiting, log capture and shutdown
logic is checked on CPU; the engine tests use the same helpers with vLLM."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from vllm_a2a_plugin.testing.serve import free_port, server_log_tail, stop_server, wait_healthy


def _popen_logged(cmd: list[str], log_path: str, cwd: str) -> subprocess.Popen:
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    proc.log_path = log_path
    return proc


def test_wait_healthy_then_stop_removes_the_log(tmp_path):
    (tmp_path / "health").write_text("ok")  # GET /health answers 200
    port = free_port()
    proc = _popen_logged([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                         str(tmp_path / "server.log"), str(tmp_path))
    try:
        wait_healthy(proc, port, timeout_s=30)
        assert "GET /health" in server_log_tail(proc)
    finally:
        stop_server(proc)
    assert proc.poll() is not None
    assert not os.path.exists(tmp_path / "server.log")


def test_a_server_that_dies_is_reported_with_its_output(tmp_path):
    proc = _popen_logged([sys.executable, "-c", "print('engine failed: out of memory')"],
                         str(tmp_path / "server.log"), str(tmp_path))
    proc.wait(30)
    with pytest.raises(AssertionError, match="exited early(.|\\n)*engine failed: out of memory"):
        wait_healthy(proc, free_port(), timeout_s=30)
    stop_server(proc)
