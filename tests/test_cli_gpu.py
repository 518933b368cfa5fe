"""``vllm-a2a doctor`` on a GPU machine: the kernels are usable and the
symmetric-memory and CUDA IPC probes really ran there.

Writes the report to ``$OUT/doctor.json`` when ``OUT`` is set (the GPU machines'
output folder). An engine that is not installed is the only reason allowed to
remain (the GPU machines get vLLM as a bundle on ``PYTHONPATH``, SGLang as
wheels).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_doctor_on_a_gpu_probes_the_workspace_paths():
    done = subprocess.run([sys.executable, "-m", "vllm_a2a_plugin", "doctor", "--json"],
                          capture_output=True, text=True, timeout=900)
    report = json.loads(done.stdout)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "doctor.json").write_text(done.stdout)
    assert done.returncode == (0 if report["ready"] else 1)
    checks = report["checks"]
    assert checks["kernels"]["usable"], checks["kernels"]
    assert checks["gpus"]["devices"], checks["gpus"]
    workspace = checks["workspace"]
    for probe in ("symmetric_memory", "cuda_ipc"):
        assert workspace[probe] is not None and "detail" in workspace[probe]
    assert workspace["path"] in ("symmetric", "cuda_ipc"), workspace
    others = [r for r in report["reasons"] if not r.startswith("neither vLLM nor SGLang")]
    assert not others, others
