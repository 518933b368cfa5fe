"""A real SGLang engine (``sglang.Engine``) on one GPU serving the tiny Qwen3-MoE:
greedy tokens, top-2 logprobs and our all-to-all's round counts, as JSON.

    python -m vllm_a2a_plugin.testing.sglang_engine_check --model DIR --out run.json \\
        [--backend a2a_one_sided] [--graphs]

Without ``--backend`` SGLang runs its default MoE path (no all-to-all): the
reference. With ``--backend a2a_one_sided`` and ``--tp-size 1`` (what SGLang
0.5.23 accepts on one GPU) EP spans the one TP rank: every MoE layer runs our
dispatcher, SGLang's Triton runner and our combine, a full round of our kernels
(the rank sends to itself). More EP ranks on one GPU are refused by SGLang
itself: every TP rank gets its own GPU (``gpu_id = base_gpu_id + tp_rank *
gpu_id_step``, ``entrypoints/engine.py``; ``gpu_id_step >= 1`` is asserted in
``arg_groups/validation_hook.py``), and its TP groups open NCCL communicators,
which refuse two ranks on one device. ``tests/test_sglang_gpu.py`` runs
everything below that point (processes sharing the GPU through CUDA IPC).

Counts: SGLang's ``Engine.collective_rpc`` calls a Scheduler method on every
rank and returns nothing, so with ``VLLM_A2A_SGLANG_COUNTERS_RPC=1`` our plugin
adds ``Scheduler.a2a_write_round_counts(path)`` (:func:`install_counter_rpc`),
which writes each rank's device counters to ``<path>.rank<r>.json``.
Attention runs on SGLang's Triton backend and sampling on torch (the staged
SGLang carries no flashinfer).

The staged sglang-kernel: on the GPU machines SGLang 0.5.23 runs with
sglang-kernel 0.4.5 (``scripts/sglang_stage.py``: the last kernel built for
their torch 2.11), below the 0.4.9 that ``sglang.Engine`` asserts before it
starts anything (``entrypoints/engine.py`` ``_set_envs_and_config``, in this
process; SGLang's only sglang-kernel version gate, none runs in the scheduler
processes). When the installed sglang-kernel is exactly that staged version
(read with ``importlib.metadata``), this harness skips that one assertion and
prints a line saying so (:func:`allow_staged_sglang_kernel`); every other check,
the flashinfer version included, stays. SGLang's own
``SGLANG_SKIP_SGL_KERNEL_VERSION_CHECK`` is not used: it also drops the
flashinfer check and answers every kernel-package version query with "new
enough".
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

DEFAULT_PROMPTS = ("hello world the quick brown fox", "one two three four", "the expert model",
                   "red green blue")
COUNTERS_RPC_ENV = "VLLM_A2A_SGLANG_COUNTERS_RPC"
# scripts/sglang_stage.py KERNEL: what the GPU machines run SGLang 0.5.23 with.
STAGED_SGLANG_KERNEL = "0.4.5"
_KERNEL_DISTRIBUTIONS = ("sglang-kernel", "sglang_kernel")
# SGLang's CUDA RoPE kernel takes head sizes 64/128/256/512 only; any other
# falls back to a kernel that cannot also write the KV cache, which Qwen3-MoE
# asks of it with a bf16 cache (``rotary_embedding/base.py`` asserts "save kv
# cache is not supported for fallback_rotary_embedding"). The default tiny
# model's 32 would stop both the reference and our run there.
SGLANG_HEAD_DIM = 64


def sglang_tiny_moe_spec():
    """The tiny Qwen3-MoE with a head size SGLang's CUDA RoPE path accepts."""
    from vllm_a2a_plugin.testing.tiny_moe import TinyMoESpec

    return TinyMoESpec(head_dim=SGLANG_HEAD_DIM)


def allow_staged_sglang_kernel() -> bool:
    """Let ``sglang.Engine`` start on the staged sglang-kernel (see the module
    docstring); True when the gate was relaxed, False (nothing changed) for any
    other installed version or none.

    Wraps ``assert_pkg_version`` as ``entrypoints/engine.py`` calls it (its own
    module-level name): only a minimum-version check of sglang-kernel is
    skipped, every other package's check runs unchanged. Idempotent.
    """
    import importlib.metadata

    try:
        installed = importlib.metadata.version("sglang-kernel")
    except importlib.metadata.PackageNotFoundError:
        return False
    if installed != STAGED_SGLANG_KERNEL:
        return False
    import sglang.srt.entrypoints.engine as engine_module

    gate = engine_module.assert_pkg_version
    if getattr(gate, "staged_kernel_allowed", False):
        return True

    def assert_pkg_version(pkg: str, min_version: str, message: str) -> None:
        if pkg in _KERNEL_DISTRIBUTIONS:
            print(f"SGLANG_ENGINE_CHECK: sglang-kernel {installed} is the staged kernel "
                  f"(scripts/sglang_stage.py); skipping SGLang's sglang-kernel >= {min_version} "
                  "check (entrypoints/engine.py _set_envs_and_config), and only that one",
                  flush=True)
            return
        gate(pkg, min_version, message)

    assert_pkg_version.staged_kernel_allowed = True
    engine_module.assert_pkg_version = assert_pkg_version
    return True


