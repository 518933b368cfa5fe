"""A short tour: vLLM loads the plugin, the flag validates, and one dispatch ->
experts -> combine round trip matches a dense MoE (our CUDA kernels with 4
logical ranks on a GPU, the reference semantics on a CPU-only machine)."""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")

import torch  # noqa: E402

from vllm_a2a_plugin import AllToAllSpec, ops, padding_expert_id  # noqa: E402
from vllm_a2a_plugin.padding import linear_expert_owner  # noqa: E402
from vllm_a2a_plugin.reference import (combine_reference, dense_moe_reference,  # noqa: E402
                                       dispatch_reference, experts_reference)


def main() -> None:
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    from vllm.config import ParallelConfig

    config = ParallelConfig(data_parallel_size=4, enable_expert_parallel=True,
                            all2all_backend="a2a_one_sided")
    print(f"vLLM accepts --all2all-backend {config.all2all_backend} (use_all2all={config.use_all2all})")

    p, e, k, h = 4, 16, 4, 256
    expert_map = torch.full((e,), -1)
    expert_map[12:16] = torch.arange(4)
    print(f"rank 3 pads empty slots with expert {padding_expert_id(expert_map, e)} "
          f"(owned by rank 0), not -1")

    gen = torch.Generator().manual_seed(0)
    counts = [7, 0, 12, 3]  # rank 1 has no tokens this step
    ids = [torch.rand((n, e), generator=gen).topk(k, dim=1).indices.int() for n in counts]
    xs = [torch.randn((n, h), generator=gen).bfloat16() for n in counts]
    ws = [torch.rand((n, k), generator=gen) for n in counts]
    owner = linear_expert_owner(e, p)

    def expert(i, x):
        return x * (1 + i / e)

    if ops.kernels_available():
        from vllm_a2a_plugin import LocalRanks

        ranks = LocalRanks(AllToAllSpec(ep_size=p, max_tokens_per_rank=16, hidden_size=h,
                                        top_k=k, num_experts=e))
        recv = ranks.dispatch([x.cuda() for x in xs], [i.cuda() for i in ids],
                              [w.cuda() for w in ws])
        ys = [experts_reference(r, expert, local_experts=range(q * 4, q * 4 + 4),
                                out_dtype=torch.bfloat16) for q, r in enumerate(recv)]
        outs = [o.cpu() for o in ranks.combine(ys)]
        ranks.synchronize()
        where = f"our CUDA kernels on {torch.cuda.get_device_name()}"
    else:
        recv = dispatch_reference(xs=xs, topk_ids=ids, topk_weights=ws, expert_owner=owner)
        ys = [experts_reference(r, expert, local_experts=range(q * 4, q * 4 + 4),
                                out_dtype=torch.bfloat16) for q, r in enumerate(recv)]
        outs = combine_reference(ys=ys, topk_ids=ids, expert_owner=owner,
                                 runtime_max_tokens=recv[0].runtime_max_tokens)
        where = "the reference all-to-all (no CUDA kernels on this machine)"
    for r in range(p):
        dense = dense_moe_reference(xs[r], ids[r], ws[r], expert)
        err = ((outs[r].float() - dense).norm() / dense.norm().clamp_min(1e-9)).item()
        print(f"rank {r}: {counts[r]:2d} tokens, relative error vs dense MoE {err:.1e}")
        assert err < 2e-2
    print(f"round trip OK with {where}")


if __name__ == "__main__":
    main()
