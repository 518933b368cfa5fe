"""A real SGLang engine on one GPU serving the tiny Qwen3-MoE with
``--moe-a2a-backend a2a_one_sided`` vs SGLang's default MoE path.

Each run is a ``vllm_a2a_plugin.testing.sglang_engine_check`` process (an
``sglang.Engine`` with its scheduler processes; logs beside its JSON). Greedy
tokens must match the default path within the bf16 tolerance, and our kernels'
device counters must have counted rounds on every rank. One GPU holds one
SGLang TP rank (see the module's docstring for where SGLang refuses more), so EP
is 1 here: our kernels run a full round per MoE layer with the rank sending to
itself; several EP ranks sharing the GPU are covered in test_sglang_gpu.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sglang.srt.plugins", reason="SGLang is not installed (SGLang env only)")

from tests.greedy_compare import LOGPROB_TOL, compare_greedy  # noqa: E402

pytestmark = pytest.mark.gpu

RUN_TIMEOUT_S = float(os.environ.get("SGLANG_ENGINE_RUN_TIMEOUT_S", "240"))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from vllm_a2a_plugin.testing.sglang_engine_check import sglang_tiny_moe_spec
    from vllm_a2a_plugin.testing.tiny_moe import make_tiny_moe

    return make_tiny_moe(tmp_path_factory.mktemp("tiny-moe"), sglang_tiny_moe_spec())


def _engine_run(model: Path, out_dir: Path, name: str, *flags: str) -> dict:
    out = out_dir / f"{name}.json"
    log = out_dir / f"{name}.log"
    with open(log, "w") as stream:
        proc = subprocess.run(
            [sys.executable, "-m", "vllm_a2a_plugin.testing.sglang_engine_check",
             "--model", str(model), "--out", str(out), *flags],
            stdout=stream, stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT_S)
    if proc.returncode != 0:
        tail = log.read_text()[-6000:]
        raise AssertionError(f"engine run {name} exited {proc.returncode}; log tail:\n{tail}")
    return json.loads(out.read_text())


def _artifacts_dir(tmp_path: Path) -> Path:
    """$SGLANG_ENGINE_OUT (the GPU session's output folder) or the test's tmp dir."""
    target = os.environ.get("SGLANG_ENGINE_OUT")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        return Path(target)
    return tmp_path


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "cuda-graphs"])
def test_engine_greedy_matches_default_moe_path(tiny_model, tmp_path, graphs):
    out_dir = _artifacts_dir(tmp_path)
    mode = "graphs" if graphs else "eager"
    extra = ("--graphs",) if graphs else ()
    reference = _engine_run(tiny_model, out_dir, f"default-{mode}", *extra)
    ours = _engine_run(tiny_model, out_dir, f"a2a-{mode}", "--backend", "a2a_one_sided", *extra)
    summary = compare_greedy(ours["outputs"], reference["outputs"], LOGPROB_TOL["bf16"])
    counts = ours["counts_after_generate"]
    assert counts and all(rank["all_to_alls"] for rank in counts), counts
    for rank in counts:
        rounds = [(a["dispatch"], a["combine"]) for a in rank["all_to_alls"]]
        assert all(d > 0 and d == c for d, c in rounds), (rank["rank"], rounds)
    before = {r["rank"]: sum(a["dispatch"] for a in r["all_to_alls"])
              for r in ours["counts_after_start"]}
    after = {r["rank"]: sum(a["dispatch"] for a in r["all_to_alls"]) for r in counts}
    # Generating ran MoE layers through our kernels (replays count on the device).
    assert all(after[r] > before.get(r, 0) for r in after), (before, after)
    print("SGLANG_ENGINE_COMPARE", mode, json.dumps(
        {"summary": summary, "rounds_after_start": before, "rounds_after_generate": after,
         "seconds": {"default": reference["seconds"], "a2a": ours["seconds"]}}))
