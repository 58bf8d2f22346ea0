"""The GPU suite: one command per lease of a GPU machine, each lease continuing where the last stopped.

    bash bench/gpu_suite.sh --out DIR [--budget SECONDS] [--fresh] [PART ...]   # on the GPU machine
    python bench/gpu_suite.py unpack DIR          # back here: DIR -> bench/results/gpu_<device>/
    python bench/gpu_suite.py decide [--check]    # the defaults the results decide (bench/gpu_decide.py)
    python bench/gpu_suite.py plan [--device KEY] # what the next lease would run, and why

``run`` (what gpu_suite.sh does) installs this checkout (the QR extension built for the GPU at
hand) and the peers carried in ``peers/`` (``python bench/fetch_peers.py`` fetches them here),
checks in a fresh process that the kernels import and the extension answers a QR, and prints that
first (device, device kind, versions, commit). Then it runs, in priority order (``PARTS``), only
what the committed results of this device (``bench/results/gpu_<device>/<part>/part.json``) do
not already hold for the code at hand: a part is current where its record's digest equals the
digest of its inputs now (the source files whose change invalidates it, and the commands it
runs), and then only its pieces not yet done run (a failed piece is not re-run until its inputs
change, or the part is named). A part too long for one command is split into pieces that stand
alone (the steady step one precision at a time, the main job one optimizer and seed at a time);
its folder starts from the committed one, so the pieces done before are kept. Named parts run
alone, still resuming; ``--fresh`` ignores the records.

Time: the parts get ``--budget`` seconds (default ``DEFAULT_BUDGET_S``), counted from the end of
the preflight, and never run past the command's limit (``--limit``, the lease's
``timeout_s=590``) less the time a killed part takes to die and the final packing. A command is
started only while the time left holds its part's least useful time, and is killed with its
children at its allotment.

Output: after every command DIR is rewritten with at most ``MAX_FILES`` files: ``summary.md``
(environment, a table of parts, the output tail of every part that failed, the parts' own
tables), ``suite.log`` (everything printed), ``environment.json`` and ``results.tar.gz`` (each
part's folder: its files, its log ``output.txt`` and its record ``part.json``). A lease returns
only such a folder; a suite killed mid-part still leaves the parts before it packed.

Without a CUDA GPU ``run`` prints one line saying why and exits with 2. The suite and its parts
run with the interpreter that runs this file (gpu_suite.sh: ``$PYTHON``, else ``python3``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
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
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MAX_FILES = 8

# Time. The lease's command runs under run(timeout_s=590) (docs/gpu.md). What the suite spends
# outside the parts' budget, measured in the one recorded run (bench/results/gpu_nvidia-h200/
# suite.log, H200, commit 7fd8154): the preflight (install, import and extension check) took 40 s
# (35 s in the second run, run2_tests/suite.log); packing after each of the 8 parts took under 1 s
# in all (the parts' seconds and the preflight add up to the suite's 413 s). A part killed at its
# allotment takes up to KILL_GRACE_S more to die. tests/test_gpu_suite.py reads the recorded logs
# and checks PREFLIGHT_S and PACK_S against them.
COMMAND_LIMIT_S = 590
PREFLIGHT_S = 40
PACK_S = 1
KILL_GRACE_S = 10  # SIGTERM, 5 s, then SIGKILL, 5 s
SPARE_S = 19  # for what the recorded run did not have: the peers' install, a slower machine
DEFAULT_BUDGET_S = COMMAND_LIMIT_S - PREFLIGHT_S - PACK_S - KILL_GRACE_S - SPARE_S  # 520


# ------------------------------------------------------------------ parts


class Seconds:
    """In a command: the seconds the command is given, less ``margin`` (a script's own --budget,
    so that it stops starting work in time to write its files)."""

    def __init__(self, margin: int = 15):
        self.margin = margin

    def render(self, seconds: float) -> str:
        return str(max(int(seconds - self.margin), 10))


@dataclasses.dataclass
class Command:
    """One process: ``argv`` (Seconds placeholders filled in when it starts), the pieces it runs,
    extra environment (a value None removes the variable)."""
    argv: list
    pieces: tuple = ("",)
    env: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Ctx:
    work: Path  # the part's folder (packed)
    results: Path  # this device's committed results (bench/results/gpu_<device>)


@dataclasses.dataclass
class Part:
    """One part of the suite. ``commands(ctx, pieces)`` gives the processes that run ``pieces``;
    ``least``: the fewest seconds worth starting one of them with; ``limit``: the most one gets;
    ``inputs``: the files, and folders (a trailing '/': their source files), whose change makes its
    results stale; ``finished(work, piece)``: whether a piece's results are complete, read from
    its files (default: its command exited 0); ``needs``: parts whose results it reads, complete and
    current first; ``unavailable(piece)``: why a piece cannot run on this checkout, or None."""
    name: str
    about: str
    least: int
    limit: int
    inputs: tuple
    commands: Callable
    pieces: tuple = ("",)
    finished: Callable | None = None
    needs: tuple = ()
    unavailable: Callable | None = None
    env: dict = dataclasses.field(default_factory=dict)


def _py(*args) -> list:
    return [sys.executable, *args]


def script(path: str, *args) -> Callable:
    """The commands of a part that runs one script, ``python PATH ARGS --out <its folder>``."""
    return lambda ctx, pieces: [Command(_py(path, *args, "--out", ctx.work))]


LIBRARY = ("klkern/", "triton_kernels/", "csrc/", "setup.py")
KERNELS = ("triton_kernels/", "klkern/runtime/")
PRECISIONS = ("highest", "high", "medium")


def _cmd_check(ctx: Ctx, pieces):
    return [Command(_py("-m", "klkern.check", "--json", ctx.work / "check.json"))]


def _cmd_step(ctx: Ctx, pieces):
    # the steady step, one precision per piece (each its own file): every optimizer, torch and
    # Triton paths, uncaptured and captured, the GEMM floor, launches, peak memory
    return [Command(_py("bench/step_bench.py", "--precisions", p, "--freq1-optimizers", "", "--no-refresh",
                        "--out", ctx.work / p, "--budget", Seconds()), (p,)) for p in pieces]


def _step_finished(work: Path, piece: str) -> bool:
    files = list((work / piece).glob("step_*.json"))
    data = _read_json(files[0]) if files else None
    return bool(data and data.get("rows") and not data["meta"].get("not_run"))


REFRESH_PIECES = ("qr-factor", "qr-random", "freq1", "cholqr3")


def _cmd_refresh(ctx: Ctx, pieces):
    # every QR method on the refresh's own input (what decides method="auto"), then on random
    # matrices; the step with a refresh every step, the refresh against its product floor,
    # amortised at T = 10 and staggered; the same with every refresh by shifted CholeskyQR3
    step = ("bench/step_bench.py", "--precisions", "high", "--optimizers", "KLShampoo,KLSOAP",
            "--freq1-optimizers", "KLShampoo,KLSOAP", "--no-graph", "--budget", Seconds())
    table = {"qr-factor": _py("bench/qr_bench.py", "--input", "factor", "--out-dir", ctx.work / "qr",
                              "--budget", Seconds(10)),
             "qr-random": _py("bench/qr_bench.py", "--out-dir", ctx.work / "qr", "--budget", Seconds(10)),
             "freq1": _py(*step, "--out", ctx.work / "freq1"),
             "cholqr3": _py(*step, "--qr-method", "shifted_cholqr3", "--out", ctx.work / "cholqr3")}
    return [Command(table[p], (p,)) for p in pieces]


def _refresh_finished(work: Path, piece: str) -> bool:
    if piece.startswith("qr-"):
        name = "qr_*_factor.json" if piece == "qr-factor" else "qr_*.json"
        found = [d for p in (work / "qr").glob(name) if (d := _read_json(p)) and
                 d["meta"].get("input", "random") == piece[3:]]
        return bool(found and found[0]["rows"] and not found[0]["meta"].get("not_run"))
    return _step_finished(work, piece)


def _peers_unavailable(piece: str = "") -> str | None:
    if not (ROOT / "peers").is_dir():
        return "no peers/ folder: run `python bench/fetch_peers.py` on a machine with network, carry=['peers']"
    return None


def _peers_finished(work: Path, piece: str) -> bool:
    """At least one public implementation ran beside klkern (a lease whose install failed measures
    klkern alone: not a result for this part)."""
    data = _read_json(work / f"peer_step_cuda_{piece}.json")
    return bool(data) and any(impl != "klkern" for impl in data["meta"].get("versions", {}))


def _cmd_peers(ctx: Ctx, pieces):
    # the public implementations on the same step, at T = 1 and T = 10, at equal precision
    return [Command(_py("bench/peer_step.py", "--device", "cuda", "--matmul-precision", p, "--no-profile",
                        "--rounds", "2", "--out", ctx.work / f"peer_step_cuda_{p}.md"), (p,)) for p in pieces]


# The GPU main job: torch's fused AdamW, klkern's four (Shampoo with and without grafting, for the
# paper's ordering KL-Shampoo >= SOAP > Shampoo without grafting), and HeavyBall's SOAP where
# peers/ travelled with the lease (bench/fetch_peers.py).
GPU_JOB_OPTIMIZERS = ("adamw", "klshampoo", "klsoap", "soap", "shampoo", "shampoo-nograft", "heavyball-soap")
GPU_JOB_SEEDS = (0, 1)
SWEEP_GRID = "1e-3,3e-3,1e-2"  # extended twice along the ladder where the best is on an edge (nograft: 1e-4)
SWEEP_STEPS = 200
MAIN_JOB = LIBRARY + ("bench/train_lm.py", "bench/lr_sweep.py")
SWEEP_JSON = "lr_sweep_gpu.json"


def _job_unavailable(piece: str) -> str | None:
    """HeavyBall's SOAP needs the carried peers installed (the preflight installs them)."""
    if not piece.startswith("heavyball"):
        return None
    import importlib.util

    importlib.invalidate_caches()  # the preflight may have installed it into this interpreter's site-packages
    return _peers_unavailable() or (None if importlib.util.find_spec("heavyball") else
                                    "heavyball not importable here (the preflight's install failed: install.log)")


