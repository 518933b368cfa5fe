"""What the SGLang tests share: importing SGLang's MoE layers (or the one reason
not to), and the process state SGLang's scheduler sets up before its MoE layers run.

SGLang 0.5.23 imports its compiled ``sgl_kernel`` package from its MoE and
quantization modules whenever ``torch.cuda`` is available (e.g.
``layers/quantization/compressed_tensors/schemes/compressed_tensors_w8a8_int8.py``),
and that wheel is built for SGLang's torch 2.14.1 only. So on a GPU machine with
another torch, those modules cannot be imported, and that alone is a skip; every
other import error still fails the test.
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager
from types import SimpleNamespace

import pytest

SGLANG_MOE_LAYER = "sglang.srt.layers.moe.fused_moe_triton.layer"


def import_or_skip_without_sgl_kernel(module: str = SGLANG_MOE_LAYER):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != "sgl_kernel":
            raise
        pytest.skip(f"importing {module} needs SGLang's compiled sgl_kernel on a CUDA "
                    f"machine, and it is not installed here (its wheel is built for torch "
                    f"2.14.1): {exc}")


def ep_group_stand_in(size: int, *, rank: int | None = None, cpu_group=None):
    """What SGLang's group getters hand out (``get_parallel().tp_group`` ...),
    for a group this test does not build as SGLang's ``GroupCoordinator``.

    SGLang builds its groups in ``initialize_model_parallel``, and their
    ``GroupCoordinator`` opens NCCL communicators, which refuse several ranks
    on one GPU; logical ranks sharing one process have no process group at all.
    So the test states the group (SGLang's error for an unwritten group says
    to, with ``get_parallel().override``) as its size, its ranks and, where
    this process is one rank of it, this rank and the real gloo group. A
    logical-ranks stand-in has no ``rank_in_group`` / ``cpu_group``: a read of
    them fails instead of answering for one rank.
    """
    group = SimpleNamespace(world_size=size, ranks=list(range(size)))
    if rank is not None:
        group.rank_in_group = rank
        group.cpu_group = cpu_group
    return group


@contextmanager
def sglang_ep_state(ep_size: int, *, rank: int | None = None, cpu_group=None,
                    gpu_id: int | None = None, device: str = "cuda"):
    """SGLang's process state for ``--moe-a2a-backend a2a_one_sided`` with EP =
    TP = attention-DP = ``ep_size`` (attention TP 1), as its scheduler process
    sets it up before a model runs; the previous state is put back on exit.

    The steps are SGLang's own (``managers/scheduler.py`` run_scheduler_process,
    ``distributed/bootstrap.py`` _init_parallel_groups):

      * ``publish(server_args, role="scheduler", ranks=SpawnRanks(...))``: the
        config namespaces (``get_exec()`` ...; the Triton runner reads
        ``get_exec().deterministic`` / ``.moe`` / ``.comm`` for its kernel config,
        its sum-all-reduce and its symmetric-memory output) and, with ``rank``,
        this process's ranks (``tp_rank``, ``moe_ep_rank``, attention ranks);
        without ``rank`` (logical ranks sharing this process) none is stamped;
      * ``initialize_moe_config()``: the MoE flags (a2a backend -> our
        ``CUSTOMIZED`` member, runner backend, two-batch overlap);
      * the groups: ``tp_group`` (read by the Triton runner for its output
        allocation) and ``moe_ep_group`` (the same group, since EP spans TP), as
        :func:`ep_group_stand_in` objects through SGLang's scoped
        ``get_parallel().override``;
      * ``initialize_dp_attention_flags``: ``get_flags().dp.enabled`` (the
        placement half of ``initialize_dp_attention`` re-derives the attention
        ranks that ``publish`` already stamped).

    Restoring goes through SGLang's ``snapshot_context`` / ``restore_context``
    (what ``sglang.Engine`` does when a launch fails), ranks and groups included.
    The per-step DP sizes (``set_dp_buffer_len``: the per-DP-rank token counts
    our dispatcher reads) live outside that context, so they are put back too.
    """
    from sglang.srt.layers import dp_attention
    from sglang.srt.layers.dp_attention import initialize_dp_attention_flags
    from sglang.srt.layers.moe.utils import initialize_moe_config
    from sglang.srt.plugins import load_plugins
    from sglang.srt.runtime_context import (SpawnRanks, get_parallel, publish, restore_context,
                                            snapshot_context)
    from sglang.srt.server_args import prepare_server_args

    from vllm_a2a_plugin import BACKEND_NAME
    from vllm_a2a_plugin.sglang import register

    load_plugins()  # as every SGLang process does first: our flag value parses
    register()  # idempotent; where the package runs from PYTHONPATH no entry point is installed
    saved = snapshot_context()
    saved_dp_sizes = (dp_attention.get_global_dp_buffer_len(),
                      dp_attention.get_local_dp_buffer_len(), dp_attention.is_dp_max_padding(),
                      dp_attention.get_dp_global_num_tokens(),
                      dp_attention._DpGatheredBufferWrapper.get_dp_global_num_tokens_gpu())
    # The snapshot holds the parallel context's override and stamp dicts by
    # reference, and override() / publish() grow those in place: keep copies,
    # or the restore would bring this state's groups and ranks back.
    saved["__parallel__"] = {name: dict(value) if isinstance(value, dict) else value
                             for name, value in saved["__parallel__"].items()}
    try:
        args = prepare_server_args(["--model-path", "dummy", "--device", device,
                                    "--moe-a2a-backend", BACKEND_NAME,
                                    "--tp-size", str(ep_size), "--ep-size", str(ep_size),
                                    "--attn-dp-size", str(ep_size)])
        args.resolve_once()
        ranks = None if rank is None else SpawnRanks(world_rank=rank, gpu_id=gpu_id)
        publish(args, role="scheduler", ranks=ranks)
        initialize_moe_config()
        group = ep_group_stand_in(ep_size, rank=rank, cpu_group=cpu_group)
        with get_parallel().override(tp_group=group, moe_ep_group=group):
            initialize_dp_attention_flags(args)
            yield args
    finally:
        restore_context(saved)
        dp_attention.set_dp_buffer_len(*saved_dp_sizes)
