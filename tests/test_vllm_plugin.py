"""The plugin against the real vLLM install, 0.32 or 0.33 (CPU): entry point, vLLM's own
loader, CLI, configs, version guard. Each case runs in a fresh interpreter
because plugins patch vLLM process-wide."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

import pytest
import torch

pytest.importorskip("vllm")


def vllm_version() -> str:
    from importlib.metadata import version

    return version("vllm")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=300)


def test_entry_point_is_declared():
    (ours,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "a2a_one_sided"]
    assert ours.value == "vllm_a2a_plugin:register"


def test_vllm_loader_runs_our_plugin_and_config_validates():
    proc = run_python("""
        import pickle
        import torch
        from vllm.plugins import load_general_plugins
        load_general_plugins()
        from vllm.config import ParallelConfig, VllmConfig
        pc = ParallelConfig(data_parallel_size=2, enable_expert_parallel=True,
                            all2all_backend="a2a_one_sided")
        vc = VllmConfig(parallel_config=pc)
        assert vc.parallel_config.all2all_backend == "a2a_one_sided"
        assert pickle.loads(pickle.dumps(vc)).parallel_config.all2all_backend == "a2a_one_sided"
        assert pc.use_all2all
        sp = ParallelConfig(data_parallel_size=2, tensor_parallel_size=2,
                            enable_expert_parallel=True, all2all_backend="a2a_one_sided")
        assert sp.use_sequence_parallel_moe
        try:
            ParallelConfig(all2all_backend="a2a_one_sidd")
        except Exception as exc:
            assert "a2a_one_sided" in str(exc), exc  # pydantic lists the allowed names
        else:
            raise AssertionError("misspelt backend accepted")
        assert not torch.cuda.is_initialized()
        print("OK")
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK" in proc.stdout


def test_without_the_plugin_vllm_rejects_the_name():
    """VLLM_PLUGINS excluding us: the name is unknown, so our patch is what adds it."""
    proc = run_python("""
        from vllm.plugins import load_general_plugins
        load_general_plugins()
        from vllm.config import ParallelConfig
        try:
            ParallelConfig(all2all_backend="a2a_one_sided")
        except Exception:
            print("REJECTED")
    """, VLLM_PLUGINS="lora_filesystem_resolver")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "REJECTED" in proc.stdout