def _cmd_sweep(ctx: Ctx, pieces):
    # one short run per rate of the same grid for every optimizer; lr_sweep.py reuses the runs in
    # its JSON, writes it after each optimizer and starts no run past its budget
    return [Command(_py("bench/lr_sweep.py", "--preset", "gpu", "--device", "cuda", "--steps", str(SWEEP_STEPS),
                        "--grid", SWEEP_GRID, "--extend", "2", "--optimizers", ",".join(pieces), "--no-progress",
                        "--budget", Seconds(), "--out", ctx.work / Path(SWEEP_JSON).stem), tuple(pieces))]


def _sweep_finished(work: Path, piece: str) -> bool:
    data = _read_json(work / SWEEP_JSON)
    return bool(data and piece in data.get("complete", []))


def _train_piece(name: str, seed: int) -> str:
    return f"{name}-seed{seed}"


def _cmd_train(ctx: Ctx, pieces):
    # 2 seeds, seed-major, at the sweep's rates; train_lm.py --resume keeps the runs its folder
    # holds and starts no run past its budget
    sweep = next((p for p in (ctx.work.parent / "sweep" / SWEEP_JSON, ctx.results / "sweep" / SWEEP_JSON)
                  if p.is_file()), None)
    names = [n for n in GPU_JOB_OPTIMIZERS if any(p.startswith(f"{n}-seed") for p in pieces)]
    seeds = [s for s in GPU_JOB_SEEDS if any(p.endswith(f"-seed{s}") for p in pieces)]
    return [Command(_py("bench/train_lm.py", "--preset", "gpu", "--device", "cuda", "--seeds",
                        ",".join(map(str, seeds)), "--optimizers", ",".join(names),
                        *(["--lr-from", sweep] if sweep else []), "--resume", "--budget", Seconds(),
                        "--no-progress", "--out", ctx.work / "train_lm"), tuple(pieces))]


