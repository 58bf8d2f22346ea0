"""The public peer implementations, fetched here for a machine without network (the GPU machine).

    python bench/fetch_peers.py [--dir peers] [--source distributed_shampoo=DIR ...]   # with network
    python bench/fetch_peers.py --install [--dir peers] [--target DIR]                # there, no network

Fetch (the default) downloads the peers' wheels from PyPI at pinned versions into ``--dir``
(``peers/`` at the repository root by default, ignored by git), for Python ``--python`` (3.12,
the GPU machine's), with ``pip download --no-deps --only-binary=:all:``: every peer is pure
Python, so one wheel serves every platform. Their requirements that the GPU machine lacks are
fetched too (PEERS below); torch, numpy and triton are the machine's. ``--source NAME=DIR`` copies
a peer that is not on PyPI from a local checkout (DIR: the package's folder, e.g. Distributed
Shampoo's ``distributed_shampoo/``, or the authors' KL prototype's folder) into ``DIR/src/NAME``.
``DIR/manifest.json`` lists every file with its version, size and sha256; the total must stay
under ``--max-mib`` (64: what travels with a lease of the GPU machine, bench/gpu_suite.py).

Install puts them into the running interpreter's environment without network: ``pip install
--no-index --no-deps`` of the wheels (ISTA-DASLab-Optimizers lists wandb, timm, torchvision and
its CUDA package as requirements, none of which DASH needs), and the sources on a ``.pth`` file
in site-packages, or copied into ``--target`` when given (pip's ``--target`` for the wheels).

Never a dependency of klkern: bench/peer_step.py skips, with a line, each peer that is absent.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (distribution, version, why): the peers and the requirements of theirs a bare GPU machine lacks.
PEERS = [
    ("heavyball", "3.2.1", "KLShampoo, KLSOAP, SOAP"),
    ("opt-einsum", "3.4.0", "HeavyBall's requirement"),
    ("emerging-optimizers", "0.3.0", "SOAP, KL-SOAP (Python >= 3.12)"),
    ("absl-py", "2.5.1", "Emerging-Optimizers' requirement"),
    ("ista-daslab-optimizers", "1.1.15", "DASH"),
    ("pytorch-optimizer", "4.1.0", "SOAP"),
]


def download_command(directory: Path, python: str) -> list:
    """The pip command that fetches every wheel of PEERS into ``directory``."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
            python, "--platform", "any", "--dest", str(directory)] + [f"{name}=={version}"
                                                                       for name, version, _ in PEERS]


def install_command(wheel: Path, target: Path | None) -> list:
    return ([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
            + (["--target", str(target)] if target else []) + [str(wheel)])


def copy_source(directory: Path, name: str, source: Path) -> Path:
    """``source`` (a package's folder) copied to ``directory/src/name``, without caches or VCS files."""
    if not source.is_dir():
        raise SystemExit(f"fetch_peers: --source {name}={source}: not a folder")
    dest = directory / "src" / name
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.pyc", "*.so"))
    return dest


def manifest(directory: Path) -> dict:
    """Every file under ``directory`` (but the manifest) with its size and sha256, and the total."""
    files = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != "manifest.json"):
        data = path.read_bytes()
        files.append({"file": str(path.relative_to(directory)), "bytes": len(data),
                      "sha256": hashlib.sha256(data).hexdigest()})
    return {"peers": [{"distribution": n, "version": v, "for": why} for n, v, why in PEERS], "files": files,
            "total_bytes": sum(f["bytes"] for f in files)}


def install(directory: Path, target: Path | None) -> tuple[list, list]:
    """Install the wheels (one at a time: one that this Python cannot take, e.g. Emerging-Optimizers
    below 3.12, is reported and the others go on) and the sources of ``directory``; returns
    (installed, [(wheel, pip's last line)] that failed)."""
    done, failed = [], []
    for wheel in sorted(directory.glob("*.whl")):
        run = subprocess.run(install_command(wheel, target), capture_output=True, text=True)
        if run.returncode == 0:
            done.append(wheel.name)
        else:
            lines = [ln for ln in (run.stderr or run.stdout).splitlines() if ln.strip()]
            failed.append((wheel.name, lines[-1] if lines else f"pip exited with {run.returncode}"))
    sources = sorted(p for p in (directory / "src").glob("*") if p.is_dir()) if (directory / "src").is_dir() else []
    if sources and target:
        target.mkdir(parents=True, exist_ok=True)
        for src in sources:
            shutil.copytree(src, target / src.name, dirs_exist_ok=True)
    elif sources:
        (Path(sysconfig.get_paths()["purelib"]) / "klkern_peers.pth").write_text(str((directory / "src").resolve())
                                                                                 + "\n")
    return done + [f"src/{p.name}" for p in sources], failed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=ROOT / "peers")
    ap.add_argument("--python", default="3.12", help="the Python version the wheels are for (the GPU machine's)")
    ap.add_argument("--source", action="append", default=[], metavar="NAME=DIR",
                    help="copy a peer that is not on PyPI from a local checkout into DIR/src/NAME")
    ap.add_argument("--no-download", action="store_true", help="only copy --source folders and write the manifest")
    ap.add_argument("--max-mib", type=float, default=64.0)
    ap.add_argument("--install", action="store_true", help="install what --dir holds (no network)")
    ap.add_argument("--target", type=Path, help="with --install: install into this folder instead")
    args = ap.parse_args(argv)
    if args.install:
        if not args.dir.is_dir():
            raise SystemExit(f"fetch_peers: --dir {args.dir} does not exist; run `python bench/fetch_peers.py` "
                             "where there is network, and bring the folder along")
        done, failed = install(args.dir, args.target)
        print("installed: " + (", ".join(done) or "nothing"))
        for wheel, why in failed:
            print(f"not installed: {wheel}: {why}", file=sys.stderr)
        return 0 if done else 1
    args.dir.mkdir(parents=True, exist_ok=True)
    if not args.no_download:
        subprocess.run(download_command(args.dir, args.python), check=True)
    for item in args.source:
        name, _, folder = item.partition("=")
        if not name or not folder:
            raise SystemExit(f"fetch_peers: --source {item!r}: expected NAME=DIR")
        copy_source(args.dir, name, Path(folder))
    info = manifest(args.dir)
    (args.dir / "manifest.json").write_text(json.dumps(info, indent=1) + "\n")
    mib = info["total_bytes"] / 2**20
    print(f"{len(info['files'])} files, {mib:.1f} MiB in {args.dir}")
    if mib > args.max_mib:
        print(f"fetch_peers: {mib:.1f} MiB is over --max-mib {args.max_mib:g}: it will not travel with a lease",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
