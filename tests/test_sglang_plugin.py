"""The SGLang plugin inside the real SGLang 0.5.23 (CPU): loading, flag, enum, resolution.

Runs in the SGLang environment (``bash scripts/install_sglang.sh``); skipped
where SGLang is not installed (the vLLM environments).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

pytest.importorskip("sglang.srt.plugins", reason="SGLang is not installed (SGLang env only)")

from tests.sglang_support import import_or_skip_without_sgl_kernel  # noqa: E402
from vllm_a2a_plugin import BACKEND_NAME  # noqa: E402


@pytest.fixture(scope="module")
def loaded():
    """SGLang's own loader runs our ``sglang.srt.plugins`` entry point."""
    from sglang.srt.plugins import load_plugins

    load_plugins()
    from vllm_a2a_plugin.sglang import hooks

    return hooks


def test_entry_point_is_in_sglangs_group():
    from importlib.metadata import entry_points

    names = {ep.name: ep.value for ep in entry_points(group="sglang.srt.plugins")}
    assert names.get(BACKEND_NAME) == "vllm_a2a_plugin.sglang:register"


def test_loader_installs_our_hooks(loaded):
    from sglang.srt.plugins.hook_registry import HookRegistry

    assert loaded._installed
    assert "sglang.srt.arg_groups.overrides._a2a_fusion_adjustments" in HookRegistry._patched
    layer = import_or_skip_without_sgl_kernel()

    assert "sglang.srt.layers.moe.fused_moe_triton.layer.create_moe_dispatcher" in \
        HookRegistry._patched
    assert hasattr(layer.create_moe_dispatcher, "__wrapped__")


def test_flag_parses_with_sglangs_parser(loaded):
    from sglang.srt.server_args import prepare_server_args

    args = prepare_server_args(["--model-path", "dummy", "--moe-a2a-backend", BACKEND_NAME,
                                "--speculative-moe-a2a-backend", BACKEND_NAME])
    assert args.moe_a2a_backend == BACKEND_NAME
    assert args.speculative_moe_a2a_backend == BACKEND_NAME
    with pytest.raises(SystemExit):
        prepare_server_args(["--model-path", "dummy", "--moe-a2a-backend", "no_such_backend"])


def test_help_lists_the_backend(loaded):
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(prog="sglang serve")
    ServerArgs.add_cli_args(parser)
    action = next(a for a in parser._actions if "--moe-a2a-backend" in a.option_strings)
    assert BACKEND_NAME in action.choices
    assert BACKEND_NAME in parser.format_help()


def test_literal_validation_accepts_only_known_names(loaded):
    import msgspec
    from sglang.srt.arg_groups.fields.exec_ import ExecMoe

    assert msgspec.convert({"moe_a2a_backend": BACKEND_NAME}, ExecMoe).moe_a2a_backend == \
        BACKEND_NAME
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"moe_a2a_backend": "no_such_backend"}, ExecMoe)


def test_published_config_carries_the_name(loaded):
    import_or_skip_without_sgl_kernel("sglang.srt.layers.quantization")  # resolve_once loads it
    from sglang.srt.runtime_context import get_exec, publish
    from sglang.srt.server_args import prepare_server_args

    args = prepare_server_args(["--model-path", "dummy", "--moe-a2a-backend", BACKEND_NAME,
                                "--device", "cpu"])
    args.resolve_once()
    publish(args, role="scheduler")
    assert get_exec().moe.moe_a2a_backend == BACKEND_NAME


def test_two_batch_overlap_is_accepted_with_our_backend(loaded):
    """--enable-two-batch-overlap with our backend parses, resolves and reaches the
    runtime flag SGLang's dispatcher factory reads (is_tbo_enabled)."""
    import_or_skip_without_sgl_kernel("sglang.srt.layers.quantization")  # resolve_once loads it
    from sglang.srt.layers.moe.utils import initialize_moe_config, is_tbo_enabled
    from sglang.srt.runtime_context import get_exec, publish
    from sglang.srt.server_args import prepare_server_args

    args = prepare_server_args(["--model-path", "dummy", "--moe-a2a-backend", BACKEND_NAME,
                                "--enable-two-batch-overlap", "--tp-size", "2",
                                "--device", "cpu"])
    args.resolve_once()
    assert args.enable_two_batch_overlap
    publish(args, role="scheduler")
    initialize_moe_config()
    assert get_exec().overlap.enable_two_batch_overlap
    assert is_tbo_enabled()
    # SGLang's TBO gate (validation_hook.check_two_batch_overlap) refuses TBO only
    # without an EP all-to-all (and without attention DP).
    from sglang.srt.arg_groups.validation_hook import check_two_batch_overlap

    check_two_batch_overlap(args)
    without = prepare_server_args(["--model-path", "dummy", "--moe-a2a-backend", "none",
                                   "--enable-two-batch-overlap", "--device", "cpu"])
    without.resolve_once()
    with pytest.raises(ValueError, match="attention DP"):
        check_two_batch_overlap(without)


