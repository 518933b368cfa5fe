"""Everything vLLM-specific: hooks into vLLM 0.32, the all2all manager and the
modular-kernel prepare/finalize. Nothing below ``vllm_a2a_plugin.all_to_all``
knows about vLLM."""
