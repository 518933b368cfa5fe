"""A short SGLang tour: SGLang's own plugin loader runs our entry point, its
server-argument parser accepts ``--moe-a2a-backend a2a_one_sided`` (also with
``--enable-two-batch-overlap``), and the backend resolves to our dispatcher's
runtime value. (The all-to-all itself is
the same as the vLLM demo's; ``tests/test_sglang_dispatch_cpu.py`` runs it
through SGLang's MoE runner across processes.)"""

from __future__ import annotations

from vllm_a2a_plugin import BACKEND_NAME


def main() -> None:
    from sglang.srt.plugins import load_plugins

    load_plugins()  # what every SGLang process does at start
    from sglang.srt.layers.moe.utils import MoeA2ABackend
    from sglang.srt.server_args import prepare_server_args

    from vllm_a2a_plugin.sglang import hooks

    print(f"SGLang {hooks.check_sglang_version()} loaded vllm-a2a-plugin")
    args = prepare_server_args(["--model-path", "dummy", "--moe-a2a-backend", BACKEND_NAME,
                                "--tp-size", "2", "--ep-size", "2"])
    print(f"SGLang accepts --moe-a2a-backend {args.moe_a2a_backend}; runtime value "
          f"{MoeA2ABackend(args.moe_a2a_backend)!r}")
    # Two-batch overlap: SGLang drives our dispatcher's dispatch_a/dispatch_b/
    # combine_a/combine_b per micro-batch, each on its own workspace.
    tbo = prepare_server_args(["--model-path", "dummy", "--moe-a2a-backend", BACKEND_NAME,
                               "--tp-size", "2", "--enable-two-batch-overlap"])
    print(f"... and --enable-two-batch-overlap with it: {tbo.enable_two_batch_overlap}")


if __name__ == "__main__":
    main()