def _train_finished(work: Path, piece: str) -> bool:
    data = _read_json(work / "train_lm" / "summary.json")
    return bool(data) and any(_train_piece(r["optimizer"], r["seed"]) == piece for r in data.get("runs", []))


# Tests that exercise the kernels, the QR extension and the CUDA paths (fast ones first).
SUITE_TESTS = ["tests/test_qr.py::test_extension_on_gpu", "tests/test_qr.py::test_extension_nan_and_bad_input_on_gpu",
               "tests/test_qr.py::test_extension_bad_input_raises_a_catchable_error",
               "tests/test_qr.py::test_klshampoo_with_and_without_extension", "tests/test_check.py",
               "tests/test_graph.py", "tests/test_dispatch.py",
               "tests/test_triton.py", "tests/test_precision.py", "tests/test_guard.py"]


def _cmd_tests(ctx: Ctx, pieces):
    return [Command(_py("-m", "pytest", "-q", "-rfEs", "--durations=10", "-p", "no:cacheprovider",
                        f"--junitxml={ctx.work / 'tests.xml'}", *SUITE_TESTS))]


# Shapes of the kernel microbenchmarks inside the suite (GPT-2-small and a 1B-class block);
# bench/test_kernel_bench.py alone runs all of kernel_cases.SHAPES.
SUITE_KERNEL_SHAPES = "12x768x768,12x768x3072,12x2048x2048"


def _cmd_kernels(ctx: Ctx, pieces):
    return [Command(_py("-m", "pytest", "-q", "-p", "no:cacheprovider", "bench/test_kernel_bench.py",
                        f"--benchmark-json={ctx.work / 'kernels.json'}", "--benchmark-columns=median,min,max")),
            Command(_py("bench/summarize_kernel_bench.py", ctx.work / "kernels.json", "--out",
                        ctx.work / "kernels.md"))]


def _cmd_compile(ctx: Ctx, pieces):
    arch = os.environ.get("KLKERN_SUITE_ARCH", "90")
    # recorded under the interpreter (kernels not executed), compiled without it (compile_check's docstring)
    return [Command(_py("-m", "klkern.triton_kernels.compile_check", "record", ctx.work / "variants.json"),
                    env={"TRITON_INTERPRET": "1"}),
            Command(_py("-m", "klkern.triton_kernels.compile_check", "compile", ctx.work / "variants.json", "--arch",
                        arch, "--subset", "representative", "--out", ctx.work / "compile.json", "--md",
                        ctx.work / "compile.md"), env={"TRITON_INTERPRET": None})]


