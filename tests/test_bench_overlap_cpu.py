"""benchmarks/bench_overlap.py on CPU: the schedules do the same work, and the
plot is drawn from a result file (the GPU measurements themselves need a GPU)."""

from __future__ import annotations

import collections

import pytest

from benchmarks import bench_overlap


class _Recorder:
    """Stands in for a micro-batch: counts each piece of work by name."""

    def __init__(self, counts: collections.Counter):
        self.counts = counts

    def __getattr__(self, name):
        return lambda: self.counts.update([name])


@pytest.mark.parametrize("layers", [1, 3])
def test_receive_hook_schedule_does_the_serial_work(layers):
    serial, hooks = collections.Counter(), collections.Counter()
    bench_overlap.serial_step(_Recorder(serial), _Recorder(serial), layers)
    bench_overlap.recv_hooks_step(_Recorder(hooks), _Recorder(hooks), layers)
    assert serial["compute"] == hooks["compute"] == 4 * layers
    # Every fused launch is a send and a wait there, each exactly once.
    for op in ("dispatch", "combine"):
        assert serial[op] == 2 * layers
        assert hooks[f"send_{op}"] == hooks[f"wait_{op}"] == 2 * layers


def test_plot_from_a_result_file(tmp_path):
    pytest.importorskip("matplotlib")
    row = dict(shape="qwen3_30b_a3b", ep_size=8, tokens_per_rank=1024, micro_batch_tokens=512,
               layers=4, comm_max_blocks=0, compute_alone_us=1000.0, serial_us=1500.0,
               recv_hooks_us=1450.0, overlapped_us=1100.0, exposed_serial_us=500.0,
               exposed_recv_hooks_us=450.0, exposed_overlapped_us=100.0,
               serial_over_compute=1.5, overlapped_over_compute=1.1)
    doc = dict(gpu="NVIDIA H100 80GB HBM3", commit="0123456789abcdef", iters=10,
               rows=[row, {**row, "comm_max_blocks": 32}])
    out = tmp_path / "overlap.png"
    bench_overlap.plot(doc, out)
    assert out.stat().st_size > 10_000
