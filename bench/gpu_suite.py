"""The GPU suite: one command that fits one lease of a GPU machine.

    bash bench/gpu_suite.sh --out DIR [--budget SECONDS] [PART ...]
    python bench/gpu_suite.py unpack DIR [--dest FOLDER]

``run`` (what gpu_suite.sh does) first makes sure that what it tests is this
checkout, installed, with the Triton kernels importable and the QR extension
built, and prints that in its first lines (device, versions, commit, kernels,
extension). Then it runs its parts in priority order, the decisive numbers
first (PARTS below: check, the whole-step benchmark, the QR methods, the
kernel microbenchmarks, the CUDA tests, the compile check, a profile of one
step, the GPU main job's learning-rate sweep and comparison, the refresh, the
peers), each in its own process group with a time limit, and starts a part
only while the budget (seconds from the suite's start, default 480) leaves
the part its least useful time. Every part writes into a work folder outside
DIR; after each part, DIR is rewritten to hold at most
``MAX_FILES`` files: ``summary.md`` (environment, a table of parts, the
parts' own tables), ``suite.log`` (everything printed), ``environment.json``
and ``results.tar.gz`` (every file the parts wrote). A lease returns only
what lies in such a folder, and a suite killed mid-part still leaves the
parts before it packed.

``unpack`` extracts DIR into ``bench/results/gpu_<device>/`` for commit.

Without a CUDA GPU ``run`` prints one line saying why and exits with 2. The suite and its parts
run with the interpreter that runs this file (gpu_suite.sh: ``$PYTHON``, else ``python3``), named
in that line and in the header.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_FILES = 8
RESERVE_S = 10  # kept back from the budget for the final packing
DEFAULT_BUDGET_S = 480


@dataclasses.dataclass
class Part:
    """One part: ``command(work_dir, seconds)`` returns the commands to run (run in order, each
    given what is left of the part's time); ``least`` is the fewest seconds worth starting it with."""
    name: str
    least: int
    limit: int
    about: str
    command: object = None
    env: dict = dataclasses.field(default_factory=dict)


def _py(*args) -> list:
    return [sys.executable, *map(str, args)]


# Shapes of the kernel microbenchmarks inside the suite (GPT-2-small and a 1B-class block);
# bench/test_kernel_bench.py alone runs all of kernel_cases.SHAPES.
SUITE_KERNEL_SHAPES = "12x768x768,12x768x3072,12x2048x2048"

# Tests that exercise the kernels, the QR extension and the CUDA paths (fast ones first).
SUITE_TESTS = ["tests/test_qr.py::test_extension_on_gpu", "tests/test_qr.py::test_extension_nan_and_bad_input_on_gpu",
               "tests/test_qr.py::test_extension_bad_input_raises_a_catchable_error",
               "tests/test_qr.py::test_klshampoo_with_and_without_extension", "tests/test_check.py",
               "tests/test_graph.py", "tests/test_dispatch.py",
               "tests/test_triton.py", "tests/test_precision.py", "tests/test_guard.py"]


def _cmd_check(work: Path, seconds: float):
    return [_py("-m", "klkern.check", "--json", work / "check.json")]


def _cmd_step(work: Path, seconds: float):
    return [_py("bench/step_bench.py", "--out", work, "--budget", max(int(seconds) - 15, 10))]


def _cmd_qr(work: Path, seconds: float):
    # the refresh's own input first (what decides method="auto"), then the random matrices
    half = max(int(seconds) // 2 - 10, 5)
    return [_py("bench/qr_bench.py", "--input", "factor", "--out-dir", work, "--budget", half),
            _py("bench/qr_bench.py", "--out-dir", work, "--budget", half)]


def _cmd_refresh(work: Path, seconds: float):
    # the whole step with every refresh by shifted CholeskyQR3, against the step part's "auto"
    return [_py("bench/step_bench.py", "--qr-method", "shifted_cholqr3", "--precisions", "high",
                "--optimizers", "KLShampoo,KLSOAP", "--freq1-optimizers", "KLShampoo,KLSOAP", "--no-graph",
                "--out", work, "--budget", max(int(seconds) - 15, 10))]


def _cmd_peers(work: Path, seconds: float):
    # the public implementations, from peers/ (bench/fetch_peers.py; it travels with the lease)
    return [*_install_peers(),
            _py("bench/peer_step.py", "--device", "cuda", "--matmul-precision", "highest", "--no-profile",
                "--rounds", "2", "--out", work / "peer_step_cuda.md")]


def _cmd_kernels(work: Path, seconds: float):
    return [_py("-m", "pytest", "-q", "-p", "no:cacheprovider", "bench/test_kernel_bench.py",
                f"--benchmark-json={work / 'kernels.json'}", "--benchmark-columns=median,min,max"),
            _py("bench/summarize_kernel_bench.py", work / "kernels.json", "--out", work / "kernels.md")]


def _cmd_tests(work: Path, seconds: float):
    return [_py("-m", "pytest", "-q", "-rfEs", "--durations=10", "-p", "no:cacheprovider",
                f"--junitxml={work / 'tests.xml'}",
                *SUITE_TESTS)]


def _cmd_compile(work: Path, seconds: float):
    arch = os.environ.get("KLKERN_SUITE_ARCH", "90")
    # recorded under the interpreter (kernels not executed), compiled without it (compile_check's docstring)
    return [(_py("-m", "klkern.triton_kernels.compile_check", "record", work / "variants.json"),
             {"TRITON_INTERPRET": "1"}),
            (_py("-m", "klkern.triton_kernels.compile_check", "compile", work / "variants.json", "--arch", arch,
                 "--subset", "representative", "--out", work / "compile.json", "--md", work / "compile.md"),
             {"TRITON_INTERPRET": None})]


def _cmd_profile(work: Path, seconds: float):
    return [_py("bench/step_profile.py", "--out", work)]


# The GPU main job's comparison: torch's fused AdamW, klkern's four (Shampoo with and without
# grafting, for the paper's ordering KL-Shampoo >= SOAP > Shampoo without grafting), and HeavyBall's
# SOAP where peers/ travelled with the lease (bench/fetch_peers.py; train_lm skips it, and says so,
# otherwise)
GPU_JOB_OPTIMIZERS = "adamw,klshampoo,klsoap,soap,shampoo,shampoo-nograft,heavyball-soap"
SWEEP_GRID = "1e-3,3e-3,1e-2"  # extended twice along the ladder where the best is on an edge (nograft: 1e-4)
SWEEP_STEPS = 200


def _install_peers() -> list:
    """Installing the peers that travelled in peers/ (none when it is absent)."""
    peers = ROOT / "peers"
    return [_py("bench/fetch_peers.py", "--install", "--dir", peers)] if peers.is_dir() else []


def _cmd_sweep(work: Path, seconds: float):
    # the GPU main job's learning rates: one short run per rate of the same grid for every optimizer
    return [*_install_peers(),
            _py("bench/lr_sweep.py", "--preset", "gpu", "--device", "cuda", "--steps", SWEEP_STEPS,
                "--grid", SWEEP_GRID, "--extend", "2", "--optimizers", GPU_JOB_OPTIMIZERS, "--no-progress",
                "--out", work / "lr_sweep_gpu")]


def _cmd_train(work: Path, seconds: float):
    # the GPU main job, 2 seeds, seed-major (a cut leaves whole comparisons; train_lm's summary is
    # rewritten after every run), at the rates the sweep part chose when it ran before in this lease
    sweep = work.parent / "sweep" / "lr_sweep_gpu.json"
    rates = ["--lr-from", sweep] if sweep.is_file() else []
    return [*_install_peers(),
            _py("bench/train_lm.py", "--preset", "gpu", "--device", "cuda", "--seeds", "0,1",
                "--optimizers", GPU_JOB_OPTIMIZERS, *rates, "--no-progress", "--out", work / "train_lm")]


PARTS = [
    Part("check", 25, 120, "python -m klkern.check: every path against klkern.reference", _cmd_check),
    Part("step", 60, 240, "whole-step benchmark, torch vs Triton path at each precision", _cmd_step),
    Part("qr", 30, 120, "the batched-QR methods, on refresh-like factors and on random matrices", _cmd_qr),
    Part("kernels", 30, 120, "fused operations vs eager torch", _cmd_kernels,
         env={"KLKERN_KERNEL_SHAPES": SUITE_KERNEL_SHAPES}),
    Part("tests", 40, 180, "the tests that exercise kernels, QR and CUDA paths", _cmd_tests),
    Part("compile", 30, 90, "compile check with this machine's triton", _cmd_compile,
         env={"TRITON_DEFAULT_FP_FUSION": "1"}),
    Part("profile", 20, 60, "torch.profiler of Triton and torch steps", _cmd_profile),
    Part("sweep", 60, 240, "the GPU main job's learning rates: a short sweep of the same grid", _cmd_sweep),
    Part("train", 60, 400, "the GPU main job: fused AdamW, klkern's four, HeavyBall's SOAP; 2 seeds",
         _cmd_train),
    Part("refresh", 40, 180, "the step with the refreshes' QR by shifted CholeskyQR3", _cmd_refresh),
    Part("peers", 60, 300, "the public implementations on the same step (needs peers/: bench/fetch_peers.py)",
         _cmd_peers),
]
PART_NAMES = [p.name for p in PARTS]


# ------------------------------------------------------------------ budget


def allotment(part: Part, remaining: float) -> float | None:
    """Seconds a part gets with ``remaining`` seconds of budget left, or None when it should not
    start (less than its least useful time, after the packing reserve)."""
    usable = remaining - RESERVE_S
    if usable < part.least:
        return None
    return min(part.limit, usable)


def run_command(command: list, seconds: float, log, env: dict, cwd: Path = ROOT) -> tuple[str, int | None]:
    """Run ``command`` in its own process group for at most ``seconds``; its output to ``log``.
    Returns (status, exit code): "ok", "failed" or "timeout" (the whole group killed)."""
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        rc = proc.wait(timeout=max(seconds, 0.1))
    except subprocess.TimeoutExpired:
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        return "timeout", None
    return ("ok" if rc == 0 else "failed"), rc


def run_parts(parts: list, budget: float, work: Path, out: Path, env: dict, started: float,
              echo=print, header: str = "") -> list:
    """Run ``parts`` in order within ``budget`` seconds counted from ``started`` (a
    time.monotonic() value); pack ``out`` after each part. Returns one row per part."""
    rows = []
    for part in parts:
        remaining = budget - (time.monotonic() - started)
        seconds = allotment(part, remaining)
        if seconds is None:
            rows.append(dict(part=part.name, status="skipped (budget)", seconds=0.0,
                             note=f"{max(remaining, 0):.0f} s left, needs {part.least} s + {RESERVE_S} s reserve"))
            echo(f"=== {part.name}: not started ({rows[-1]['note']})")
            pack(out, work, rows, header)
            continue
        folder = work / part.name
        folder.mkdir(parents=True, exist_ok=True)
        echo(f"=== {part.name} ({part.about}); up to {seconds:.0f} s")
        t0 = time.monotonic()
        status, codes = "ok", []
        with open(folder / "output.txt", "ab") as log:
            for command in part.command(folder, seconds):
                extra = {}
                if isinstance(command, tuple):  # (command, environment of this command only)
                    command, extra = command
                left = seconds - (time.monotonic() - t0)
                log.write(("$ " + " ".join(map(str, command)) + "\n").encode())
                log.flush()
                result, rc = run_command(command, left, log, _merged(env, part.env, extra))
                codes.append(rc)
                if result != "ok":
                    status = result
                if result == "timeout":
                    break
        took = time.monotonic() - t0
        tail = _tail(folder / "output.txt", 15)
        echo(tail)
        rows.append(dict(part=part.name, status=status, seconds=round(took, 1),
                         note="exit codes " + ",".join("-" if c is None else str(c) for c in codes)))
        echo(f"--- {part.name}: {status} in {took:.0f} s")
        pack(out, work, rows, header)
    return rows


def _merged(*envs: dict) -> dict:
    """Environments merged left to right; a value None removes the variable."""
    out: dict = {}
    for env in envs:
        out.update(env)
    return {k: v for k, v in out.items() if v is not None}


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


# ------------------------------------------------------------------ packing


# What the summary quotes from each part's files, in this order.
SUMMARY_FILES = ["check/check.txt", "step/step_*.md", "qr/qr_*.md", "kernels/kernels.md", "tests/summary.txt",
                 "compile/compile_summary.txt", "profile/profile_*.md", "train/train_lm/summary.md"]


def parts_table(rows: list) -> str:
    """The parts' status as a Markdown table."""
    return "\n".join(["| part | status | seconds | note |", "|---|---|---|---|"]
                     + [f"| {r['part']} | {r['status']} | {r['seconds']} | {r['note']} |" for r in rows])


def _summary_md(work: Path, rows: list, header: str) -> str:
    lines = ["# GPU suite", "", header, "", parts_table(rows)]
    _derive(work)
    for pattern in SUMMARY_FILES:
        for path in sorted(work.glob(pattern)):
            text = path.read_text(errors="replace")
            lines += ["", f"## {path.relative_to(work)}", ""]
            lines += (["```"] + text.rstrip().splitlines() + ["```"]) if path.suffix == ".txt" else \
                text.rstrip().splitlines()
    return "\n".join(lines) + "\n"


def _derive(work: Path) -> None:
    """Short text files the summary quotes, made from the parts' outputs."""
    check = work / "check" / "output.txt"
    if check.is_file():
        text = check.read_text(errors="replace")
        start = text.find("klkern ")
        (work / "check" / "check.txt").write_text(text[start:] if start >= 0 else text[-4000:])
    tests = work / "tests" / "output.txt"
    if tests.is_file():
        text = tests.read_text(errors="replace").rstrip().splitlines()
        keep = [ln for ln in text if re.match(r"(FAILED|ERROR|SKIPPED)\b", ln)][:60] + text[-3:]
        (work / "tests" / "summary.txt").write_text("\n".join(keep) + "\n")
    comp = work / "compile" / "output.txt"
    if comp.is_file():
        text = comp.read_text(errors="replace").rstrip().splitlines()
        (work / "compile" / "compile_summary.txt").write_text("\n".join(
            ln for ln in text if ln.startswith(("recorded", "compiled", "  "))) + "\n")


def pack(out: Path, work: Path, rows: list, header: str) -> None:
    """Rewrite ``out``: summary.md, results.tar.gz (all of ``work``); suite.log and
    environment.json are written by the caller. Never more than MAX_FILES files."""
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(_summary_md(work, rows, header))
    tmp = out / "results.tar.gz.part"
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(work, arcname="results")
    tmp.replace(out / "results.tar.gz")
    files = [p for p in out.iterdir()]
    if len(files) > MAX_FILES:
        raise RuntimeError(f"gpu_suite: {out} holds {len(files)} entries (> {MAX_FILES}); a lease returns "
                           f"at most {MAX_FILES}")


def unpack(src: Path, dest: Path | None) -> Path:
    """Extract a suite's output folder into ``dest`` (default bench/results/gpu_<device>)."""
    env = json.loads((src / "environment.json").read_text())
    if dest is None:
        dest = ROOT / "bench" / "results" / f"gpu_{slug(env['device'])}"
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(src / "results.tar.gz") as tar:
        for member in tar.getmembers():
            name = Path(member.name)
            if name.is_absolute() or ".." in name.parts or not (member.isfile() or member.isdir()):
                raise ValueError(f"gpu_suite unpack: refusing archive member {member.name!r}")
        with tempfile.TemporaryDirectory() as tmp:
            tar.extractall(tmp)
            for path in Path(tmp, "results").rglob("*"):
                if path.is_file():
                    target = dest / path.relative_to(Path(tmp, "results"))
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, target)
    for name in ("summary.md", "suite.log", "environment.json"):
        if (src / name).is_file():
            shutil.copy2(src / name, dest / name)
    return dest


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# ------------------------------------------------------------------ preflight


_PROBE = r"""
import json, warnings
out = {}
try:
    import torch
    out.update(torch=torch.__version__, cuda=torch.version.cuda)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out["available"] = torch.cuda.is_available()
    out["warnings"] = [str(w.message).splitlines()[0] for w in caught]
    if out["available"]:
        out["device"] = torch.cuda.get_device_name()
        out["capability"] = list(torch.cuda.get_device_capability())
        out["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
except Exception as err:
    out["error"] = f"{type(err).__name__}: {err}"
print(json.dumps(out))
"""


def probe_cuda(env: dict) -> tuple[dict | None, str]:
    """(probe result, "") when a CUDA GPU is usable, else (result or None, the one-line reason)."""
    try:
        done = subprocess.run(_py("-c", _PROBE), cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return None, "the CUDA probe (python -c 'import torch; torch.cuda.is_available()') hung for 120 s"
    try:
        info = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        err = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"the CUDA probe failed (exit {done.returncode}): {err}"
    if "error" in info:
        return info, f"torch cannot be imported or queried: {info['error']}"
    if info.get("cuda") is None:
        return info, f"no CUDA GPU: torch {info['torch']} is a CPU build (torch.version.cuda is None)"
    if not info.get("available"):
        why = "; ".join(info.get("warnings") or []) or "no device visible"
        return info, f"no CUDA GPU: torch {info['torch']} (CUDA {info['cuda']}) sees none ({why})"
    return info, ""


_VERIFY = r"""
import json, os
out = {}
import klkern
out["klkern"] = os.path.dirname(klkern.__file__)
try:
    import klkern.triton_kernels as K
    out["triton_kernels"] = os.path.dirname(K.__file__)
except Exception as err:
    out["triton_kernels_error"] = f"{type(err).__name__}: {err}"
try:
    import triton
    out["triton"] = triton.__version__
except Exception as err:
    out["triton"] = f"not importable ({type(err).__name__}: {err})"
import numpy
out["numpy"] = numpy.__version__
from klkern.linalg import _ext
from klkern.runtime import _backend
cuda = __import__("torch").device("cuda")
try:
    out["kernels_on_cuda"] = _backend.resolve("triton", cuda)
except RuntimeError as err:
    out["kernels_on_cuda"] = f"unusable: {err}"
out["auto_on_cuda"] = {mode: _backend.resolve("auto", cuda, mode) for mode in ("highest", "high", "medium")}
try:
    import klkern._C
    out["extension"] = "prebuilt (klkern._C)"
except ImportError as err:
    out["extension"] = None
if out["extension"] is None:
    op = _ext.qr_extension()
    out["extension"] = "JIT-built" if op is not None else f"FAILED: {_ext.LAST_ERROR or 'disabled'}"
op = _ext.qr_extension()
if op is not None:  # one small call each of its two kernels (one panel; blocked), checked
    import torch
    try:
        errs = []
        for shape in ((2, 40, 33), (1, 300, 257)):
            A = torch.randn(*shape, device="cuda")
            Q = op(A)
            torch.cuda.synchronize()
            eye = torch.eye(shape[-1], device="cuda")
            errs.append(float((Q.mT @ Q - eye).abs().max()))
        out["extension_check"] = ("ok" if max(errs) < 1e-4 else "WRONG") + f" (max |Q^T Q - I| {max(errs):.1e})"
    except Exception as err:
        out["extension_check"] = f"FAILED: {type(err).__name__}: {err}"[:400]
print(json.dumps(out))
"""


def commit() -> str:
    if os.environ.get("KLKERN_COMMIT"):
        return os.environ["KLKERN_COMMIT"]
    sys.path.insert(0, str(ROOT))
    from bench._meta import git_commit

    return git_commit(full=False)


def preflight(info: dict, env: dict, work: Path, install: bool) -> dict:
    """Install this checkout (editable, no dependencies, the QR extension built for this GPU),
    then verify in a fresh process what the parts will import. Returns the environment record."""
    record = dict(device=info["device"], capability=".".join(map(str, info["capability"])),
                  memory_gib=info["memory_gib"], torch=info["torch"], cuda=info["cuda"],
                  python=sys.version.split()[0], interpreter=sys.executable, commit=commit(),
                  date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    log = work / "install.log"
    if install:
        t0 = time.monotonic()
        with open(log, "wb") as fh:
            status, rc = run_command(_py("-m", "pip", "install", "--no-deps", "--no-build-isolation",
                                         "--no-index", "-e", "."), 600, fh, env)
        record["install"] = f"pip install -e . ({status}, {time.monotonic() - t0:.0f} s)"
    else:
        record["install"] = "skipped (--no-install)"
    try:
        done = subprocess.run(_py("-c", _VERIFY), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        (work / "verify.log").write_text(done.stdout + done.stderr)
        record.update(json.loads(done.stdout.strip().splitlines()[-1]))
    except subprocess.TimeoutExpired:
        record["verify_error"] = "the import and QR-extension check hung for 300 s"
    except (IndexError, json.JSONDecodeError):
        record["verify_error"] = (done.stderr.strip().splitlines() or ["no output"])[-1]
    if not str(record.get("extension_check", "ok")).startswith("ok") or "verify_error" in record:
        env["KLKERN_NO_EXT"] = "1"  # the parts measure the other QR methods rather than hang or mislead
        record["extension"] = f"{record.get('extension')}; disabled for the parts (KLKERN_NO_EXT=1)"
    if "triton_kernels" not in record and (ROOT / "triton_kernels").is_dir() and install:
        # The package is importable only from the tree (the install failed): link the kernels
        # where the installed package would have them, on this machine only.
        link = ROOT / "klkern" / "triton_kernels"
        if not link.exists():
            link.symlink_to(Path("..") / "triton_kernels")
            record["install"] += "; kernels linked into klkern/ (install failed)"
            done = subprocess.run(_py("-c", _VERIFY), cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=900)
            with contextlib.suppress(IndexError, json.JSONDecodeError):
                record.update(json.loads(done.stdout.strip().splitlines()[-1]))
    return record


def header_lines(record: dict) -> str:
    kernels = (f"importable ({record['triton_kernels']})" if "triton_kernels" in record
               else f"NOT importable ({record.get('triton_kernels_error', record.get('verify_error', '?'))})")
    return "\n".join([
        f"- device: {record['device']} (sm_{record['capability'].replace('.', '')}, {record['memory_gib']} GiB)",
        f"- torch {record['torch']} (CUDA {record['cuda']}), triton {record.get('triton', '?')}, numpy "
        f"{record.get('numpy', '?')}, python {record['python']} ({record.get('interpreter', '?')})",
        f"- commit {record['commit']}, {record['date']}",
        f"- install: {record['install']}; klkern from {record.get('klkern', '?')}",
        f"- Triton kernels: {kernels}; backend='triton' on CUDA: {record.get('kernels_on_cuda', '?')}; "
        f"backend='auto' on CUDA per precision: {record.get('auto_on_cuda', '?')}",
        f"- QR extension: {record.get('extension', '?')}; check: {record.get('extension_check', '-')}",
    ])


# ------------------------------------------------------------------ main


def _select(names: list) -> list:
    unknown = [n for n in names if n not in PART_NAMES]
    if unknown:
        raise SystemExit(f"gpu_suite: unknown part(s) {unknown}; parts: {' '.join(PART_NAMES)}")
    return [p for p in PARTS if not names or p.name in names]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["unpack"]:
        ap = argparse.ArgumentParser(prog="gpu_suite.py unpack")
        ap.add_argument("src")
        ap.add_argument("--dest")
        args = ap.parse_args(argv[1:])
        dest = unpack(Path(args.src), Path(args.dest) if args.dest else None)
        print(f"gpu_suite: unpacked {args.src} into {dest}")
        return 0
    ap = argparse.ArgumentParser(prog="bash bench/gpu_suite.sh", description=__doc__.split("\n\n")[0])
    ap.add_argument("parts", nargs="*", help=f"parts to run, in priority order (default all: {' '.join(PART_NAMES)})")
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_suite_out",
                    help="folder for the packed results ($OUT when set)")
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for the whole suite")
    ap.add_argument("--no-install", action="store_true", help="test the klkern already installed")
    args = ap.parse_args(argv)
    parts = _select(args.parts)
    started = time.monotonic()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    info, why = probe_cuda(env)
    if why:
        print(f"gpu_suite: {why} (python: {sys.executable}): this suite is for a GPU machine; nothing run")
        return 2
    major, minor = info["capability"]
    env.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")  # this GPU's architecture, not a fixed one
    env.setdefault("KLKERN_SUITE_ARCH", f"{major}{minor}")
    if not env.get("CUDA_HOME") and Path("/usr/local/cuda").is_dir():
        env["CUDA_HOME"] = "/usr/local/cuda"
    env.setdefault("KLKERN_CACHE", str(Path(tempfile.gettempdir()) / "klkern_cache"))
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("summary.md", "suite.log", "environment.json", "results.tar.gz"):
        (out / stale).unlink(missing_ok=True)
    work = Path(tempfile.mkdtemp(prefix="klkern_suite_"))
    log = open(out / "suite.log", "a", buffering=1)

    def echo(text: str) -> None:
        print(text, flush=True)
        log.write(text + "\n")

    record = preflight(info, env, work, install=not args.no_install)
    record["budget_s"] = args.budget
    (out / "environment.json").write_text(json.dumps(record, indent=1) + "\n")
    header = header_lines(record)
    echo("gpu_suite\n" + header)
    echo(f"- budget {args.budget:.0f} s; preflight took {time.monotonic() - started:.0f} s; parts: "
         + " ".join(p.name for p in parts))
    rows = run_parts(parts, args.budget, work, out, env, started, echo, header)
    pack(out, work, rows, header)
    echo(parts_table(rows))
    bad = [r["part"] for r in rows if r["status"] not in ("ok",) and not r["status"].startswith("skipped")]
    echo(f"gpu_suite: {time.monotonic() - started:.0f} s; results packed in {out} "
         f"({len(list(out.iterdir()))} files); "
         + (f"FAILED: {' '.join(bad)}" if bad else "every part that ran passed"))
    log.close()
    return 1 if bad or "triton_kernels" not in record else 0


if __name__ == "__main__":
    sys.exit(main())