# In priority order: the decision first (correctness, the steady step, the refresh), then the peers
# and the main job, then what checks the machine (tests, kernels, compile, profile). A part that
# runs one script is one line (as "tune").
PARTS = [
    Part("check", "python -m klkern.check: every path against klkern.reference", 25, 150, LIBRARY, _cmd_check),
    Part("step", "the steady step (bench/step_bench.py), one precision per piece: torch and Triton paths, "
         "uncaptured and captured, GEMM floor, launches, peak memory", 60, 240, LIBRARY + ("bench/step_bench.py",),
         _cmd_step, pieces=PRECISIONS, finished=_step_finished),
    Part("tune", "every kernel's tile candidates timed, the fastest per size class (bench/tune_tiles.py)", 60, 300,
         KERNELS + ("bench/tune_tiles.py",), script("bench/tune_tiles.py", "--budget", Seconds())),
    Part("refresh", "the refresh: every QR method on refresh-like factors and random matrices; the refresh "
         "against its product floor, amortised and staggered; the same by shifted CholeskyQR3", 30, 200,
         LIBRARY + ("bench/step_bench.py", "bench/qr_bench.py"), _cmd_refresh, pieces=REFRESH_PIECES,
         finished=_refresh_finished),
    Part("peers", "the public implementations on the same step (bench/peer_step.py; needs peers/)", 60, 300,
         LIBRARY + ("bench/peer_step.py", "bench/fetch_peers.py"), _cmd_peers, pieces=("highest",),
         finished=_peers_finished, unavailable=_peers_unavailable),
    Part("sweep", "the GPU main job's learning rates, one optimizer per piece", 60, 500, MAIN_JOB, _cmd_sweep,
         pieces=GPU_JOB_OPTIMIZERS, finished=_sweep_finished, unavailable=_job_unavailable),
    Part("train", "the GPU main job, one optimizer and seed per piece", 60, 500, MAIN_JOB, _cmd_train,
         pieces=tuple(_train_piece(n, s) for s in GPU_JOB_SEEDS for n in GPU_JOB_OPTIMIZERS),
         finished=_train_finished, needs=("sweep",), unavailable=_job_unavailable),
    Part("tests", "the tests that exercise kernels, QR and CUDA paths", 40, 240, LIBRARY + ("tests/",), _cmd_tests),
    Part("kernels", "fused operations vs eager torch", 30, 120,
         KERNELS + ("bench/test_kernel_bench.py", "bench/kernel_cases.py", "bench/summarize_kernel_bench.py"),
         _cmd_kernels, env={"KLKERN_KERNEL_SHAPES": SUITE_KERNEL_SHAPES}),
    Part("compile", "compile check with this machine's triton", 30, 120, KERNELS, _cmd_compile,
         env={"TRITON_DEFAULT_FP_FUSION": "1"}),
    Part("profile", "torch.profiler of Triton and torch steps", 20, 90,
         LIBRARY + ("bench/step_profile.py", "bench/step_bench.py"), script("bench/step_profile.py")),
]
PART_NAMES = [p.name for p in PARTS]


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------ what is current


SOURCE_SUFFIXES = {".py", ".cu", ".cuh", ".cpp", ".h", ".sh", ".toml", ".cfg", ".txt", ".json"}
# written by `decide` from the results: not an input (else every decision would make every result
# stale); a part measured before a default changed is re-measured by naming it
GENERATED = {"klkern/runtime/_gpu_decisions.py"}


def input_files(inputs, root: Path = ROOT) -> list:
    """The files (relative, sorted) that ``inputs`` name under ``root``: a path ending in '/' is
    every source file below that folder (no links followed, no caches, not GENERATED)."""
    files = set()
    for item in inputs:
        path = root / item
        if not item.endswith("/"):
            if path.is_file():
                files.add(item)
            continue
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = [d for d in dirnames if d != "__pycache__" and not d.endswith(".egg-info")]
            for name in filenames:
                full = Path(dirpath) / name
                rel = full.relative_to(root).as_posix()
                if full.suffix in SOURCE_SUFFIXES and rel not in GENERATED and not full.is_symlink():
                    files.add(rel)
    return sorted(files)


def template(part: Part) -> list:
    """The part's commands for all its pieces, with placeholders for folders, seconds and the
    interpreter: what a change of its invocation changes."""
    ctx = Ctx(Path("<work>"), Path("<results>"))

    def show(arg) -> str:
        return "<seconds>" if isinstance(arg, Seconds) else "python" if arg == sys.executable else str(arg)
    return [[[show(a) for a in c.argv], sorted(c.env.items(), key=str)] for c in part.commands(ctx, list(part.pieces))]


def digest(part: Part, root: Path = ROOT) -> str:
    """What a part's results depend on, hashed: its inputs' contents and its commands."""
    h = hashlib.sha256(json.dumps([template(part), sorted(part.env.items(), key=str)], default=str).encode())
    for rel in input_files(part.inputs, root):
        h.update(rel.encode() + b"\0" + hashlib.sha256((root / rel).read_bytes()).digest())
    return h.hexdigest()[:16]


def record_of(folder: Path) -> dict | None:
    record = _read_json(folder / "part.json")
    return record if record and "pieces" in record else None


