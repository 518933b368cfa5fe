"""Workspace create/destroy cycles leak nothing: GPU memory, pinned host
memory (the error record of every all-to-all), resident set. The full 10^4-cycle
run is ``benchmarks/resource_cycles.py``; this is its short form."""

from __future__ import annotations

import json

import pytest

from benchmarks.resource_cycles import run_cycles

pytestmark = pytest.mark.gpu


def test_create_destroy_cycles_do_not_grow_memory():
    doc = run_cycles(500, warmup=30, samples=5)
    print(json.dumps({k: doc[k] for k in ("baseline", "final", "growth", "checks",
                                          "seconds")}))
    assert doc["growth"]["gpu_allocated"] == 0, doc["growth"]
    assert doc["passed"], doc["checks"]
    if "pinned_allocated_bytes.current" in doc["final"]:
        # Every cycle allocated a pinned record per rank and freed it again: the
        # host allocator reused its blocks and never asked CUDA for more.
        for key in ("pinned_allocated_bytes.current", "pinned_num_host_alloc"):
            assert doc["final"][key] == doc["baseline"][key], (key, doc["growth"])