def test_cli_accepts_flag_and_rejects_misspelling():
    proc = run_python("""
        from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs
        from vllm.utils.argparse_utils import FlexibleArgumentParser
        parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
        args = parser.parse_args(["--all2all-backend", "a2a_one_sided",
                                  "--enable-expert-parallel"])
        engine_args = EngineArgs.from_cli_args(args)
        assert engine_args.all2all_backend == "a2a_one_sided"
        try:
            parser.parse_args(["--all2all-backend", "a2a_one_sidd"])
        except SystemExit as exc:
            print("EXIT", exc.code)
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "EXIT 2" in proc.stdout
    assert "invalid choice: 'a2a_one_sidd'" in proc.stderr


@pytest.mark.slow
def test_vllm_serve_help_lists_backend():
    # The `vllm` console script where pip installed vLLM; where vLLM comes from
    # PYTHONPATH (the GPU machine's bundle) there is none, and its module runs the same main().
    script = os.path.join(os.path.dirname(sys.executable), "vllm")
    cli = [script] if os.path.exists(script) else [sys.executable, "-m", "vllm.entrypoints.cli.main"]
    proc = subprocess.run([*cli, "serve", "--help=all2all-backend"], cwd=ROOT,
                          capture_output=True, text=True,
                          env={**os.environ, "VLLM_TARGET_DEVICE": "cpu"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "a2a_one_sided" in proc.stdout


def test_served_dp_on_one_gpu_command_is_external_lb_on_local_device_0(tmp_path):
    """The ``vllm serve`` command line of the one-GPU DP engine test
    (``engine_check.serve_dp_command``) through vLLM's own serve parser and
    config: external load balancing, one engine per process whose local DP
    rank defaults to 0 (its worker takes cuda:0), rank 0 runs the coordinator,
    DP sync on gloo, fixed KV cache, our counter extension for /collective_rpc."""
    proc = run_python(f"""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.cli.serve import ServeSubcommand
        from vllm.plugins import load_general_plugins
        from vllm.usage.usage_lib import UsageContext
        from vllm.utils.argparse_utils import FlexibleArgumentParser
        from vllm_a2a_plugin.testing.engine_check import (COUNTS_WORKER_EXTENSION,
                                                          serve_dp_command)
        from vllm_a2a_plugin.testing.tiny_moe import TinyMoESpec, make_tiny_moe

        load_general_plugins()
        model = str(make_tiny_moe({str(tmp_path)!r}, TinyMoESpec(top_k=2)))
        root = FlexibleArgumentParser()
        ServeSubcommand().subparser_init(root.add_subparsers(dest="subparser"))
        for rank in (0, 1):
            cmd = serve_dp_command(model, rank, 2, 8000 + rank, 29600,
                                   ["--all2all-backend", "a2a_one_sided", "--enforce-eager"])
            assert cmd[1:4] == ["-m", "vllm.entrypoints.cli.main", "serve"], cmd
            args = root.parse_args(cmd[3:])
            args.model = args.model_tag  # what vLLM's CLI main does
            ServeSubcommand().validate(args)
            config = AsyncEngineArgs.from_cli_args(args).create_engine_config(
                usage_context=UsageContext.OPENAI_API_SERVER)
            pc = config.parallel_config
            assert (pc.data_parallel_size, pc.data_parallel_rank) == (2, rank)
            assert pc.data_parallel_external_lb and pc.local_engines_only
            assert pc.data_parallel_size_local == 1
            assert pc.data_parallel_rank_local is None  # the engine process sets 0
            assert config.needs_dp_coordinator and config.model_config.is_moe
            assert pc.disable_nccl_for_dp_synchronization is True
            assert config.cache_config.kv_cache_memory_bytes == 1 << 30
            assert pc.worker_extension_cls == COUNTS_WORKER_EXTENSION
            assert pc.all2all_backend == "a2a_one_sided" and pc.enable_expert_parallel
            assert (pc.data_parallel_master_ip, pc.data_parallel_rpc_port) == ("127.0.0.1", 29600)
        print("OK")
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK" in proc.stdout


def test_llm_keyword_reaches_engine_args():
    """LLM(..., all2all_backend=...) forwards its kwargs to EngineArgs."""
    proc = run_python("""
        import inspect
        from vllm import LLM
        from vllm.engine.arg_utils import EngineArgs
        from vllm.plugins import load_general_plugins
        load_general_plugins()
        assert "kwargs" in inspect.signature(LLM.__init__).parameters
        args = EngineArgs(model="unused", all2all_backend="a2a_one_sided",
                          enable_expert_parallel=True, data_parallel_size=2)
        from vllm.config import ParallelConfig
        pc = ParallelConfig(all2all_backend=args.all2all_backend,
                            enable_expert_parallel=args.enable_expert_parallel,
                            data_parallel_size=args.data_parallel_size)
        print("OK", pc.all2all_backend)
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK a2a_one_sided" in proc.stdout


def test_register_is_idempotent_cheap_and_leaves_cuda_alone():
    proc = run_python("""
        import sys, time
        import vllm_a2a_plugin
        start = time.perf_counter()
        vllm_a2a_plugin.register()
        vllm_a2a_plugin.register()
        elapsed = time.perf_counter() - start
        heavy = [m for m in ("vllm.model_executor.layers.fused_moe.all2all_utils",
                             "vllm.distributed.device_communicators.cuda_communicator")
                 if m in sys.modules]
        import torch
        assert not torch.cuda.is_initialized()
        print("OK", heavy, elapsed < 5.0)
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK [] True" in proc.stdout  # patches wait for their modules' import


def test_patches_apply_when_modules_are_imported_before_register():
    proc = run_python("""
        import vllm.model_executor.layers.fused_moe.oracle.unquantized as unq
        import vllm.model_executor.layers.fused_moe.all2all_utils as au
        import vllm.distributed.device_communicators.cuda_communicator as cc
        original = au.maybe_make_prepare_finalize
        import vllm_a2a_plugin
        vllm_a2a_plugin.register()
        assert au.maybe_make_prepare_finalize is not original
        assert unq.maybe_make_prepare_finalize is au.maybe_make_prepare_finalize
        assert getattr(cc.CudaCommunicator.__init__, "_a2a_wrapped", False)
        print("OK")
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK" in proc.stdout


def test_unsupported_vllm_version_gets_one_clear_error():
    from vllm_a2a_plugin.vllm.hooks import UnsupportedVllmVersionError, check_vllm_version

    for supported in ("0.32.0", "0.32.1+cu130", "0.33.0", "0.33.1rc1"):
        assert check_vllm_version(supported) == supported
    for too_old_or_new in ("0.31.2", "0.34.0", "1.0.0"):
        with pytest.raises(UnsupportedVllmVersionError,
                           match=r"supports vLLM 0\.32\.x or 0\.33\.x \(tested with 0\.32\.0 and "
                                 rf"0\.33\.0\); found vLLM {re.escape(too_old_or_new)}\. Install "
                                 r"vllm==0\.33\.0 \(or 0\.32\.0\)"):
            check_vllm_version(too_old_or_new)


def test_installed_vllm_is_a_supported_release():
    """The version guard passes for the vLLM this suite runs against (CI runs it
    once per supported release), and the plugin's patches applied there."""
    from importlib.metadata import version

    from vllm_a2a_plugin.vllm.compat import TESTED_VLLM, vllm_series
    from vllm_a2a_plugin.vllm.hooks import check_vllm_version

    installed = version("vllm")
    assert check_vllm_version() == installed
    assert vllm_series(installed) in TESTED_VLLM
    print(f"vLLM {installed}")


def test_engine_args_build_a_full_config_for_a_local_moe_model(tmp_path):
    """EngineArgs -> VllmConfig with our flag, DP=2 EP, on a tiny MoE made here."""
    from vllm_a2a_plugin.testing.tiny_moe import make_tiny_moe

    model = make_tiny_moe(tmp_path / "tiny-moe")
    proc = run_python(f"""
        import pickle
        from vllm.plugins import load_general_plugins
        load_general_plugins()
        from vllm.engine.arg_utils import EngineArgs
        args = EngineArgs(model={str(model)!r}, all2all_backend="a2a_one_sided",
                          enable_expert_parallel=True, data_parallel_size=2,
                          enforce_eager=True, max_model_len=256)
        cfg = args.create_engine_config()
        assert cfg.model_config.is_moe
        assert cfg.parallel_config.all2all_backend == "a2a_one_sided"
        assert cfg.parallel_config.use_all2all
        pickle.loads(pickle.dumps(cfg))
        print("OK")
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK" in proc.stdout


def test_engine_benchmark_model_is_a_valid_qwen3_moe_config(tmp_path):
    """benchmarks/engine_throughput.py serves Qwen3-30B-A3B's architecture with dummy
    weights: vLLM must accept the config we write (no weights on disk)."""
    from vllm_a2a_plugin.testing.tiny_moe import QWEN3_30B_A3B, write_config_and_tokenizer

    write_config_and_tokenizer(tmp_path, QWEN3_30B_A3B)
    proc = run_python(f"""
        from vllm.plugins import load_general_plugins
        load_general_plugins()
        from vllm.engine.arg_utils import EngineArgs
        cfg = EngineArgs(model={str(tmp_path)!r}, load_format="dummy",
                         all2all_backend="a2a_one_sided", enable_expert_parallel=True,
                         data_parallel_size=2, max_model_len=2048).create_engine_config()
        hf = cfg.model_config.hf_config
        assert cfg.model_config.is_moe and hf.num_experts == 128 and hf.num_experts_per_tok == 8
        assert hf.hidden_size == 2048 and hf.num_hidden_layers == 48
        print("OK")
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK" in proc.stdout


def test_zero_token_rank_quantizes_without_a_launch():
    """vLLM's per-token fp8 kernel cannot launch on [0, H] (seen on an H100); our
    prepare's quantisation gives empty tensors of the right dtypes and shapes."""
    proc = run_python("""
        import torch
        from vllm.model_executor.layers.fused_moe.config import fp8_w8a8_moe_quant_config
        from vllm_a2a_plugin.vllm.prepare_finalize import quantize_for_dispatch
        w = torch.ones(4, 1, 1)
        a1 = torch.empty((0, 512), dtype=torch.bfloat16)
        cases = {
            "per_token": (fp8_w8a8_moe_quant_config(w1_scale=w, w2_scale=w,
                                                    per_act_token_quant=True), (0, 1)),
            "block": (fp8_w8a8_moe_quant_config(w1_scale=w, w2_scale=w,
                                                block_shape=[128, 128]), (0, 4)),
        }
        for name, (qc, scale_shape) in cases.items():
            x, s = quantize_for_dispatch(a1, qc)
            assert x.shape == (0, 512) and x.dtype == torch.float8_e4m3fn, (name, x)
            assert s.shape == scale_shape and s.dtype == torch.float32, (name, s.shape)
        static = torch.tensor([0.5])
        qc = fp8_w8a8_moe_quant_config(w1_scale=w, w2_scale=w, a1_scale=static)
        x, s = quantize_for_dispatch(a1, qc)
        assert x.shape == (0, 512) and s is static
        print("OK")
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK" in proc.stdout


def test_transposed_block_scales_are_refused_where_vllm_has_them():
    """vLLM 0.33's FusedMoEQuantConfig.is_scale_transposed asks for [H/128, T]
    scales; we dispatch [T, H/128], so such a layer is refused before sizing a
    workspace. 0.32 has no such field: nothing to refuse there."""
    import dataclasses

    from vllm.model_executor.layers.fused_moe.config import (
        FusedMoEQuantConfig,
        fp8_w8a8_moe_quant_config,
    )

    from vllm_a2a_plugin.errors import A2AInputError
    from vllm_a2a_plugin.vllm.compat import activation_scales_transposed
    from vllm_a2a_plugin.vllm.prepare_finalize import dispatch_layout

    w = torch.ones(4, 1, 1, dtype=torch.float32)
    block = fp8_w8a8_moe_quant_config(w1_scale=w, w2_scale=w, block_shape=[128, 128])
    assert not activation_scales_transposed(block)
    assert dispatch_layout(512, block, torch.bfloat16, False).scale_cols == 4
    if "is_scale_transposed" not in {f.name for f in dataclasses.fields(FusedMoEQuantConfig)}:
        assert vllm_version().startswith("0.32.")
        return
    transposed = dataclasses.replace(block, is_scale_transposed=True)
    assert activation_scales_transposed(transposed)
    with pytest.raises(A2AInputError, match="transposed"):
        dispatch_layout(512, transposed, torch.bfloat16, False)


def test_engine_check_queues_every_request_before_the_first_step():
    """engine_check's one-batch generate calls vLLM's pause / enqueue / resume API
    (fp8 per-tensor scales depend on which tokens share a step): each call binds to
    this vLLM's ``LLM`` signatures, in this order, and DP ranks keep ``generate``."""
    import inspect

    from vllm import LLM, SamplingParams

    from vllm_a2a_plugin.testing.engine_check import generate_in_one_batch

    calls = []

    class Recorder:
        """Binds each call against the real ``LLM`` method before recording it."""

        def __getattr__(self, name):
            def method(*args, **kwargs):
                inspect.signature(getattr(LLM, name)).bind(self, *args, **kwargs)
                calls.append((name, args, kwargs))
                return ["done"] if name in ("wait_for_completion", "generate") else None
            return method

    params = SamplingParams(temperature=0, max_tokens=2)
    env = dict(os.environ)
    os.environ.pop("VLLM_DP_SIZE", None)
    try:
        assert generate_in_one_batch(Recorder(), ["a", "b"], params) == ["done"]
        assert [name for name, _, _ in calls] == ["sleep", "enqueue", "wake_up",
                                                 "wait_for_completion"]
        assert calls[0][2] == {"level": 0} and calls[2][2] == {"tags": ["scheduling"]}
        calls.clear()
        os.environ["VLLM_DP_SIZE"] = "2"
        assert generate_in_one_batch(Recorder(), ["a"], params) == ["done"]
        assert [name for name, _, _ in calls] == ["generate"]
    finally:
        os.environ.clear()
        os.environ.update(env)