@dataclasses.dataclass
class Todo:
    part: Part
    pieces: list  # to run
    why: str
    resume: bool  # its folder starts from the committed one (same inputs)
    held: list = dataclasses.field(default_factory=list)  # (piece, reason) not available here


def state(part: Part, results: Path, current: str, named: bool = False, fresh: bool = False) -> Todo:
    """What of ``part`` runs, given the device's committed ``results`` and the digest of the part's
    inputs now: every available piece without results for these inputs (failed ones only when the
    part is ``named``)."""
    held = [(p, why) for p in part.pieces if part.unavailable and (why := part.unavailable(p))]
    available = [p for p in part.pieces if p not in dict(held)]
    record = None if fresh else record_of(results / part.name)
    if record is None:
        return Todo(part, available, "no results" if not fresh else "--fresh", False, held)
    if record.get("digest") != current:
        return Todo(part, available, f"inputs changed since {record.get('commit', '?')}", False, held)
    done = record["pieces"]
    skip = ("ok",) if named else ("ok", "failed")
    todo = [p for p in available if done.get(p, {}).get("status") not in skip]
    failed = [p for p in available if done.get(p, {}).get("status") == "failed" and p not in todo]
    why = (f"{len(todo)} of {len(part.pieces)} pieces left" if todo else "current") + \
        (f" (failed at {record.get('commit', '?')}, not re-run until its inputs change: {', '.join(failed)})"
         if failed else "")
    return Todo(part, todo, why, True, held)


def plan(parts: list, results: Path, root: Path = ROOT, named=(), fresh: bool = False) -> list:
    """[Todo] for every part, in priority order (those with nothing to run included, pieces [])."""
    return [state(p, results, digest(p, root), p.name in named, fresh) for p in parts
            if not named or p.name in named]


def complete(part: Part, folder: Path, current: str) -> bool:
    """Whether ``folder`` holds results of ``part`` for its inputs now, every available piece ok."""
    record = record_of(folder)
    if record is None or record.get("digest") != current:
        return False
    return all(record["pieces"].get(p, {}).get("status") == "ok" for p in part.pieces
               if not (part.unavailable and part.unavailable(p)))


# ------------------------------------------------------------------ running


class Clock:
    """The time left: the parts' budget from their start, and the command's limit from the suite's."""

    def __init__(self, budget: float, limit: float, suite_start: float, parts_start: float | None = None):
        self.budget, self.limit = budget, limit
        self.suite_start = suite_start
        self.parts_start = suite_start if parts_start is None else parts_start

    def left(self) -> float:
        now = time.monotonic()
        return min(self.budget - (now - self.parts_start),
                   self.limit - PACK_S - KILL_GRACE_S - (now - self.suite_start))


def allotment(part: Part, left: float) -> float | None:
    """Seconds one command of ``part`` gets with ``left`` seconds left, or None: not worth starting."""
    return None if left < part.least else min(part.limit, left)


def run_command(command: list, seconds: float, log, env: dict, cwd: Path = ROOT) -> tuple[str, int | None]:
    """Run ``command`` in its own process group for at most ``seconds``; its output to ``log``.
    Returns (status, exit code): "ok", "failed" or "timeout" (the whole group killed)."""
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        rc = proc.wait(timeout=max(seconds, 0.1))
    except subprocess.TimeoutExpired:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=KILL_GRACE_S / 2)
                break
            except subprocess.TimeoutExpired:
                continue
        return "timeout", None
    return ("ok" if rc == 0 else "failed"), rc


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


TAIL_LINES = 40


def run_part(todo: Todo, clock: Clock, work: Path, results: Path, env: dict, meta: dict, current: str,
             echo=print, after_command=lambda: None) -> dict:
    """Run the pieces of one part; write its record; return its row for the summary."""
    part = todo.part
    folder = work / part.name
    if todo.resume and (results / part.name).is_dir() and not folder.exists():
        shutil.copytree(results / part.name, folder)  # the pieces done before travel on
    folder.mkdir(parents=True, exist_ok=True)
    record = record_of(folder) if todo.resume else None
    record = record or {"pieces": {}}
    started, statuses, notes = time.monotonic(), {}, []
    log_path = folder / "output.txt"
    ran = False
    for command in part.commands(Ctx(folder, results), todo.pieces):
        seconds = allotment(part, clock.left())
        if seconds is None:
            notes.append(f"not started (budget): {' '.join(p or part.name for p in command.pieces)}")
            continue
        ran = True
        argv = [a.render(seconds) if isinstance(a, Seconds) else str(a) for a in command.argv]
        echo(f"=== {part.name}{' ' + ' '.join(command.pieces) if command.pieces != ('',) else ''}: "
             f"up to {seconds:.0f} s")
        t0 = time.monotonic()
        with open(log_path, "ab") as log:
            log.write((f"=== {meta.get('date', '')} commit {meta.get('commit', '?')}\n$ " + " ".join(argv)
                       + "\n").encode())
            log.flush()
            result, rc = run_command(argv, seconds, log, _merged(env, part.env, command.env))
        took = time.monotonic() - t0
        for piece in command.pieces:
            finished = part.finished(folder, piece) if part.finished else result == "ok"
            status = "ok" if finished else "failed" if result == "failed" else "partial"
            statuses[piece] = status
            record["pieces"][piece] = {"status": status, "seconds": round(took, 1), "exit": rc,
                                       "commit": meta.get("commit"), "date": meta.get("date")}
        echo(f"--- {part.name}: {result} in {took:.0f} s (exit {rc})")
        _write_record(folder, record, part, meta, current, log_path)
        after_command()
    if ran:
        _write_record(folder, record, part, meta, current, log_path)
    else:  # nothing ran: nothing to pack (a copy of the committed folder would come back unchanged)
        shutil.rmtree(folder)
    values = set(statuses.values())
    status = ("not started (budget)" if not statuses else "failed" if "failed" in values else
              "partial" if "partial" in values or notes else "ok")
    if status in ("failed", "partial") and statuses:
        echo(_tail(log_path, 15))
    note = ", ".join(f"{p}: {s}" for p, s in statuses.items() if p) if statuses else ""
    return dict(part=part.name, status=status, seconds=round(time.monotonic() - started, 1),
                note="; ".join(filter(None, [note, *notes])) or todo.why)


