"""CPU checks of the benchmark's bookkeeping: kernel times per op and iteration
from profiler events, and the published bandwidth conventions."""

from __future__ import annotations

import pytest
import torch

from benchmarks.bench_a2a import convention_bytes, per_iteration_kernel_times, start_skews


def test_kernel_times_are_grouped_per_iteration_and_divided_by_ranks():
    # 2 iterations x 2 ranks; names as the profiler prints them; unrelated kernels mixed in.
    events = []
    t = 0.0
    for it in range(2):
        events.append(("vectorized_elementwise_kernel (flush)", t, 90.0))
        for rank in range(2):
            events.append(("a2a::(anonymous namespace)::dispatch_kernel(a2a::DispatchParams)",
                           t + 100 + rank, 3.0 + it + rank))
        for rank in range(2):
            events.append(("void a2a::(anonymous namespace)::combine_kernel<__nv_bfloat16>("
                           "a2a::CombineParams)", t + 110 + rank, 2.0 * (it + 1)))
        t += 1000
    times = per_iteration_kernel_times(list(reversed(events)), iters=2, ranks=2)
    assert times["dispatch"] == (2, [3.5, 4.5])
    assert times["combine"] == (2, [2.0, 4.0])


def test_start_skew_is_last_minus_first_start_per_iteration():
    # 2 iterations x 3 ranks, starts out of order; one kernel per iteration has no skew.
    events = [("dispatch_kernel", t, 1.0) for t in (5.0, 0.0, 2.5, 107.0, 100.0, 101.0)]
    events += [("combine_kernel", t, 1.0) for t in (50.0, 150.0)]
    skews = start_skews(events, iters=2)
    assert skews == {"dispatch": [5.0, 7.0]}


def test_kernel_counts_that_do_not_divide_leave_the_op_out(capsys):
    events = [("dispatch_kernel", 0.0, 1.0)] * 3
    assert per_iteration_kernel_times(events, iters=2, ranks=1) == {}
    assert "found 3 'dispatch_kernel' kernels over 2 iterations" in capsys.readouterr().out


def test_bandwidth_conventions():
    # Rank 0: 2 tokens x top-2, one slot without an expert (-1); rank 1: 1 token.
    ids = [torch.tensor([[0, 5], [3, -1]], dtype=torch.int32),
           torch.tensor([[7, 1]], dtype=torch.int32)]
    got = convention_bytes(ids, num_experts=8, ep_size=4, top_k=2, dispatch_row=100,
                           combine_row=10)
    # DeepEP: valid selections (3 + 2) x row / ranks; TRT-LLM: tokens (3) x min(4, 2) x row / ranks.
    assert got["dispatch"] == {"deepep_bytes": pytest.approx(250.0),
                               "trtllm_bytes": pytest.approx(300.0)}
    assert got["combine"] == {"deepep_bytes": pytest.approx(25.0),
                              "trtllm_bytes": pytest.approx(30.0)}


@pytest.mark.parametrize("kind", ["uniform", "skewed", "local"])
def test_routing_gives_distinct_valid_ids_and_local_stays_on_its_rank(kind):
    from benchmarks.shapes import SHAPES, crossing_bytes, routing
    shape = SHAPES["deepseek_v3"]
    gen = torch.Generator().manual_seed(0)
    ids = [routing(gen, 16, shape, kind, rank=r, ep_size=8) for r in range(8)]
    for r, rank_ids in enumerate(ids):
        assert rank_ids.shape == (16, shape.top_k) and rank_ids.dtype == torch.int32
        assert all(len(set(row.tolist())) == shape.top_k for row in rank_ids)
        assert int(rank_ids.min()) >= 0 and int(rank_ids.max()) < shape.num_experts
        if kind == "local":
            assert bool(((rank_ids // (shape.num_experts // 8)) == r).all())
    crossing = crossing_bytes(ids, shape.num_experts, 8, row_bytes=100)
    assert (crossing == 0) == (kind == "local")


def test_local_routing_refuses_ranks_with_fewer_experts_than_top_k():
    from benchmarks.shapes import SHAPES, routing
    with pytest.raises(ValueError, match="local routing needs"):
        routing(torch.Generator(), 4, SHAPES["deepseek_v3"], "local", rank=0, ep_size=64)


def test_python_overhead_stand_in_runs_the_hot_path_of_this_tree(tmp_path):
    """benchmarks/python_overhead_cpu.py assembles an all-to-all without CUDA; it
    must keep matching OneSidedAllToAll's fields (AttributeError otherwise) and
    take the same path CUDA tensors take (the op's check, no Python check)."""
    import json
    from unittest import mock

    from benchmarks import python_overhead_cpu
    from vllm_a2a_plugin import all_to_all

    plain = all_to_all._plain_cuda_tensors
    out = tmp_path / "python.json"
    with mock.patch.object(all_to_all, "check_dispatch_inputs",
                           side_effect=AssertionError("the Python check ran")) as check:
        python_overhead_cpu.main(["--iters", "20", "--repeats", "1", "--json", str(out)])
    assert check.call_count == 0
    assert all_to_all._plain_cuda_tensors is plain  # its CPU stand-ins are undone
    result = json.loads(out.read_text())
    assert result["python_us_per_round_trip"] > 0 and result["python_us_out_given"] > 0


def test_host_plot_draws_every_process_of_a_host_json(tmp_path):
    """benchmarks/plot_host.py reads latency_session.sh's host.json; a process
    whose tree had no launch plans (raw_planned_us None) still gets its bars."""
    import json

    from benchmarks import plot_host

    fields = {"host_us_per_round_trip": 20.0, "host_us_out_given": 20.5, "raw_general_us": 19.0,
              "raw_planned_us": 13.0, "python_only_us": 5.0, "torch_op_floor_us": 5.2}
    host = tmp_path / "host.json"
    host.write_text(json.dumps({"before": {**fields, "raw_planned_us": None}, "after": fields}))
    png = tmp_path / "host.png"
    plot_host.main([str(host), "--png", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    single = tmp_path / "host_after_1.json"  # one host_overhead.py --json output
    single.write_text(json.dumps(fields))
    plot_host.main([str(single), str(host), "--png", str(png)])
    assert png.stat().st_size > 0