def test_sglang_gives_every_tp_rank_its_own_gpu():
    """Why an SGLang engine cannot put two EP (= TP) ranks on one GPU: rank r runs
    on GPU base_gpu_id + r * gpu_id_step (entrypoints/engine.py), and SGLang's
    validation asserts gpu_id_step >= 1 (arg_groups/validation_hook.py). The
    dispatcher itself runs with ranks sharing a GPU: tests/test_sglang_gpu.py."""
    import_or_skip_without_sgl_kernel("sglang.srt.layers.quantization")
    from sglang.srt.server_args import prepare_server_args

    args = prepare_server_args(["--model-path", "dummy", "--served-model-name", "dummy",
                                "--moe-a2a-backend", BACKEND_NAME, "--tp-size", "2",
                                "--gpu-id-step", "0", "--device", "cpu"])
    args.resolve_once()
    with pytest.raises(AssertionError, match="gpu_id_step must be positive"):
        args.check_server_args()


def test_runtime_enum_is_customized_and_flashinfer_like(loaded):
    from sglang.srt.layers.moe.utils import MoeA2ABackend

    backend = MoeA2ABackend(BACKEND_NAME)
    assert backend is MoeA2ABackend.CUSTOMIZED
    assert backend.is_flashinfer() and not backend.is_none() and not backend.is_deepep()
    assert MoeA2ABackend.FLASHINFER.is_flashinfer()
    assert not MoeA2ABackend.NONE.is_flashinfer()
    with pytest.raises(ValueError, match="No MoeA2ABackend member"):
        MoeA2ABackend("no_such_backend")


def test_resolution_passes_treat_us_as_an_ep_all_to_all(loaded):
    from sglang.srt.arg_groups import moe_hook, overrides

    view = SimpleNamespace(moe_a2a_backend=BACKEND_NAME, ep_size=1, tp_size=4,
                           enable_waterfill=False, disable_shared_experts_fusion=False)
    assert overrides._a2a_ep_size(view) == {"ep_size": 4}
    assert overrides._a2a_fusion_adjustments(view) == {"disable_shared_experts_fusion": True}
    # moe_hook imported the pass by name: SGLang's HookRegistry rebound it there too.
    assert moe_hook._a2a_fusion_adjustments(view) == {"disable_shared_experts_fusion": True}
    other = SimpleNamespace(moe_a2a_backend="none", ep_size=1, tp_size=4,
                            enable_waterfill=False, disable_shared_experts_fusion=False)
    assert overrides._a2a_ep_size(other) == {}
    assert overrides._a2a_fusion_adjustments(other) == {}


def test_unsupported_version_is_one_clear_error():
    from vllm_a2a_plugin.sglang.hooks import UnsupportedSglangVersionError, check_sglang_version

    assert check_sglang_version("0.5.23") == "0.5.23"
    with pytest.raises(UnsupportedSglangVersionError, match="supports sglang 0.5.23; found"):
        check_sglang_version("0.5.22")


@pytest.mark.parametrize("module, forbidden", [
    ("vllm_a2a_plugin.sglang.hooks", "vllm"),
    ("vllm_a2a_plugin.sglang.dispatcher", "vllm"),
    ("vllm_a2a_plugin.vllm.hooks", "sglang"),
])
def test_engine_adapters_do_not_import_each_other(module, forbidden):
    code = (f"import sys, importlib; importlib.import_module({module!r}); "
            f"bad = sorted(m for m in sys.modules if m == {forbidden!r} or "
            f"m.startswith({forbidden!r} + '.')); print(bad); sys.exit(1 if bad else 0)")
    # CUDA hidden: the import graph is the question, and on a GPU machine SGLang's
    # modules would also import its compiled sgl_kernel (tests/sglang_support.py).
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stdout + result.stderr
