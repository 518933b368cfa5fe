"""The offline vLLM bundle: trimming rules, the split/stage round trip on a
small fake archive, and the committed manifest of the real bundle."""

from __future__ import annotations

import io
import json
import random
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import vllm_bundle  # noqa: E402

# vLLM release -> the flashinfer-python it pins (both travel in the bundle).
FLASHINFER_OF = {"0.32.0": "0.7.0.post1", "0.33.0": "0.7.2.post1"}
STABLE_ABI_LIBS = ("vllm/_C_stable_libtorch.abi3.so", "vllm/_moe_C_stable_libtorch.abi3.so",
                   "vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so")


def test_trim_rules_keep_what_loads_with_torch_2_11():
    for kept in (*STABLE_ABI_LIBS, "vllm/third_party/deep_gemm/__init__.py",
                 "vllm/model_executor/layers/fused_moe/fused_moe.py"):
        assert not vllm_bundle.trimmed(kept), kept
    for dropped in ("vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so", "vllm/vllm-rs",
                    "vllm/third_party/deep_gemm/_C_extension.abi3.so",
                    "vllm/third_party/fmha_sm100/cutlass/include/cute/tensor.hpp"):
        assert vllm_bundle.trimmed(dropped), dropped


def test_split_then_stage_round_trip(tmp_path):
    site = io.BytesIO()
    with tarfile.open(fileobj=site, mode="w:xz") as tar:
        payload = random.Random(0).randbytes(5000)  # incompressible: several parts
        info = tarfile.TarInfo("pkg/data.bin")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    archive = tmp_path / "site.tar.xz"
    archive.write_bytes(site.getvalue())
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    parts = vllm_bundle.split_file(archive, bundle, part_bytes=1000)
    assert len(parts) > 1 and all(p["bytes"] <= 1000 for p in parts)
    (bundle / "manifest.json").write_text(json.dumps(
        {"parts": parts, "archive_sha256": vllm_bundle.sha256(archive)}))
    store, target = tmp_path / "store", tmp_path / "site"
    # Parts arrive one run at a time; only the last run unpacks.
    everything = {p["name"]: (bundle / p["name"]).read_bytes() for p in parts}
    for name in everything:
        (bundle / name).unlink()
    for i, (name, data) in enumerate(everything.items()):
        (bundle / name).write_bytes(data)
        vllm_bundle.main(["stage", "--bundle", str(bundle), "--store", str(store),
                          "--target", str(target)])
        (bundle / name).unlink()
        assert (target / "pkg" / "data.bin").is_file() == (i == len(everything) - 1)
    assert (target / "pkg" / "data.bin").read_bytes() == payload


def test_stage_refuses_a_corrupt_part(tmp_path):
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "part-00.bin").write_bytes(b"abc")
    (bundle / "manifest.json").write_text(json.dumps(
        {"parts": [{"name": "part-00.bin", "bytes": 3, "sha256": "0" * 64}],
         "archive_sha256": "0" * 64}))
    with pytest.raises(SystemExit, match="corrupt"):
        vllm_bundle.main(["stage", "--bundle", str(bundle), "--store", str(tmp_path / "s"),
                          "--target", str(tmp_path / "t")])


def test_every_supported_release_has_a_committed_manifest():
    assert set(vllm_bundle.VLLM_VERSIONS) == set(FLASHINFER_OF)
    for version in vllm_bundle.VLLM_VERSIONS:
        assert vllm_bundle.manifest_path(version).is_file(), version


@pytest.mark.parametrize("version", sorted(FLASHINFER_OF))
def test_committed_manifest_describes_a_usable_bundle(version):
    manifest = json.loads(vllm_bundle.manifest_path(version).read_text())
    assert manifest["vllm"] == version and manifest["python"] == "3.12"
    assert manifest["packages"]["vllm"] == version
    assert manifest["packages"]["flashinfer-python"] == FLASHINFER_OF[version]
    for needed in ("pydantic", "pydantic-core", "fastapi", "uvicorn", "websockets",
                   "msgspec", "pyzmq",
                   "compressed-tensors", "loguru", "apache-tvm-ffi", "xgrammar", "llguidance"):
        assert needed in manifest["packages"], needed
    limit = 56 * 2**20
    assert all(p["bytes"] <= limit for p in manifest["parts"])
    assert sum(p["bytes"] for p in manifest["parts"]) == manifest["archive_bytes"]
    largest = manifest["trimmed"]["largest"]
    assert "vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so" in largest
    assert not any(lib in largest for lib in STABLE_ABI_LIBS)


def test_build_refuses_an_environment_with_another_vllm():
    vllm_bundle.check_build_environment("0.33.0", "0.33.0")
    with pytest.raises(SystemExit, match=r"--vllm 0\.33\.0, but this Python .* has vllm 0\.32\.0"):
        vllm_bundle.check_build_environment("0.33.0", "0.32.0")
    with pytest.raises(SystemExit, match="has vllm not installed"):
        vllm_bundle.check_build_environment("0.32.0", None)
    with pytest.raises(SystemExit, match="bundles are built for 0.33.0, 0.32.0"):
        vllm_bundle.check_build_environment("0.31.0", "0.31.0")