def _write_record(folder: Path, record: dict, part: Part, meta: dict, current: str, log_path: Path) -> None:
    pieces = record["pieces"]
    available = [p for p in part.pieces if not (part.unavailable and part.unavailable(p))]
    statuses = [pieces.get(p, {}).get("status") for p in available]
    record.update({k: meta.get(k) for k in ("device", "kind", "capability", "versions", "commit", "date")})
    record.update(part=part.name, digest=current, inputs=list(part.inputs),
                  status="ok" if all(s == "ok" for s in statuses) else "failed" if "failed" in statuses
                  else "partial")
    if record["status"] != "ok":
        record["tail"] = _tail(log_path, TAIL_LINES)
    else:
        record.pop("tail", None)
    (folder / "part.json").write_text(json.dumps(record, indent=1, default=str) + "\n")


def run_parts(todos: list, clock: Clock, work: Path, out: Path, env: dict, meta: dict, results: Path,
              digests: dict, echo=print, header: str = "") -> list:
    """Run ``todos`` in order while the clock allows; pack ``out`` after every command. Returns one
    row per part for the summary (current parts and parts not run included)."""
    rows: list = []

    def packed() -> None:
        pack(out, work, rows, header)

    by_name = {**{p.name: p for p in PARTS}, **{t.part.name: t.part for t in todos}}
    for todo in todos:
        part = todo.part
        if not todo.pieces:
            status = ("failed, kept" if "failed at" in todo.why else "current" if todo.why.startswith("current")
                      else "held")
            held = [f"{p or part.name}: {w}" for p, w in todo.held]
            rows.append(dict(part=part.name, status=status, seconds=0.0, note="; ".join([todo.why, *held])))
            continue
        waiting = [n for n in part.needs if not (complete(by_name[n], work / n, digests[n])
                                                 or complete(by_name[n], results / n, digests[n]))]
        if waiting:
            rows.append(dict(part=part.name, status="waiting", seconds=0.0,
                             note=f"needs complete results of {', '.join(waiting)} first"))
            echo(f"=== {part.name}: not started (needs {', '.join(waiting)} first)")
            continue
        rows.append(dict(part=part.name, status="running", seconds=0.0, note=todo.why))
        rows[-1] = run_part(todo, clock, work, results, env, meta, digests[part.name], echo, packed)
        if todo.held:
            rows[-1]["note"] += "; " + "; ".join(f"{p}: {w}" for p, w in todo.held)
        packed()
    packed()
    return rows


# ------------------------------------------------------------------ packing


# What the summary quotes from each part's files, in this order.
SUMMARY_FILES = ["check/check.txt", "step/*/step_*.md", "refresh/qr/qr_*.md", "refresh/*/step_*.md",
                 "peers/peer_step_cuda_*.md", "sweep/lr_sweep_gpu.md", "train/train_lm/summary.md",
                 "tests/summary.txt", "kernels/kernels.md", "compile/compile_summary.txt", "profile/profile_*.md"]


def parts_table(rows: list) -> str:
    """The parts' status as a Markdown table."""
    return "\n".join(["| part | status | seconds | note |", "|---|---|---|---|"]
                     + [f"| {r['part']} | {r['status']} | {r['seconds']} | {r['note']} |" for r in rows])


