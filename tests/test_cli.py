"""``vllm-a2a size`` and ``vllm-a2a doctor`` on a CPU machine.

``size``'s numbers are held to the workspace the pool allocates
(:meth:`WorkspaceLayout.for_spec` from the C++ layout, i.e.
:meth:`Workspace.nbytes_per_rank`), and the baselines' formulas to values worked
out by hand from their sources. ``doctor`` must say "not ready" here, exit
non-zero and name every reason.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys

import pytest
import torch

from vllm_a2a_plugin import cli, sizing
from vllm_a2a_plugin.workspace import AllToAllSpec, Workspace, WorkspaceLayout

QWEN3_30B = {"model_type": "qwen3_moe", "hidden_size": 2048, "num_experts": 128,
             "num_experts_per_tok": 8, "num_hidden_layers": 48, "decoder_sparse_step": 1}
DEEPSEEK_V3 = {"model_type": "deepseek_v3", "hidden_size": 7168, "n_routed_experts": 256,
               "num_experts_per_tok": 8, "num_hidden_layers": 61, "first_k_dense_replace": 3,
               "moe_layer_freq": 1, "n_shared_experts": 1}
MIXTRAL = {"model_type": "mixtral", "hidden_size": 4096, "num_local_experts": 8,
           "num_experts_per_tok": 2, "num_hidden_layers": 32}
LLAMA4 = {"model_type": "llama4", "vision_config": {"hidden_size": 1408},
          "text_config": {"hidden_size": 5120, "num_local_experts": 16,
                          "num_experts_per_tok": 1, "num_hidden_layers": 48}}


def _run_cli(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.main(argv)
    return rc, out.getvalue()


def _write(tmp_path, config: dict, as_dir: bool):
    folder = tmp_path / config["model_type"]
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder if as_dir else folder / "config.json"


@pytest.mark.parametrize(("config", "expected"), [
    (QWEN3_30B, [(2048, 128, 8, 48)]),
    (DEEPSEEK_V3, [(7168, 256, 8, 58)]),
    (MIXTRAL, [(4096, 8, 2, 32)]),
    (LLAMA4, [(5120, 16, 1, 48)]),
])
def test_moe_shapes_read_each_family_field_names(config, expected):
    shapes = sizing.moe_shapes(config)
    assert [(s.hidden_size, s.num_experts, s.top_k, s.num_moe_layers) for s in shapes] == expected


def test_dense_config_is_refused_with_the_fields_it_looked_for(tmp_path):
    path = _write(tmp_path, {"model_type": "llama", "hidden_size": 4096}, as_dir=False)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc, _ = _run_cli(["size", "--model", str(path), "--ep", "2", "--max-tokens", "16"])
    assert rc == 2
    assert "no MoE layer" in err.getvalue() and "num_experts_per_tok" in err.getvalue()


@pytest.mark.parametrize("config", [QWEN3_30B, DEEPSEEK_V3, MIXTRAL])
@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_size_equals_the_workspace_the_pool_allocates(tmp_path, config, dtype, micro_batches):
    ep, tokens = 8, 1024
    path = _write(tmp_path, config, as_dir=True)
    rc, out = _run_cli(["size", "--model", str(path), "--ep", str(ep), "--max-tokens",
                        str(tokens), "--dtype", dtype, "--micro-batches", str(micro_batches),
                        "--json"])
    assert rc == 0
    (row,) = json.loads(out)["shapes"]
    hidden = row["shape"]["hidden_size"]
    # The spec vLLM's prepare/finalize builds, written out here, not taken from sizing.
    fp8 = dtype == "fp8"
    spec = AllToAllSpec(ep_size=ep, max_tokens_per_rank=tokens, hidden_size=hidden,
                        top_k=row["shape"]["top_k"], num_experts=row["shape"]["num_experts"],
                        dispatch_dtype=torch.float8_e4m3fn if fp8 else torch.bfloat16,
                        scale_cols=hidden // 128 if fp8 else 0, combine_dtype=torch.bfloat16)
    layout = WorkspaceLayout.for_spec(spec)
    workspace = Workspace(spec, layout, peer_ptrs=[], buffers={})  # sized, nothing allocated
    assert row["ours_per_rank"] == workspace.nbytes_per_rank() * micro_batches
    assert row["ours_total"] == row["ours_per_rank"] * ep
    # The README's formula: P*T slots of (top-k ids + weights + dispatch row
    # [+ scales] + combine row), plus a header and 128-byte region alignment.
    slots = ep * tokens
    row_bytes = 8 * spec.top_k + sum(spec.payload_row_bytes) + spec.combine_row_bytes
    one = row["ours_per_rank"] // micro_batches
    assert slots * row_bytes <= one <= slots * row_bytes + 64 * 1024


def test_flashinfer_formula_by_hand():
    # ep 2, 4 tokens, 100 B dispatch / 64 B combine payload per token (calculateOffsets):
    # counters 8 + 2*4 + 2*4 = 24 -> 128, +8 dispatch flags -> 256, +8 combine flags
    # -> 384, +4*22*4 target ranks = 736 -> 768, +352 send indices = 1120 -> 1152
    # (aux); payloads pad(2*4*100) = 896 and pad(2*4*64) = 512.
    assert sizing.flashinfer_moe_a2a_bytes_per_rank(
        ep_size=2, max_num_tokens=4, dispatch_payload_bytes_per_token=100,
        combine_payload_bytes_per_token=64) == 1152 + 896 + 512


def test_deepep_low_latency_formula_by_hand():
    # DeepSeek-V3, 128 tokens, 256 experts: dispatch message 16 + max(14336, 7168 + 56*4)
    # = 14352 B, combine message 56*4 + 14336 = 14560 B; send and receive buffers are
    # max(...) = 256*128*14560 B each, twice; signalling 256*4 = 1024 B, twice; then
    # rounded past the next 128-byte multiple.
    body = 2 * 256 * 128 * 14560 + 2 * 256 * 128 * 14560 + 2 * 1024
    assert sizing.deepep_low_latency_bytes(num_max_dispatch_tokens_per_rank=128, hidden=7168,
                                           num_experts=256) == body + 128


def test_deepep_nvl_formula_by_hand():
    # 8 ranks, bf16 7168: 10 channels x 8 ranks x 256 tokens x (14336 + 8 + 128*8 +
    # 128*4 + 128*4) + 10 x 8 x 5 x 4 bytes of counters, 128-aligned.
    total = 10 * 8 * 5 * 4 + 10 * 8 * 256 * (14336 + 8 + 1024 + 512 + 512)
    assert sizing.deepep_normal_nvl_bytes(hidden_bytes=14336, num_ranks=8) == \
        (total + 127) // 128 * 128


def test_size_table_names_every_column(tmp_path):
    path = _write(tmp_path, DEEPSEEK_V3, as_dir=True)
    rc, out = _run_cli(["size", "--model", str(path), "--ep", "8", "--max-tokens", "4096"])
    assert rc == 0
    for column in ("ours/rank", "ours total", "flashinfer/rank", "DeepEP LL/rank"):
        assert column in out
    assert "7168" in out and "256" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the CPU verdict "
                    "does not apply (the GPU run is `vllm-a2a doctor --json` on that machine)")
def test_doctor_on_cpu_is_not_ready_and_names_every_reason():
    done = subprocess.run([sys.executable, "-m", "vllm_a2a_plugin", "doctor", "--json"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["ready"] is False
    assert any("GPU" in r or "CPU build" in r for r in report["reasons"])
    assert any(r.startswith("CUDA kernels not usable") or "CPU build" in r
               for r in report["reasons"])
    assert report["checks"]["workspace"]["path"] is None
    assert set(report["checks"]["engines"]) == {"vllm", "sglang", "flashinfer"}
    text = subprocess.run([sys.executable, "-m", "vllm_a2a_plugin", "doctor", "--no-probes"],
                          capture_output=True, text=True, timeout=600)
    assert text.returncode == 1
    assert f"NOT READY ({len(report['reasons'])} reason" in text.stdout
    for reason in report["reasons"]:
        assert f"  - {reason}" in text.stdout


def test_nvlink_pairs_from_nvidia_smi_topo():
    topo = ("\tGPU0\tGPU1\tGPU2\tCPU Affinity\n"
            "GPU0\t X \tNV18\tSYS\t0-63\n"
            "GPU1\tNV18\t X \tPHB\t0-63\n"
            "GPU2\tSYS\tPHB\t X \t0-63\n")
    assert cli._nvlink_pairs(topo) == ["0->1", "1->0"]


def test_console_script_is_declared():
    from importlib.metadata import entry_points

    scripts = entry_points(group="console_scripts", name="vllm-a2a")
    assert [ep.value for ep in scripts] == ["vllm_a2a_plugin.cli:main"], (
        "reinstall the package (pip install --no-build-isolation -e .) to register vllm-a2a")


def _bench_doc(scale: float) -> dict:
    rows = []
    for ep in (1, 8):
        for tokens in (1, 128):
            base = scale * tokens * ep
            rows += [
                {"impl": "a2a_one_sided", "op": "round_trip", "mode": "eager", "ep_size": ep,
                 "tokens_per_rank": tokens, "median_us": base * 4},
                {"impl": "a2a_one_sided", "op": "round_trip", "mode": "graph", "ep_size": ep,
                 "tokens_per_rank": tokens, "median_us": base * 2, "queued_median_us": base},
                {"impl": "a2a_one_sided", "op": "dispatch", "mode": "kernel", "ep_size": ep,
                 "tokens_per_rank": tokens, "median_us": base / 2},
                {"impl": "a2a_one_sided", "op": "combine", "mode": "kernel", "ep_size": ep,
                 "tokens_per_rank": tokens, "median_us": base / 4},
            ]
    for row in rows:
        row.update(shape="deepseek_v3", dtype="fp8", routing="uniform")
    return {"gpu": "NVIDIA H200", "world_size": 1, "torch": "2.11.0", "commit": "abc1234",
            "date": "2026-12-04T10:00:00", "rows": rows,
            "command": "python benchmarks/bench_a2a.py --tokens 1,128 --out x.json"}


def test_readme_round_trip_plot_takes_the_median_of_runs(tmp_path):
    from benchmarks import plot_results

    docs = [_bench_doc(1.0), _bench_doc(3.0), _bench_doc(2.0)]
    points = plot_results.round_trip_points(docs)
    queued = points[("a2a_one_sided", 1, "graph replay, device time (queued)")]
    assert queued == {1: [1.0, 3.0, 2.0], 128: [128.0, 384.0, 256.0]}
    kernel = points[("a2a_one_sided", 8, "kernel time (CUPTI, dispatch + combine)")]
    assert kernel[1] == [8 * 0.75, 24 * 0.75, 16 * 0.75]  # dispatch + combine summed
    # eager with several logical ranks in one process is left out, one real rank kept
    assert ("a2a_one_sided", 8, "eager, events (host enqueue included)") not in points
    assert ("a2a_one_sided", 1, "eager, events (host enqueue included)") in points
    paths = []
    for i, doc in enumerate(docs):
        paths.append(tmp_path / f"run{i}.json")
        paths[-1].write_text(json.dumps(doc))
    out = plot_results.plot_round_trip(paths, tmp_path / "rt.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_probe_failures_are_reported_not_raised():
    ok = cli._probe("fine", 'import json; print(json.dumps({"ok": True, "detail": "d"}))')
    assert ok == {"ok": True, "detail": "d"}
    failed = cli._probe("crash", 'raise SystemExit("symmetric memory refused")')
    assert failed["ok"] is False and "symmetric memory refused" in failed["detail"]
    hung = cli._probe("hang", "import time; time.sleep(30)", timeout=1)
    assert hung == {"ok": False, "detail": "no answer within 1 s"}
