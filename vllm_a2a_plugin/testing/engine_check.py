"""One real vLLM engine run for the engine tests: greedy tokens, per-token
logprobs and a2a_one_sided round counts, written as JSON.

    python -m vllm_a2a_plugin.testing.engine_check --model DIR --out run.json \\
        [--backend a2a_one_sided] [--graphs] [--quantization fp8] \\
        [--max-tokens 8] [--prompt TEXT ...]

Counts come from :func:`vllm_a2a_plugin.vllm.manager.ep_round_counts` through
``LLM.collective_rpc`` at three points: after start-up (profiling, warm-up and
CUDA-graph capture ran MoE layers), after a prefill-only generate
(``max_tokens=1``) and after the full generate (``ignore_eos``, so every
request produces exactly ``max_tokens`` tokens). The kernels' device counters
count every dispatch/combine, CUDA-graph replays included; the host counters
count Python calls of our prepare/finalize (captures and eager steps only).

Without ``--backend`` the engine runs vLLM's default MoE path (the reference
run the tests compare tokens with).
"""

from __future__ import annotations

import argparse
import json
import os
import time


def _counts(llm) -> list[dict]:
    from vllm_a2a_plugin.vllm.manager import ep_round_counts

    return llm.collective_rpc(ep_round_counts)


def run(args: argparse.Namespace) -> dict:
    from vllm import LLM, SamplingParams

    kwargs = dict(model=args.model, enforce_eager=not args.graphs,
                  max_model_len=args.max_model_len,
                  gpu_memory_utilization=args.gpu_memory_utilization,
                  attention_backend="TRITON_ATTN", seed=0)
    if args.quantization:
        kwargs["quantization"] = args.quantization
    if args.backend:
        kwargs.update(enable_expert_parallel=True, all2all_backend=args.backend)
    started = time.perf_counter()
    llm = LLM(**kwargs)
    result = {"config": {k: v for k, v in vars(args).items() if k != "out"},
              "start_s": round(time.perf_counter() - started, 1)}
    counted = bool(args.backend)
    if counted:
        result["counts_after_start"] = _counts(llm)
    prefill = SamplingParams(temperature=0, max_tokens=1)
    llm.generate(args.prompt, prefill)
    if counted:
        result["counts_after_prefill"] = _counts(llm)
    full = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True, logprobs=1)
    outs = llm.generate(args.prompt, full)
    if counted:
        result["counts_after_generate"] = _counts(llm)
    result["tokens"] = [list(o.outputs[0].token_ids) for o in outs]
    result["logprobs"] = [
        [float(step[tok].logprob) for step, tok in zip(o.outputs[0].logprobs,
                                                        o.outputs[0].token_ids)]
        for o in outs]
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--backend", default=None, help="all2all backend (default: vLLM's)")
    parser.add_argument("--graphs", action="store_true",
                        help="CUDA graphs + torch.compile (default: eager)")
    parser.add_argument("--quantization", default=None)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--max-model-len", type=int, default=256)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    parser.add_argument("--prompt", action="append", default=None)
    args = parser.parse_args(argv)
    args.prompt = args.prompt or ["hello world the quick brown fox", "one two three four",
                                  "the expert model", "red green blue"]
    result = run(args)
    result["env"] = {k: v for k, v in os.environ.items() if k.startswith("VLLM_A2A")}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print("ENGINE_CHECK", json.dumps({k: result[k] for k in result if k.startswith("counts")}))


if __name__ == "__main__":
    main()