def _summary_md(work: Path, rows: list, header: str) -> str:
    lines = ["# GPU suite", "", header, "", parts_table(rows)]
    _derive(work)
    for row in rows:  # what a failed part printed last: the first thing to read
        record = record_of(work / row["part"])
        if record and record.get("tail") and row["status"] in ("failed", "partial"):
            lines += ["", f"## {row['part']}: {row['status']}, the end of its output "
                      f"({row['part']}/output.txt has all of it)", "", "```", *record["tail"].splitlines(), "```"]
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
        text = text[max(text.rfind("\n=== "), 0):]  # the last lease's run
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
    """Rewrite ``out``: summary.md and results.tar.gz (all of ``work``); suite.log and
    environment.json are the caller's. Never more than MAX_FILES files."""
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(_summary_md(work, rows, header))
    tmp = out / "results.tar.gz.part"
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(work, arcname="results")
    tmp.replace(out / "results.tar.gz")
    files = list(out.iterdir())
    if len(files) > MAX_FILES:
        raise RuntimeError(f"gpu_suite: {out} holds {len(files)} entries (> {MAX_FILES}); a lease returns "
                           f"at most {MAX_FILES}")


def unpack(src: Path, dest: Path | None = None, root: Path = ROOT) -> Path:
    """Place a lease's output folder under ``dest`` (default bench/results/gpu_<device>): each part
    folder that holds a record replaces the committed one (it started from it); other files are
    copied over. A record whose commit is unknown (a copy of the tree without .git) gets this
    checkout's commit where the part's inputs here hash to the digest that ran."""
    env = json.loads((src / "environment.json").read_text())
    if dest is None:
        dest = root / "bench" / "results" / f"gpu_{slug(env['device'])}"
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(src / "results.tar.gz") as tar:
        for member in tar.getmembers():
            name = Path(member.name)
            if name.is_absolute() or ".." in name.parts or not (member.isfile() or member.isdir()):
                raise ValueError(f"gpu_suite unpack: refusing archive member {member.name!r}")
        with tempfile.TemporaryDirectory() as tmp:
            tar.extractall(tmp)
            top = Path(tmp, "results")
            for path in sorted(top.iterdir()) if top.is_dir() else []:
                target = dest / path.name
                if path.is_dir() and record_of(path) is not None:
                    _fill_commit(path, root)
                    if target.exists():
                        shutil.rmtree(target)
                    shutil.copytree(path, target)
                elif path.is_dir():
                    shutil.copytree(path, target, dirs_exist_ok=True)
                else:
                    shutil.copy2(path, target)
    for name in ("summary.md", "suite.log", "environment.json"):
        if (src / name).is_file():
            shutil.copy2(src / name, dest / name)
    return dest