def install_counter_rpc() -> None:
    """Add ``Scheduler.a2a_write_round_counts`` once SGLang's scheduler is imported."""
    from vllm_a2a_plugin.import_hooks import when_imported

    def patch(scheduler_module) -> None:
        def a2a_write_round_counts(self, path: str) -> None:
            from sglang.srt.runtime_context import get_parallel

            from vllm_a2a_plugin.sglang.dispatcher import _POOLS

            counts = [{"dispatch": a2a.completed_rounds()[0],
                       "combine": a2a.completed_rounds()[1],
                       "ep_size": a2a.spec.ep_size, "hidden": a2a.spec.hidden_size}
                      for pool in _POOLS.values() for a2a in pool.all_to_alls()]
            rank = get_parallel().tp_rank
            Path(f"{path}.rank{rank}.json").write_text(json.dumps(
                {"rank": rank, "all_to_alls": counts,
                 "allocation": [pool.allocation for pool in _POOLS.values()]}))

        scheduler_module.Scheduler.a2a_write_round_counts = a2a_write_round_counts

    when_imported("sglang.srt.managers.scheduler", patch)


def _result(prompt: str, output: dict) -> dict:
    """Our engine_check format: tokens and, per token, {token: logprob} of the
    top candidates plus the chosen one."""
    meta = output["meta_info"]
    tokens = [int(t) for t in output["output_ids"]]
    top = []
    for chosen, candidates in zip(meta["output_token_logprobs"], meta["output_top_logprobs"]):
        entry = {str(int(tid)): float(lp) for lp, tid, *_ in candidates}
        entry[str(int(chosen[1]))] = float(chosen[0])
        top.append(entry)
    return {"prompt": prompt, "tokens": tokens, "top_logprobs": top}


def run(model: str, out: Path, *, backend: str | None, graphs: bool, tp_size: int,
        max_new_tokens: int, mem_fraction: float) -> dict:
    os.environ[COUNTERS_RPC_ENV] = "1"  # the scheduler processes inherit it
    import sglang

    # Both runs use SGLang's Triton MoE runner ("auto" could pick a flashinfer
    # runner, which the staged SGLang does not carry).
    kwargs = dict(model_path=model, tp_size=tp_size, attention_backend="triton",
                  moe_runner_backend="triton", sampling_backend="pytorch", disable_cuda_graph=not graphs,
                  mem_fraction_static=mem_fraction, random_seed=0, log_level="warning",
                  # Prefix caching would let a repeated prompt skip its prefill.
                  disable_radix_cache=True)
    if graphs:  # decode graphs for the few batch sizes used here; prefill stays eager
        kwargs.update(cuda_graph_max_bs_decode=8, disable_prefill_cuda_graph=True)
    if backend:
        kwargs["moe_a2a_backend"] = backend
    allow_staged_sglang_kernel()
    started = time.time()
    engine = sglang.Engine(**kwargs)
    try:
        counts_path = str(out.with_suffix(""))
        after_start = _counts(engine, counts_path + ".start") if backend else []
        params = {"temperature": 0.0, "max_new_tokens": max_new_tokens, "ignore_eos": True}
        outputs = engine.generate(prompt=list(DEFAULT_PROMPTS), sampling_params=params,
                                  return_logprob=True, top_logprobs_num=2)
        after_generate = _counts(engine, counts_path + ".generate") if backend else []
    finally:
        engine.shutdown()
    result = {"backend": backend or "default", "graphs": graphs, "tp_size": tp_size,
              "sglang": sglang.__version__, "seconds": round(time.time() - started, 1),
              "outputs": [_result(p, o) for p, o in zip(DEFAULT_PROMPTS, outputs)],
              "counts_after_start": after_start, "counts_after_generate": after_generate}
    out.write_text(json.dumps(result, indent=1))
    return result


def _counts(engine, path: str) -> list[dict]:
    engine.collective_rpc("a2a_write_round_counts", path=path)
    files = sorted(Path(path).parent.glob(Path(path).name + ".rank*.json"))
    return [json.loads(f.read_text()) for f in files]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="tiny MoE directory (made if missing)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--backend", default=None, help="e.g. a2a_one_sided (default: none)")
    parser.add_argument("--graphs", action="store_true", help="CUDA graphs (default: eager)")
    parser.add_argument("--tp-size", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--mem-fraction", type=float, default=0.3)
    args = parser.parse_args(argv)
    if not (Path(args.model) / "model.safetensors").exists():
        from vllm_a2a_plugin.testing.tiny_moe import make_tiny_moe

        make_tiny_moe(args.model, sglang_tiny_moe_spec())
    result = run(args.model, args.out, backend=args.backend, graphs=args.graphs,
                 tp_size=args.tp_size, max_new_tokens=args.max_new_tokens,
                 mem_fraction=args.mem_fraction)
    print("SGLANG_ENGINE_RESULT", json.dumps({k: v for k, v in result.items()
                                              if k != "outputs"}))


if __name__ == "__main__":
    main()
