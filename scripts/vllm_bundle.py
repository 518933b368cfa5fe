"""Offline bundle of vLLM (0.33.0 or 0.32.0) for the GPU machines (no network, torch 2.11).

What is known to work there (design §9): vLLM 0.32's stable-ABI libraries
(``_C_stable_libtorch``, ``_moe_C_stable_libtorch``, ``vllm_flash_attn/_vllm_fa3_C``)
load with torch 2.11; with vLLM's Python code, flashinfer as vLLM pins it and
the small packages the image lacks, the engine runs. vLLM 0.33's same three
libraries link no c10/at:: C++ symbols either and import exactly the same set of
torch stable-ABI C functions (``aoti_torch_*``/``torch_*``) as 0.32's, so they
are expected to load with torch 2.11 as well. This script only *configures*: it
edits no vLLM or flashinfer code and writes no stub modules.

Steps (here, with network to the package index; run it with the Python of an
environment that has that vLLM installed, e.g. ``.venv`` for 0.33.0 and
``.venv-vllm032`` for 0.32.0: the dependency closure is read from it):
  .venv/bin/python scripts/vllm_bundle.py build --vllm 0.33.0 --out .bundle033
     -> .bundle033/part-00.bin ... (byte ranges of one site.tar.xz, each <= --part-mb)
     -> .bundle033/manifest.json (parts, sha256, packages, what was trimmed),
        also kept as scripts/vllm_bundle_manifest_0.33.0.json

Then on the GPU machine, one device call per part in quick succession (files
under /tmp survive while the machine stays warm), each carrying that part:
  python3 scripts/vllm_bundle.py stage --bundle .bundle033 --target /tmp/vllm_site
It verifies and stores the parts it finds; once all are there it unpacks the
site; then ``export PYTHONPATH=/tmp/vllm_site``.

Trimmed from vLLM's wheel: FlashAttention 2 (Hopper uses FA3), the ``vllm-rs``
binary, and the compiled parts and C++ headers of ``third_party`` (DeepGEMM's
extension does not load with torch 2.11 in 0.32; 0.33's is stable-ABI but uses
functions 0.32's loaded libraries do not, unproven there; fmha_sm100 is
Blackwell-only). Their Python modules stay, so imports keep working.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

HERE = Path(__file__).resolve().parent
VLLM_VERSIONS = ("0.33.0", "0.32.0")  # newest first: the default
PYTHON_VERSION = "3.12"
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux_2_34_x86_64", "manylinux_2_31_x86_64",
             "manylinux_2_24_x86_64", "manylinux1_x86_64"]
# Present on the GPU image in a version that works (torch stack, CUDA libs).
NEVER_BUNDLE = {"torch", "torchvision", "torchaudio", "torchcodec", "triton", "numpy"}
# In vLLM's dependency closure but not on the path of an offline bf16/fp8 engine
# run on Hopper, and large: a Triton fork, video decoding, optional kernel
# libraries, hosted-API clients and tracing exporters vLLM imports lazily.
# (model-hosting-container-standards is *not* skipped: `vllm serve` imports it when
# it builds its routes; its `supervisor` dependency is never imported.)
SKIP = {"tokenspeed-triton", "tokenspeed-mla", "tilelang", "pynvvideocodec", "quack-kernels",
        "humming-kernels", "instanttensor", "fastsafetensors", "anthropic", "mcp", "mcp-types",
        "supervisor", "nccl-extensions",
        # fastapi[standard]'s cloud CLI, which `vllm serve` never calls
        "fastapi-cli", "fastapi-cloud-cli", "sentry-sdk", "agent-detector", "detect-installer",
        "rignore", "fastar", "rich-toolkit"}
TRIM_PATTERNS = [
    r"^vllm/vllm_flash_attn/_vllm_fa2_C\.abi3\.so$",
    r"^vllm/vllm-rs$",
    r"^vllm/third_party/.*\.(so|hpp|h|cuh|cu|cpp|inl)$",
]


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def gpu_image_packages() -> set[str]:
    lines = (HERE / "gpu_image_packages.txt").read_text().split()
    return {normalize(n) for n in lines}


def parse_requirement(req: str, active_extras: set[str]) -> tuple[str, set[str]] | None:
    """(name, requested extras) of a Requires-Dist entry that applies on Linux
    x86_64 given the extras requested of the package that declares it."""
    body, _, marker = req.partition(";")
    extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
    if extra and normalize(extra.group(1)) not in active_extras:
        return None
    if re.search(r"sys_platform\s*==\s*['\"](darwin|win32)['\"]", marker):
        return None
    if "platform_machine" in marker and "x86_64" not in marker:
        return None
    match = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*(\[([^\]]*)\])?", body)
    if match is None:
        return None
    extras = {normalize(e) for e in (match.group(3) or "").split(",") if e.strip()}
    return normalize(match.group(1)), extras


def missing_packages() -> dict[str, str]:
    """vLLM's dependency closure (as installed here, extras followed) minus the
    GPU image: name -> version."""
    present = gpu_image_packages() | NEVER_BUNDLE
    todo: list[tuple[str, set[str]]] = [("vllm", set())]
    seen: set[tuple[str, frozenset]] = set()
    missing: dict[str, str] = {}
    while todo:
        name, extras = todo.pop()
        key = (name, frozenset(extras))
        if key in seen or name in SKIP:
            continue
        seen.add(key)
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        if name != "vllm" and name not in present and not name.startswith("nvidia-"):
            missing[name] = dist.version
        for req in dist.requires or []:
            parsed = parse_requirement(req, extras)
            if parsed is not None:
                todo.append(parsed)
    return dict(sorted(missing.items()))


def download(names: dict[str, str], dest: Path) -> None:
    specs = [f"{n}=={v}" for n, v in names.items()]
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", PYTHON_VERSION, "--implementation", "cp", "-d", str(dest)]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    for spec in specs:  # one at a time: a failure names the package
        subprocess.run(cmd + [spec], check=True)


def trimmed(name: str) -> bool:
    return any(re.match(p, name) for p in TRIM_PATTERNS)


def build_site(wheels: Path, site: Path) -> dict[str, int]:
    """Unpack every wheel into ``site`` (pip --target layout), trimming vLLM."""
    trimmed_bytes: dict[str, int] = {}
    for wheel in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():
                if wheel.name.startswith("vllm-") and trimmed(info.filename):
                    trimmed_bytes[info.filename] = info.file_size
                    continue
                zf.extract(info, site)
    for so in site.rglob("*.so"):
        so.chmod(0o755)
    return trimmed_bytes


def summarize_trimmed(trimmed_bytes: dict[str, int]) -> dict:
    largest = sorted(trimmed_bytes.items(), key=lambda kv: -kv[1])[:10]
    return {"files": len(trimmed_bytes), "bytes": sum(trimmed_bytes.values()),
            "largest": dict(largest)}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def split_file(path: Path, out: Path, part_bytes: int) -> list[dict]:
    parts = []
    with path.open("rb") as f:
        index = 0
        while chunk := f.read(part_bytes):
            part = out / f"part-{index:02d}.bin"
            part.write_bytes(chunk)
            parts.append({"name": part.name, "bytes": len(chunk),
                          "sha256": hashlib.sha256(chunk).hexdigest()})
            index += 1
    return parts


def manifest_path(vllm_version: str) -> Path:
    """The committed manifest of the last bundle built for ``vllm_version``."""
    return HERE / f"vllm_bundle_manifest_{vllm_version}.json"


def check_build_environment(vllm_version: str, installed: str | None) -> None:
    """The closure is read from this interpreter's packages: they must be the
    requested vLLM's."""
    if vllm_version not in VLLM_VERSIONS:
        raise SystemExit(f"--vllm {vllm_version}: bundles are built for {', '.join(VLLM_VERSIONS)}")
    if installed != vllm_version:
        raise SystemExit(
            f"--vllm {vllm_version}, but this Python ({sys.executable}) has vllm "
            f"{installed or 'not installed'}: run the script with the Python of an environment "
            f"with vllm=={vllm_version} (VLLM_VERSION={vllm_version} VENV=<dir> bash "
            "scripts/install.sh makes one)")