def _fill_commit(folder: Path, root: Path) -> None:
    record = record_of(folder)
    if record is None or record.get("commit") not in (None, "", "unknown"):
        return
    part = next((p for p in PARTS if p.name == record.get("part")), None)
    if part is not None and digest(part, root) == record.get("digest"):
        sys.path.insert(0, str(root))
        from bench._meta import git_commit

        record["commit"] = git_commit()
        record["commit_note"] = "filled in by unpack: this checkout's inputs of the part hash to the digest that ran"
        (folder / "part.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    else:
        print(f"gpu_suite unpack: {folder.name}: commit unknown and this checkout's inputs differ from those "
              "that ran; the record keeps 'unknown'", file=sys.stderr)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


KINDS = {"h200": "nvidia-h200", "h100": "nvidia-h100-x1"}  # the device tool's kinds, by device name


def kind_of(name: str) -> str:
    return next((kind for part, kind in KINDS.items() if part in name.lower()), "unknown")


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
    sys.path.insert(0, str(ROOT))
    from bench._meta import git_commit

    return git_commit(full=False)


def preflight(info: dict, env: dict, work: Path, install: bool) -> dict:
    """Install this checkout (editable, no dependencies, the QR extension built for this GPU) and
    the carried peers, then verify in a fresh process what the parts will import. Returns the
    environment record."""
    record = dict(device=info["device"], kind=kind_of(info["device"]), key=slug(info["device"]),
                  capability=".".join(map(str, info["capability"])),
                  memory_gib=info["memory_gib"], torch=info["torch"], cuda=info["cuda"],
                  python=sys.version.split()[0], interpreter=sys.executable, commit=commit(),
                  date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    if install:
        t0 = time.monotonic()
        with open(work / "install.log", "wb") as fh:
            status, rc = run_command(_py("-m", "pip", "install", "--no-deps", "--no-build-isolation",
                                         "--no-index", "-e", "."), 600, fh, env)
            record["install"] = f"pip install -e . ({status}, {time.monotonic() - t0:.0f} s)"
            if (ROOT / "peers").is_dir():
                t0 = time.monotonic()
                status, rc = run_command(_py("bench/fetch_peers.py", "--install", "--dir", ROOT / "peers"), 300,
                                         fh, env)
                record["peers"] = f"fetch_peers.py --install ({status}, {time.monotonic() - t0:.0f} s)"
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
    record["versions"] = {k: record.get(k) for k in ("torch", "cuda", "triton", "numpy", "python")}
    return record


def header_lines(record: dict) -> str:
    kernels = (f"importable ({record['triton_kernels']})" if "triton_kernels" in record
               else f"NOT importable ({record.get('triton_kernels_error', record.get('verify_error', '?'))})")
    return "\n".join([
        f"- device: {record['device']} (device kind {record.get('kind', '?')}, sm_"
        f"{record['capability'].replace('.', '')}, {record['memory_gib']} GiB)",
        f"- torch {record['torch']} (CUDA {record['cuda']}), triton {record.get('triton', '?')}, numpy "
        f"{record.get('numpy', '?')}, python {record['python']} ({record.get('interpreter', '?')})",
        f"- commit {record['commit']}, {record['date']}",
        f"- install: {record['install']}; klkern from {record.get('klkern', '?')}; peers: "
        f"{record.get('peers', 'none carried')}",
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


def show_plan(results: Path, named=(), fresh: bool = False) -> str:
    lines = [f"{results.relative_to(ROOT) if results.is_relative_to(ROOT) else results}:"]
    for todo in plan(_select(list(named)), results, ROOT, named, fresh):
        pieces = " ".join(p or "(whole)" for p in todo.pieces)
        held: dict = {}
        for piece, why in todo.held:
            held.setdefault(why, []).append(piece or todo.part.name)
        lines.append(f"  {todo.part.name:8s} {'runs ' + pieces if todo.pieces else 'nothing to run'}: {todo.why}"
                     + "".join(f"; held ({why}): {' '.join(names)}" for why, names in held.items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["unpack"]:
        ap = argparse.ArgumentParser(prog="gpu_suite.py unpack")
        ap.add_argument("src")
        ap.add_argument("--dest")
        args = ap.parse_args(argv[1:])
        dest = unpack(Path(args.src), Path(args.dest) if args.dest else None)
        print(f"gpu_suite: unpacked {args.src} into {dest}; next: python bench/gpu_suite.py decide")
        return 0
    if argv[:1] == ["decide"]:
        import gpu_decide

        return gpu_decide.main(argv[1:])
    if argv[:1] == ["plan"]:
        ap = argparse.ArgumentParser(prog="gpu_suite.py plan")
        ap.add_argument("parts", nargs="*")
        ap.add_argument("--device", help="device key, e.g. nvidia-h200 (default: every folder bench/results/gpu_*)")
        ap.add_argument("--fresh", action="store_true")
        args = ap.parse_args(argv[1:])
        folders = [RESULTS / f"gpu_{args.device}"] if args.device else sorted(RESULTS.glob("gpu_*"))
        print("\n".join(show_plan(f, args.parts, args.fresh) for f in folders))
        return 0
    ap = argparse.ArgumentParser(prog="bash bench/gpu_suite.sh", description=__doc__.split("\n\n")[0])
    ap.add_argument("parts", nargs="*", help=f"run only these (default: what is missing of {' '.join(PART_NAMES)})")
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_suite_out",
                    help="folder for the packed results ($OUT when set)")
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                    help=f"seconds for the parts after the preflight (default {DEFAULT_BUDGET_S})")
    ap.add_argument("--limit", type=float, default=COMMAND_LIMIT_S,
                    help=f"the command's time limit, the lease's timeout_s (default {COMMAND_LIMIT_S})")
    ap.add_argument("--fresh", action="store_true", help="ignore the committed results: run every piece")
    ap.add_argument("--results", help="the committed results to continue (default bench/results/gpu_<device>)")
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
    results = Path(args.results) if args.results else RESULTS / f"gpu_{record['key']}"
    todos = plan(parts, results, ROOT, args.parts, args.fresh)
    digests = {p.name: digest(p, ROOT) for p in PARTS}
    preflight_s = time.monotonic() - started  # everything before the parts: install, checks, the plan
    record.update(budget_s=args.budget, limit_s=args.limit, preflight_s=round(preflight_s, 1),
                  results=str(results))
    (out / "environment.json").write_text(json.dumps(record, indent=1) + "\n")
    header = header_lines(record)
    echo("gpu_suite\n" + header)
    echo(f"- budget {args.budget:.0f} s for the parts, limit {args.limit:.0f} s; preflight took {preflight_s:.0f} s; "
         f"results continued: {results}")
    for todo in todos:
        echo(f"  {todo.part.name}: " + (f"runs {' '.join(p or '(whole)' for p in todo.pieces)} ({todo.why})"
                                        if todo.pieces else todo.why))
    clock = Clock(args.budget, args.limit, started, time.monotonic())
    meta = {k: record.get(k) for k in ("device", "kind", "capability", "versions", "commit", "date")}
    rows = run_parts(todos, clock, work, out, env, meta, results, digests, echo, header)
    echo(parts_table(rows))
    bad = [r["part"] for r in rows if r["status"] == "failed"]
    echo(f"gpu_suite: {time.monotonic() - started:.0f} s; results packed in {out} "
         f"({len(list(out.iterdir()))} files); "
         + (f"FAILED: {' '.join(bad)}" if bad else "every part that ran passed"))
    log.close()
    return 1 if bad or "triton_kernels" not in record else 0


if __name__ == "__main__":
    sys.exit(main())
