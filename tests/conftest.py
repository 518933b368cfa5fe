"""Shared test setup: markers that skip with a reason, seeded data makers."""

from __future__ import annotations

import os

# Before anything initialises CUDA: one hardware queue per logical rank's stream
# (see vllm_a2a_plugin/local_ranks.py, concurrent mode).
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")

import pytest  # noqa: E402
import torch  # noqa: E402


def _kernels_skip_reason() -> str | None:
    if torch.version.cuda is None:
        return f"needs a CUDA build of torch (this is {torch.__version__})"
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (none visible)"
    from vllm_a2a_plugin import ops

    try:
        ops.require_kernels()
    except RuntimeError as exc:
        return f"kernels unavailable: {exc}"
    return None


def pytest_collection_modifyitems(config, items):
    gpu_reason = None
    checked = False
    for item in items:
        if "gpu" in item.keywords or "multigpu" in item.keywords:
            if not checked:
                gpu_reason = _kernels_skip_reason()
                checked = True
            if gpu_reason:
                item.add_marker(pytest.mark.skip(reason=gpu_reason))
                continue
        if "multigpu" in item.keywords and torch.cuda.device_count() < 2:
            item.add_marker(pytest.mark.skip(
                reason=f"needs >= 2 GPUs, {torch.cuda.device_count()} visible"))


def quick() -> bool:
    """A2A_TEST_QUICK=1 shrinks parameter grids (sanitizer runs are ~50x slower)."""
    return os.environ.get("A2A_TEST_QUICK", "") not in ("", "0")


def under_sanitizer() -> bool:
    """Set A2A_UNDER_SANITIZER=1 when running under compute-sanitizer: it
    serialises kernels, so ranks driven concurrently would wait on each other."""
    return os.environ.get("A2A_UNDER_SANITIZER", "") not in ("", "0")


def pytest_runtest_logreport(report):
    """``A2A_INSTANT_FAILURES=1``: print a failure's traceback as it happens.
    The GPU machine's calls end at a hard time limit; a run cut short there
    never reaches pytest's summary, and its failures would go unexplained."""
    if report.failed and os.environ.get("A2A_INSTANT_FAILURES") == "1":
        print(f"\n=== FAILED {report.nodeid} ({report.when})\n{report.longreprtext[-6000:]}\n",
              flush=True)