def cmd_build(args) -> None:
    try:
        installed = distribution("vllm").version
    except PackageNotFoundError:
        installed = None
    check_build_environment(args.vllm, installed)
    out = Path(args.out)
    work = Path(args.work)
    wheels, site = work / "wheels", work / "site"
    shutil.rmtree(work, ignore_errors=True)
    wheels.mkdir(parents=True)
    packages = missing_packages()
    packages.pop("flashinfer-python", None)
    pinned = {"vllm": args.vllm, "flashinfer-python": distribution("flashinfer-python").version,
              **packages}
    download(pinned, wheels)
    trimmed_bytes = build_site(wheels, site)
    archive = work / "site.tar.xz"
    # xz -T0 uses every core; Python's lzma reads the result on the GPU machine.
    subprocess.run(["tar", "-C", str(site), "-cf", "-", "."], check=True,
                   stdout=open(work / "site.tar", "wb"))
    subprocess.run(["xz", "-T0", "-6", "-f", str(work / "site.tar")], check=True)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    parts = split_file(archive, out, args.part_mb * 2**20)
    manifest = {
        "vllm": args.vllm, "python": PYTHON_VERSION, "archive": "site.tar.xz",
        "archive_sha256": sha256(archive), "archive_bytes": archive.stat().st_size,
        "parts": parts, "packages": pinned, "trimmed": summarize_trimmed(trimmed_bytes),
        "stage": f"python3 scripts/vllm_bundle.py stage --bundle {args.out} "
                 "--target /tmp/vllm_site",
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    shutil.copyfile(out / "manifest.json", manifest_path(args.vllm))
    print(json.dumps({k: v for k, v in manifest.items() if k != "packages"}, indent=1))


def cmd_stage(args) -> None:
    bundle, target = Path(args.bundle), Path(args.target)
    store = Path(args.store)
    store.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((bundle / "manifest.json").read_text())
    for part in manifest["parts"]:
        src = bundle / part["name"]
        if src.is_file():
            if sha256(src) != part["sha256"]:
                raise SystemExit(f"{src} is corrupt (sha256 mismatch)")
            shutil.copyfile(src, store / part["name"])
            print(f"stored {part['name']}")
    have = [p for p in manifest["parts"] if (store / p["name"]).is_file()]
    print(f"{len(have)}/{len(manifest['parts'])} parts staged in {store}")
    if len(have) < len(manifest["parts"]):
        return
    if (target / ".complete").is_file():
        print(f"{target} already unpacked")
        return
    blob = io.BytesIO()
    for part in manifest["parts"]:
        blob.write((store / part["name"]).read_bytes())
    if hashlib.sha256(blob.getvalue()).hexdigest() != manifest["archive_sha256"]:
        raise SystemExit("reassembled archive does not match the manifest")
    blob.seek(0)
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=blob, mode="r:xz") as tar:
        tar.extractall(target, filter="data")
    (target / ".complete").write_text(manifest["archive_sha256"])
    print(f"unpacked into {target}; export PYTHONPATH={target}")


def cmd_plan(args) -> None:
    print(json.dumps(missing_packages(), indent=1))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("plan", help="list the packages the GPU image lacks").set_defaults(fn=cmd_plan)
    build = sub.add_parser("build", help="download, trim, compress, split")
    build.add_argument("--vllm", default=VLLM_VERSIONS[0], choices=VLLM_VERSIONS,
                       help="vLLM release to bundle (default: %(default)s)")
    build.add_argument("--out", default=".bundle")
    build.add_argument("--work", default="/tmp/vllm_bundle_work")
    build.add_argument("--part-mb", type=int, default=56)
    build.set_defaults(fn=cmd_build)
    stage = sub.add_parser("stage", help="on the GPU machine: store parts, unpack when complete")
    stage.add_argument("--bundle", default=".bundle")
    stage.add_argument("--store", default="/tmp/vllm_bundle_parts")
    stage.add_argument("--target", default="/tmp/vllm_site")
    stage.set_defaults(fn=cmd_stage)
    args = parser.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
