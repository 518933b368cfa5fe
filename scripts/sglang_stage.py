"""Stage SGLang 0.5.23 on the GPU machine (torch 2.11.0+cu130, Python 3.12, no network).

The device tool carries at most 64 MiB per call (the working tree included) and
keeps /tmp between back-to-back calls on a warm machine, so the wheels travel
in parts, one part per call, each installed into /tmp/sglang_site on arrival.

Here (a machine with network)::

    python3 scripts/sglang_stage.py build        # -> .whl-sglang/p1, p2, ... (+ manifest.json)

There, one call per part, in order, then the test call::

    python3 scripts/sglang_stage.py install .whl-sglang/p1     # carry [".whl-sglang/p1"]
    python3 scripts/sglang_stage.py install .whl-sglang/p2     # carry [".whl-sglang/p2"]
    bash scripts/gpu_session.sh sglang                          # checks the staged site

What travels (``build``):
  * ``scripts/sglang_gpu_wheels.txt``: sglang 0.5.23 and the pure-Python or
    cp312 packages it imports that the GPU image lacks (lean: SGLang's import
    chain for serving, not its whole dependency list);
  * ``scripts/sglang_engine_wheels.txt``: what the engine process tree
    (``sglang.Engine``: tokenizer manager, scheduler, detokenizer) imports
    beyond that;
  * ``sglang-kernel==0.4.5``, trimmed. sglang 0.5.23 pins sglang-kernel 0.4.10,
    built against torch 2.14's C++ ABI, which the image's torch 2.11.0 cannot
    load; 0.4.5 is the last kernel built for torch 2.11.0 (cu130, cp310-abi3),
    and every top-level ``sgl_kernel`` name 0.5.23 imports on CUDA exists in
    it. Its wheel is 383 MB; dropped, each imported by sgl_kernel under
    try/except or only for other GPUs:
      - ``flash_ops*.so`` (1.1 GB unpacked): FlashAttention-3 kernels, used only
        by ``--attention-backend fa3``; the runs here use Triton attention;
      - ``flashmla_ops*.so``: FlashMLA (DeepSeek MLA attention), not used by the
        Qwen3-MoE models here;
      - ``infllm_ops*.so``: InfLLM sparse attention, unused;
      - ``sm100/``: the Blackwell build of ``common_ops`` (sgl_kernel loads the
        ``sm90/`` one on Hopper).
    The wheel keeps its name and metadata; RECORD loses the dropped files'
    lines, so pip installs it unchanged otherwise.

Parts hold at most ``--part-mib`` MiB of wheels (default 50: with the ~6 MiB
working tree a call stays under the tool's 64 MiB). Wheels are cached in
``.whl-sglang/cache`` (never carried).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGE = ROOT / ".whl-sglang"
CACHE = STAGE / "cache"
KERNEL = "sglang-kernel==0.4.5"
KERNEL_WHEEL = "sglang_kernel-0.4.5-cp310-abi3-manylinux2014_x86_64.whl"
# Dropped from the kernel wheel (see the module docstring for why).
DROP_PREFIXES = ("sgl_kernel/flash_ops", "sgl_kernel/flashmla_ops", "sgl_kernel/infllm_ops",
                 "sgl_kernel/sm100/")
WHEEL_LISTS = ("scripts/sglang_gpu_wheels.txt", "scripts/sglang_engine_wheels.txt")
SITE = "/tmp/sglang_site"


def _download(args: list[str]) -> None:
    CACHE.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
           "--no-deps", "--only-binary=:all:", "--python-version", "3.12", "-d", str(CACHE),
           *args]
    subprocess.run(cmd, check=True)


def trim_kernel_wheel(source: Path, target: Path) -> dict:
    """Copy ``source`` to ``target`` without the files matching DROP_PREFIXES.

    Returns what was dropped and kept (names and sizes), for the manifest.
    """
    dropped, kept = [], 0
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(
            target, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as dst:
        for info in src.infolist():
            name = info.filename
            if name.startswith(DROP_PREFIXES):
                dropped.append({"file": name, "bytes": info.file_size})
                continue
            data = src.read(name)
            if name.endswith(".dist-info/RECORD"):
                lines = [line for line in data.decode().splitlines()
                         if not line.split(",", 1)[0].startswith(DROP_PREFIXES)]
                data = ("\n".join(lines) + "\n").encode()
            dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
            kept += 1
    names = zipfile.ZipFile(target).namelist()
    missing = [n for n in ("sgl_kernel/__init__.py", "sgl_kernel/sm90/common_ops.abi3.so")
               if n not in names]
    if missing:
        raise SystemExit(f"trimmed kernel wheel lacks {missing}")
    return {"dropped": dropped, "kept_files": kept, "bytes": target.stat().st_size}


def _wheels_of(list_file: Path) -> list[str]:
    lines = [line.split("#", 1)[0].strip() for line in list_file.read_text().splitlines()]
    return [line for line in lines if line]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(part_mib: float) -> dict:
    """Download, trim, split into parts under .whl-sglang/p<N>; writes manifest.json."""
    requirements = [req for name in WHEEL_LISTS if (ROOT / name).exists()
                    for req in _wheels_of(ROOT / name)]
    _download(requirements)
    if not (CACHE / KERNEL_WHEEL).exists():
        _download(["--platform", "manylinux2014_x86_64", KERNEL])
    trimmed_dir = STAGE / "trimmed"
    trimmed_dir.mkdir(parents=True, exist_ok=True)
    trimmed = trimmed_dir / KERNEL_WHEEL
    kernel_info = trim_kernel_wheel(CACHE / KERNEL_WHEEL, trimmed)
    wanted = {_norm(req.split("==")[0]): req for req in requirements}
    wheels = [w for w in sorted(CACHE.glob("*.whl"))
              if _norm(w.name.split("-")[0]) in wanted]
    missing = set(wanted) - {_norm(w.name.split("-")[0]) for w in wheels}
    if missing:
        raise SystemExit(f"no wheel downloaded for {sorted(missing)}")
    wheels.append(trimmed)
    for old in STAGE.glob("p[0-9]*"):
        shutil.rmtree(old)
    # First fit, largest first: few parts, each under the limit.
    limit = int(part_mib * 2**20)
    parts: list[list[Path]] = []
    sizes: list[int] = []
    for wheel in sorted(wheels, key=lambda w: -w.stat().st_size):
        size = wheel.stat().st_size
        if size > limit:
            raise SystemExit(f"{wheel.name} ({size / 2**20:.1f} MiB) exceeds a part")
        for i, used in enumerate(sizes):
            if used + size <= limit:
                parts[i].append(wheel)
                sizes[i] += size
                break
        else:
            parts.append([wheel])
            sizes.append(size)
    manifest = {"parts": [], "kernel": kernel_info, "site": SITE}
    for i, members in enumerate(parts, start=1):
        directory = STAGE / f"p{i}"
        directory.mkdir()
        for wheel in members:
            shutil.copy2(wheel, directory / wheel.name)
        manifest["parts"].append({
            "dir": str(directory.relative_to(ROOT)), "mib": round(sizes[i - 1] / 2**20, 1),
            "wheels": {w.name: _sha256(w) for w in sorted(members)}})
    for i, part in enumerate(manifest["parts"], start=1):
        (STAGE / f"p{i}" / "manifest.json").write_text(json.dumps(manifest, indent=1))
    (STAGE / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def _norm(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def install(part: Path, site: str = SITE, *, dry_run: bool = False) -> list[str]:
    """Check a part against its manifest and install its wheels into ``site``."""
    manifest = json.loads((part / "manifest.json").read_text())
    entry = next(p for p in manifest["parts"] if Path(p["dir"]).name == part.name)
    for name, digest in entry["wheels"].items():
        if _sha256(part / name) != digest:
            raise SystemExit(f"{name}: checksum differs from the manifest (partial copy?)")
    wheels = [str(part / name) for name in entry["wheels"]]
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
           "--no-index", "--no-deps", "--upgrade", "--target", site, *wheels]
    if dry_run:
        print(" ".join(cmd))
        return wheels
    Path(site).mkdir(parents=True, exist_ok=True)
    subprocess.run(cmd, check=True)
    shutil.copy2(part / "manifest.json", Path(site) / "stage_manifest.json")
    done = Path(site) / ".staged_parts"
    staged = set(done.read_text().split()) if done.exists() else set()
    staged.add(part.name)
    done.write_text("\n".join(sorted(staged)) + "\n")
    print(f"staged {part.name}: {len(wheels)} wheels -> {site} "
          f"({len(staged)}/{len(manifest['parts'])} parts)")
    return wheels


def check_staged(site: str = SITE) -> None:
    """Exit non-zero unless every part of the manifest was installed into ``site``."""
    done = Path(site) / ".staged_parts"
    manifest_file = Path(site) / "stage_manifest.json"
    if not manifest_file.exists():
        raise SystemExit(f"nothing staged in {site}: run the install calls first")
    manifest = json.loads(manifest_file.read_text())
    staged = set(done.read_text().split()) if done.exists() else set()
    want = {Path(p["dir"]).name for p in manifest["parts"]}
    if want - staged:
        raise SystemExit(f"parts not staged in {site}: {sorted(want - staged)}")
    print(f"all {len(want)} parts staged in {site}")


TORCH_SYMBOL = re.compile(r"^_Z(T[IVS])?N?K?(3c10|2at|5torch|6caffe2)")


def _dynamic_symbols(library: Path, *, defined: bool) -> set[str]:
    flag = "--defined-only" if defined else "--undefined-only"
    out = subprocess.run(["nm", "-D", flag, str(library)], check=True, capture_output=True,
                         text=True).stdout
    return {line.split()[-1].split("@")[0] for line in out.splitlines() if line.strip()}


def check_symbols(kernel_wheel: Path, torch_lib: Path) -> dict:
    """Every c10/ATen/torch C++ symbol the trimmed kernel's libraries import is
    exported by the torch libraries in ``torch_lib`` (what ``dlopen(RTLD_NOW)``
    beside that torch would resolve). Returns {library: [missing symbols]}."""
    import tempfile

    exported: set[str] = set()
    for library in sorted(torch_lib.glob("lib*.so*")):
        exported |= _dynamic_symbols(library, defined=True)
    missing = {}
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(kernel_wheel) as wheel:
        for name in wheel.namelist():
            if not name.endswith(".so"):
                continue
            path = Path(wheel.extract(name, tmp))
            needed = {s for s in _dynamic_symbols(path, defined=False) if TORCH_SYMBOL.match(s)}
            missing[name] = sorted(needed - exported)
            print(f"{name}: {len(needed)} torch symbols imported, {len(missing[name])} missing")
    return missing


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--part-mib", type=float, default=50.0)
    i = sub.add_parser("install")
    i.add_argument("part", type=Path)
    i.add_argument("--site", default=os.environ.get("SGLANG_SITE", SITE))
    i.add_argument("--dry-run", action="store_true")
    y = sub.add_parser("check-symbols", help="the trimmed kernel against a torch's libraries")
    y.add_argument("--torch-lib", type=Path, required=True,
                   help="torch/lib of the GPU image's torch (2.11.0+cu130), unpacked")
    y.add_argument("--kernel", type=Path, default=STAGE / "trimmed" / KERNEL_WHEEL)
    c = sub.add_parser("check")
    c.add_argument("--site", default=os.environ.get("SGLANG_SITE", SITE))
    args = parser.parse_args(argv)
    if args.cmd == "build":
        manifest = build(args.part_mib)
        for part in manifest["parts"]:
            print(f"{part['dir']}: {part['mib']} MiB, {len(part['wheels'])} wheels")
        print(f"kernel: dropped {len(manifest['kernel']['dropped'])} files, trimmed wheel "
              f"{manifest['kernel']['bytes'] / 2**20:.1f} MiB")
    elif args.cmd == "check-symbols":
        missing = check_symbols(args.kernel, args.torch_lib)
        for name, symbols in missing.items():
            for symbol in symbols:
                print(f"  {name}: missing {symbol}")
        if any(missing.values()):
            raise SystemExit(1)
    elif args.cmd == "install":
        install(args.part, args.site, dry_run=args.dry_run)
    else:
        check_staged(args.site)


if __name__ == "__main__":
    main()
