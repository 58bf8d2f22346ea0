"""bench/gpu_suite.py, the one command a GPU lease runs, and bench/gpu_decide.py, what its results decide.

A lease gives one command a few minutes and returns only what lies in one folder, at most 8
files there; leases come rarely, and each must add to the results, not repeat them. These tests
run the suite's machinery on the CPU with stand-in parts (short Python commands) and check: which
parts and pieces run given a results folder and the code at hand (resume), the time each gets,
that a part over its time dies with its children, that the folder is packed after every command
and a crashed part leaves its log and the end of its output there, that ``unpack`` puts a lease's
parts where the next lease continues them, and that ``decide`` turns recorded result files into
the defaults klkern reads, and that the committed defaults are exactly what it writes from the
committed results. Without a GPU the suite exits at once.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench"), str(ROOT)]
import gpu_decide  # noqa: E402
import gpu_suite  # noqa: E402
from gpu_suite import Clock, Command, Ctx, Part  # noqa: E402

from klkern import linalg  # noqa: E402
from klkern.runtime import _backend, _decisions  # noqa: E402

META = {"device": "NVIDIA Test GPU", "kind": "unknown", "capability": "9.0", "versions": {"torch": "x"},
        "commit": "abc1234", "date": "2026-12-07 00:00 UTC"}


def _code_part(name, code_by_piece, pieces=("",), least=1, limit=30, inputs=(), **kw):
    """A stand-in part: each piece runs its own Python snippet (WORK is the part's folder, PIECE
    the piece)."""
    def commands(ctx, todo):
        return [Command([sys.executable, "-c", f"WORK = {str(ctx.work)!r}\nPIECE = {p!r}\n" + code_by_piece(p)], (p,))
                for p in todo]
    return Part(name, f"stand-in {name}", least, limit, tuple(inputs), commands, pieces=tuple(pieces), **kw)


def _part(name, code, **kw):
    return _code_part(name, lambda piece: code, **kw)


def _run(parts, tmp_path, results=None, budget=60.0, limit=1000.0, started=None, named=(), root=None):
    """Plan ``parts`` against ``results`` and run them like the suite does; (rows, out, work)."""
    root = root or tmp_path / "root"
    root.mkdir(exist_ok=True)
    results = results or tmp_path / "results"
    work, out = tmp_path / "work", tmp_path / "out"
    digests = {p.name: gpu_suite.digest(p, root) for p in parts}
    todos = gpu_suite.plan(parts, results, root, named)
    now = time.monotonic()
    clock = Clock(budget, limit, started if started is not None else now, now)
    rows = gpu_suite.run_parts(todos, clock, work, out, {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, META,
                               results, digests, echo=lambda s: None, header="- device: stand-in")
    return rows, out, work


def _members(out):
    with tarfile.open(out / "results.tar.gz") as tar:
        return {m.name: (tar.extractfile(m).read().decode() if m.isfile() else None) for m in tar.getmembers()}


# ------------------------------------------------------------------ time


def test_the_default_budget_is_the_command_limit_less_what_was_measured_outside_the_parts():
    s = gpu_suite
    assert s.DEFAULT_BUDGET_S == 520
    assert s.DEFAULT_BUDGET_S + s.PREFLIGHT_S + s.PACK_S + s.KILL_GRACE_S + s.SPARE_S == s.COMMAND_LIMIT_S == 590


def test_the_margins_hold_for_every_recorded_run():
    """PREFLIGHT_S and PACK_S are measured: every recorded suite.log's preflight fits PREFLIGHT_S,
    and its total less the preflight and the parts' seconds (the packing) fits PACK_S (each
    figure rounded to 1 s in the log, hence the 1 s slack)."""
    logs = sorted((ROOT / "bench" / "results").glob("gpu_*/**/suite.log"))
    assert logs, "no recorded GPU run"
    for log in logs:
        text = log.read_text()
        preflight = int(re.search(r"preflight took (\d+) s", text).group(1))
        assert preflight <= gpu_suite.PREFLIGHT_S, log
        total = int(re.search(r"gpu_suite: (\d+) s;", text).group(1))
        parts = sum(float(s) for s in re.findall(r"^\| \w+ \| [^|]+ \| ([\d.]+) \|", text, re.M))
        assert total - preflight - parts <= gpu_suite.PACK_S + 1, log


def test_allotment_respects_least_and_limit():
    part = Part("x", "", least=30, limit=100, inputs=(), commands=None)
    assert gpu_suite.allotment(part, 500) == 100
    assert gpu_suite.allotment(part, 35) == 35
    assert gpu_suite.allotment(part, 29) is None


def test_the_clock_counts_the_budget_from_the_parts_and_the_limit_from_the_suite():
    now = time.monotonic()
    clock = Clock(budget=100, limit=590, suite_start=now - 50, parts_start=now)
    assert 99 < clock.left() <= 100  # the preflight's 50 s are outside the budget
    late = Clock(budget=520, limit=590, suite_start=now - 500, parts_start=now)  # a slow preflight
    assert late.left() <= 590 - 500 - gpu_suite.PACK_S - gpu_suite.KILL_GRACE_S + 1


# ------------------------------------------------------------------ running and packing


def test_parts_run_in_order_within_the_budget_and_are_packed(tmp_path):
    parts = [
        _part("first", "import pathlib; pathlib.Path(WORK, 'a.md').write_text('| table a |')"),
        _part("slow", "import time, pathlib; pathlib.Path(WORK, 'partial.txt').write_text('kept'); time.sleep(60)",
              limit=2),
        _part("failing", "raise SystemExit(3)"),
        _part("too_big", "print('never')", least=10_000),
    ]
    start = time.monotonic()
    rows, out, _ = _run(parts, tmp_path)
    assert time.monotonic() - start < 20  # the sleeping part was killed at its limit
    assert [r["status"] for r in rows] == ["ok", "partial", "failed", "not started (budget)"]
    assert sorted(p.name for p in out.iterdir()) == ["results.tar.gz", "summary.md"]
    names = _members(out)
    assert "results/first/a.md" in names and "results/slow/partial.txt" in names  # cut short, kept
    assert "results/too_big" not in names  # nothing ran: nothing packed
    records = {n.split("/")[1]: json.loads(t) for n, t in names.items() if n.endswith("part.json")}
    assert records["first"]["status"] == "ok" and records["first"]["pieces"][""]["exit"] == 0
    assert records["failing"]["pieces"][""]["exit"] == 3 and records["slow"]["status"] == "partial"
    assert {records["first"][k] for k in ("device", "commit", "date")} == {"NVIDIA Test GPU", "abc1234",
                                                                           "2026-12-07 00:00 UTC"}
    summary = (out / "summary.md").read_text()
    assert "| slow | partial |" in summary and "| too_big | not started (budget) |" in summary


def test_a_crashed_part_leaves_its_log_and_the_end_of_its_output(tmp_path):
    """The crash's output is in the packed folder (its whole log, the end of it in its record and
    in summary.md, the first thing a reader sees), whatever killed it."""
    code = ("import os, sys\nfor i in range(100): print(f'line {i}')\nprint('the last words', flush=True)\n"
            "os.abort()")
    rows, out, _ = _run([_part("crash", code), _part("after", "print('still runs')")], tmp_path)
    assert [r["status"] for r in rows] == ["failed", "ok"]
    names = _members(out)
    log = names["results/crash/output.txt"]
    assert "line 0\n" in log and "the last words" in log
    record = json.loads(names["results/crash/part.json"])
    assert record["status"] == "failed" and record["pieces"][""]["exit"] < 0  # SIGABRT
    assert record["tail"].splitlines()[-1] == "the last words"
    assert "line 0\n" not in record["tail"] and len(record["tail"].splitlines()) == gpu_suite.TAIL_LINES
    summary = (out / "summary.md").read_text()
    assert "## crash: failed, the end of its output" in summary and "the last words" in summary


def test_a_timed_out_part_takes_its_children_with_it(tmp_path):
    marker = tmp_path / "child_alive"
    child = f"import time, pathlib; time.sleep(4); pathlib.Path({str(marker)!r}).write_text('x')"
    code = f"import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', {child!r}])\nimport time; time.sleep(60)\n"
    rows, _, _ = _run([_part("parent", code, limit=1)], tmp_path)
    assert rows[0]["status"] == "partial"
    time.sleep(5)
    assert not marker.exists()


def test_no_part_starts_past_the_command_limit(tmp_path):
    """A preflight that used most of the command's limit leaves the parts no time, whatever the
    budget says."""
    rows, _, _ = _run([_part("late", "print(1)", least=5)], tmp_path, budget=500, limit=100,
                      started=time.monotonic() - 95)
    assert rows[0]["status"] == "not started (budget)"


def test_pack_refuses_more_than_the_lease_returns(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    work.mkdir()
    out.mkdir()
    for i in range(gpu_suite.MAX_FILES):
        (out / f"extra{i}.txt").write_text("x")
    with pytest.raises(RuntimeError, match="at most 8"):
        gpu_suite.pack(out, work, [], "")


def test_the_summary_quotes_every_part_result(tmp_path):
    """summary.md quotes each part's own table, the main job's two folders down included."""
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "train" / "train_lm").mkdir(parents=True)
    (work / "train" / "train_lm" / "summary.md").write_text("| main job table |")
    (work / "step" / "high").mkdir(parents=True)
    (work / "step" / "high" / "step_x.md").write_text("| step table |")
    gpu_suite.pack(out, work, [dict(part="train", status="ok", seconds=1.0, note="")], "")
    summary = (out / "summary.md").read_text()
    assert "| main job table |" in summary and "| step table |" in summary
    assert "| train | ok | 1.0 |" in summary


# ------------------------------------------------------------------ resume


def _tree(root: Path) -> Path:
    for rel, text in {"lib/a.py": "A = 1\n", "lib/b.py": "B = 1\n", "lib/notes.md": "words\n",
                      "other/c.py": "C = 1\n", "tool.py": "T = 1\n"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


PIECE_CODE = "import pathlib; pathlib.Path(WORK, PIECE + '.txt').write_text('done ' + PIECE)"


def _resumable(limit=30):
    return [_part("alpha", "import pathlib; pathlib.Path(WORK, 'alpha.txt').write_text('a')", inputs=("lib/",)),
            _code_part("beta", lambda p: PIECE_CODE + ("; raise SystemExit(1)" if p == "bad" else ""),
                       pieces=("one", "two", "bad"), inputs=("other/", "tool.py"), limit=limit)]


def test_resume_runs_only_what_the_results_lack_for_this_code(tmp_path):
    """Which parts and pieces run, given a results folder and the code at hand: nothing is repeated
    that the results hold for the same inputs; a failed piece is not re-run until its inputs change
    (unless its part is named); a change in a part's inputs re-runs that part and no other."""
    root = _tree(tmp_path / "root")
    parts = _resumable()
    results = tmp_path / "results"

    def planned(**kw):
        return {t.part.name: t.pieces for t in gpu_suite.plan(parts, results, root, **kw)}
    assert planned() == {"alpha": [""], "beta": ["one", "two", "bad"]}  # no results yet
    _, out, _ = _run(parts, tmp_path / "lease1", results, root=root)
    (out / "environment.json").write_text(json.dumps({"device": "NVIDIA Test GPU"}))
    gpu_suite.unpack(out, results, root)
    assert planned() == {"alpha": [], "beta": []}  # all done or failed at these inputs
    assert planned(named=("beta",)) == {"beta": ["bad"]}  # named: its failed piece again, not the others
    (root / "lib" / "notes.md").write_text("not a source file: no change\n")
    assert planned() == {"alpha": [], "beta": []}
    (root / "lib" / "a.py").write_text("A = 2\n")
    assert planned() == {"alpha": [""], "beta": []}  # only the part whose inputs changed
    (root / "tool.py").write_text("T = 2\n")
    todo = gpu_suite.plan(parts, results, root)[1]
    assert todo.pieces == ["one", "two", "bad"] and todo.why == "inputs changed since abc1234" and not todo.resume
    assert planned(fresh=True) == {"alpha": [""], "beta": ["one", "two", "bad"]}


def test_a_change_of_a_parts_command_makes_its_results_stale(tmp_path):
    root = _tree(tmp_path / "root")
    a = _part("p", "print(1)", inputs=("lib/",))
    b = _part("p", "print(2)", inputs=("lib/",))
    assert gpu_suite.digest(a, root) != gpu_suite.digest(b, root)
    assert gpu_suite.digest(a, root) == gpu_suite.digest(_part("p", "print(1)", inputs=("lib/",)), root)


def test_the_generated_decisions_and_build_outputs_are_no_input(tmp_path):
    """Writing the decisions (decide) or installing (a built extension, caches, a link to the
    kernels) must not make every result stale."""
    root = tmp_path / "root"
    (root / "klkern" / "runtime").mkdir(parents=True)
    (root / "klkern" / "runtime" / "_backend.py").write_text("x = 1\n")
    (root / "triton_kernels").mkdir()
    (root / "triton_kernels" / "k.py").write_text("k = 1\n")
    part = _part("p", "print(1)", inputs=gpu_suite.LIBRARY)
    before = gpu_suite.digest(part, root)
    (root / "klkern" / "runtime" / "_gpu_decisions.py").write_text("DEVICES = {}\n")
    (root / "klkern" / "_C.cpython-312-x86_64-linux-gnu.so").write_bytes(b"\0")
    (root / "klkern" / "__pycache__").mkdir()
    (root / "klkern" / "__pycache__" / "x.py").write_text("cache\n")
    (root / "klkern" / "triton_kernels").symlink_to(root / "triton_kernels")
    assert gpu_suite.digest(part, root) == before
    (root / "klkern" / "runtime" / "_backend.py").write_text("x = 2\n")
    assert gpu_suite.digest(part, root) != before


def test_pieces_resume_across_leases_and_keep_what_was_done(tmp_path):
    """A part too long for one lease: the first lease runs the pieces its budget holds, the next
    starts from the committed folder and runs the rest; the first pieces' files and records stay."""
    root = _tree(tmp_path / "root")
    slow = "import time, pathlib; time.sleep(1.0); pathlib.Path(WORK, PIECE + '.txt').write_text(PIECE)"
    parts = [_code_part("long", lambda p: slow, pieces=("a", "b", "c"), least=2, limit=10, inputs=("lib/",))]
    results = tmp_path / "results"
    rows, out, _ = _run(parts, tmp_path / "lease1", results, budget=4, root=root)  # room for 1 or 2, not 3
    (out / "environment.json").write_text(json.dumps({"device": "NVIDIA Test GPU"}))
    gpu_suite.unpack(out, results, root)
    first = json.loads((results / "long" / "part.json").read_text())
    done = [p for p, r in first["pieces"].items() if r["status"] == "ok"]
    assert rows[0]["status"] == "partial" and 1 <= len(done) < 3 and first["status"] == "partial"
    todo = gpu_suite.plan(parts, results, root)[0]
    assert todo.resume and todo.pieces == [p for p in ("a", "b", "c") if p not in done]
    rows, out, _ = _run(parts, tmp_path / "lease2", results, budget=60, root=root)
    (out / "environment.json").write_text(json.dumps({"device": "NVIDIA Test GPU"}))
    gpu_suite.unpack(out, results, root)
    record = json.loads((results / "long" / "part.json").read_text())
    assert record["status"] == "ok" and sorted(p.name for p in results.glob("long/*.txt")) == [
        "a.txt", "b.txt", "c.txt", "output.txt"]
    assert gpu_suite.plan(parts, results, root)[0].pieces == []


def test_a_part_waits_for_the_results_it_reads(tmp_path):
    """The main job reads the sweep's rates: it starts only once the sweep's results are complete
    for the code at hand, from this lease or committed."""
    root = _tree(tmp_path / "root")
    sweep = _code_part("sweep", lambda p: PIECE_CODE + ("; raise SystemExit(1)" if p == "y" else ""),
                       pieces=("x", "y"), inputs=("lib/",))
    train = _part("train", "print('trained')", needs=("sweep",), inputs=("lib/",))
    rows, _, _ = _run([sweep, train], tmp_path / "l1", root=root)
    assert [r["status"] for r in rows] == ["failed", "waiting"]
    ok = _code_part("sweep", lambda p: PIECE_CODE, pieces=("x", "y"), inputs=("lib/",))
    rows, _, _ = _run([ok, train], tmp_path / "l2", root=root)
    assert [r["status"] for r in rows] == ["ok", "ok"]


def test_unavailable_pieces_are_held_not_failed(tmp_path):
    root = _tree(tmp_path / "root")
    part = _code_part("peers", lambda p: PIECE_CODE, pieces=("here", "away"), inputs=("lib/",),
                      unavailable=lambda p: "not carried" if p == "away" else None)
    todo = gpu_suite.plan([part], tmp_path / "results", root)[0]
    assert todo.pieces == ["here"] and todo.held == [("away", "not carried")]
    _run([part], tmp_path, root=root)
    record = json.loads((tmp_path / "work" / "peers" / "part.json").read_text())
    assert record["status"] == "ok" and "away" not in record["pieces"]  # complete for what can run here


# ------------------------------------------------------------------ unpack


def test_unpack_replaces_a_parts_folder_and_fills_an_unknown_commit(tmp_path):
    """A part's folder from a lease replaces the committed one (it started from it: a stale file
    of an older run must not survive). A tree copied without .git records commit "unknown"; unpack
    names this checkout's commit where the part's inputs here hash to the digest that ran."""
    from bench._meta import git_commit

    part = gpu_suite.PARTS[0]  # check: its inputs are this checkout's library
    work, out, dest = tmp_path / "work", tmp_path / "out", tmp_path / "dest"
    (work / "check").mkdir(parents=True)
    (work / "check" / "check.json").write_text("{}")
    record = {"part": "check", "digest": gpu_suite.digest(part), "commit": "unknown", "status": "ok",
              "pieces": {"": {"status": "ok"}}}
    (work / "check" / "part.json").write_text(json.dumps(record))
    (work / "install.log").write_text("installed")
    gpu_suite.pack(out, work, [], "")
    (out / "environment.json").write_text(json.dumps({"device": "NVIDIA Test GPU 80GB"}))
    (out / "suite.log").write_text("log")
    (dest / "check").mkdir(parents=True)
    (dest / "check" / "stale.txt").write_text("from an older run")
    gpu_suite.unpack(out, dest)
    assert not (dest / "check" / "stale.txt").exists() and (dest / "check" / "check.json").is_file()
    assert json.loads((dest / "check" / "part.json").read_text())["commit"] == git_commit()
    assert (dest / "install.log").read_text() == "installed" and (dest / "suite.log").read_text() == "log"
    record["digest"] = "0" * 16  # other code ran: the commit stays unknown
    (work / "check" / "part.json").write_text(json.dumps(record))
    gpu_suite.pack(out, work, [], "")
    gpu_suite.unpack(out, dest)
    assert json.loads((dest / "check" / "part.json").read_text())["commit"] == "unknown"
    assert gpu_suite.slug("NVIDIA H200") == "nvidia-h200" and gpu_suite.kind_of("NVIDIA H200") == "nvidia-h200"
    assert gpu_suite.kind_of("NVIDIA H100 80GB HBM3") == "nvidia-h100-x1"


def test_unpack_refuses_paths_outside_the_destination(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "environment.json").write_text(json.dumps({"device": "X"}))
    evil = tmp_path / "evil.txt"
    evil.write_text("x")
    with tarfile.open(out / "results.tar.gz", "w:gz") as tar:
        tar.add(evil, arcname="../evil.txt")
    with pytest.raises(ValueError, match="refusing"):
        gpu_suite.unpack(out, tmp_path / "dest")


# ------------------------------------------------------------------ the real parts


def test_every_part_in_priority_order_and_its_scripts_exist():
    names = [p.name for p in gpu_suite.PARTS]
    # the decision first; the tiles right after the step, so that the next lease's step (its inputs
    # include the decided tiles) measures the kernels at their own tiles
    assert names[:7] == ["check", "step", "tune", "refresh", "peers", "sweep", "train"]
    ctx = Ctx(Path("/tmp/w"), Path("/tmp/r"))
    for part in gpu_suite.PARTS:
        commands = part.commands(ctx, list(part.pieces))
        assert commands and part.least < part.limit and part.inputs, part.name
        assert {p for c in commands for p in c.pieces} == set(part.pieces), part.name  # every piece has a command
        for command in commands:
            script = next((str(c) for c in command.argv if str(c).endswith(".py")), None)
            if script:  # the scripts it runs exist
                assert (ROOT / script).is_file(), script
        assert gpu_suite.input_files(part.inputs), part.name  # its inputs name files of this checkout
    with pytest.raises(SystemExit, match="unknown part"):
        gpu_suite._select(["nope"])


def test_a_part_that_runs_one_script_is_one_line():
    part = Part("tune", "tile tuning", 60, 300, gpu_suite.KERNELS + ("bench/tune_tiles.py",),
                gpu_suite.script("bench/tune_tiles.py"))
    (command,) = part.commands(Ctx(Path("/w/tune"), Path("/r")), [""])
    assert command.argv == [sys.executable, "bench/tune_tiles.py", "--out", Path("/w/tune")]


def test_the_main_job_reads_the_sweeps_rates_from_this_lease_or_the_committed_results(tmp_path):
    train = next(p for p in gpu_suite.PARTS if p.name == "train")
    work, results = tmp_path / "work" / "train", tmp_path / "results"

    def argv(pieces):
        return [str(a) for a in train.commands(Ctx(work, results), pieces)[0].argv]
    cmd = argv(["klsoap-seed1", "adamw-seed1"])
    assert "--lr-from" not in cmd and cmd[cmd.index("--preset") + 1] == "gpu" and "--resume" in cmd
    assert cmd[cmd.index("--optimizers") + 1] == "adamw,klsoap" and cmd[cmd.index("--seeds") + 1] == "1"
    (results / "sweep").mkdir(parents=True)
    (results / "sweep" / gpu_suite.SWEEP_JSON).write_text("{}")
    cmd = argv(["adamw-seed0"])
    assert cmd[cmd.index("--lr-from") + 1] == str(results / "sweep" / gpu_suite.SWEEP_JSON)
    (work.parent / "sweep").mkdir(parents=True)
    (work.parent / "sweep" / gpu_suite.SWEEP_JSON).write_text("{}")
    cmd = argv(["adamw-seed0"])
    assert cmd[cmd.index("--lr-from") + 1] == str(work.parent / "sweep" / gpu_suite.SWEEP_JSON)
    sweep = next(p for p in gpu_suite.PARTS if p.name == "sweep")
    assert set(sweep.pieces) == {p.rsplit("-seed", 1)[0] for p in train.pieces}


def test_the_peers_count_only_where_they_ran(tmp_path, monkeypatch):
    """A lease whose peers did not travel, or did not install, holds the pieces that need them
    (the main job then runs without HeavyBall's SOAP) and does not record klkern alone as the
    peers' result."""
    monkeypatch.setattr(gpu_suite, "ROOT", tmp_path)
    assert "no peers/ folder" in gpu_suite._peers_unavailable()
    assert "no peers/ folder" in gpu_suite._job_unavailable("heavyball-soap-seed0")
    (tmp_path / "peers").mkdir()
    assert gpu_suite._peers_unavailable() is None and gpu_suite._job_unavailable("klsoap-seed0") is None
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    assert "not importable" in gpu_suite._job_unavailable("heavyball-soap")
    for versions, done in (({"klkern": "klkern abc"}, False), ({"klkern": "x", "HeavyBall": "heavyball 3.2.1"}, True)):
        (tmp_path / "peer_step_cuda_highest.json").write_text(json.dumps({"meta": {"versions": versions}}))
        assert gpu_suite._peers_finished(tmp_path, "highest") is done


def _corpus(tmp_path) -> Path:
    words = "the quick brown fox jumps over a lazy dog and packs my box with five dozen jugs".split()
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(" ".join(words[(i * 7 + k * 3) % len(words)] for k in range(9)) for i in range(400)))
    return path


def test_the_main_job_resumes_one_optimizer_and_seed_at_a_time(tmp_path, monkeypatch):
    """train_lm.py --resume keeps the finished runs of its folder and runs only the others; a run
    cut short is run again; --budget starts no run that would end past it. The summary covers all."""
    import train_lm

    args = ["--preset", "tiny", "--data", str(_corpus(tmp_path)), "--steps", "6", "--no-progress",
            "--out", str(tmp_path / "job")]
    calls = []
    real = train_lm.train_one

    def counted(name, seed, *a, **kw):
        calls.append((name, seed))
        result = real(name, seed, *a, **kw)
        time.sleep(0.2)  # every run longer than the budgets below, however fast this machine
        return result
    monkeypatch.setattr(train_lm, "train_one", counted)
    train_lm.main([*args, "--seeds", "0", "--optimizers", "adamw,klshampoo"])
    assert calls == [("adamw", 0), ("klshampoo", 0)]
    calls.clear()
    train_lm.main([*args, "--seeds", "0,1", "--optimizers", "adamw,klshampoo", "--resume"])
    assert calls == [("adamw", 1), ("klshampoo", 1)]  # seed 0's two runs kept
    summary = json.loads((tmp_path / "job" / "summary.json").read_text())
    assert {(r["optimizer"], r["seed"]) for r in summary["runs"]} == {(o, s) for o in ("adamw", "klshampoo")
                                                                       for s in (0, 1)}
    assert [(r["optimizer"], r["seeds"]) for r in summary["table"]] == [("adamw", 2), ("klshampoo", 2)]
    rows = train_lm.read_runs(tmp_path / "job" / "runs.csv")
    assert sorted((r["optimizer"], r["seed"]) for r in rows) == sorted((o, s) for o in ("adamw", "klshampoo")
                                                                       for s in (0, 1))
    assert "partial" not in (tmp_path / "job" / "summary.md").read_text()
    calls.clear()
    train_lm.main([*args, "--seeds", "0,1", "--optimizers", "adamw,klshampoo", "--resume",
                   "--lr", "klshampoo=0.02"])
    assert calls == [("klshampoo", 0), ("klshampoo", 1)]  # another rate: those runs are not kept
    calls.clear()
    train_lm.main([*args, "--seeds", "2", "--optimizers", "adamw,klshampoo", "--resume", "--lr", "klshampoo=0.02",
                   "--budget", "0.05"])
    assert calls == [("adamw", 2)]  # room for one run: the next would end past the budget
    assert "**partial**: 5 of 6 runs done" in (tmp_path / "job" / "summary.md").read_text()


def test_the_sweep_resumes_one_optimizer_at_a_time(tmp_path, monkeypatch):
    """lr_sweep.py writes its files after every run; ``complete`` lists the optimizers whose sweep
    ended (the suite's pieces); --budget starts no run that would end past it; a second call
    reuses every run the JSON holds."""
    import lr_sweep

    train_lm = lr_sweep.train_lm
    stem = tmp_path / "sweep"
    args = ["--preset", "tiny", "--data", str(_corpus(tmp_path)), "--steps", "6", "--grid", "1e-3,1e-2",
            "--extend", "0", "--no-progress", "--out", str(stem)]
    calls = []
    real = train_lm.train_one

    def counted(name, seed, lr, *a, **kw):
        calls.append((name, lr))
        result = real(name, seed, lr, *a, **kw)
        time.sleep(0.2)  # every run longer than the budget below, however fast this machine
        return result
    monkeypatch.setattr(train_lm, "train_one", counted)
    lr_sweep.main([*args, "--optimizers", "adamw,klshampoo", "--budget", "0.05"])  # room for one run
    data = json.loads(stem.with_suffix(".json").read_text())
    assert calls == [("adamw", 1e-3)] and data["complete"] == [] and list(data["final_val_loss"]) == ["adamw"]
    assert "**partial**" in stem.with_suffix(".md").read_text()
    calls.clear()
    best = lr_sweep.main([*args, "--optimizers", "adamw,klshampoo"])
    assert calls == [("adamw", 1e-2), ("klshampoo", 1e-3), ("klshampoo", 1e-2)]  # adamw's first rate reused
    data = json.loads(stem.with_suffix(".json").read_text())
    assert data["complete"] == ["adamw", "klshampoo"] and set(best) == {"adamw", "klshampoo"} == set(data["best"])
    calls.clear()
    lr_sweep.main([*args, "--optimizers", "klshampoo"])
    assert calls == [] and json.loads(stem.with_suffix(".json").read_text())["complete"] == ["adamw", "klshampoo"]


# ------------------------------------------------------------------ decide


def _step_file(folder: Path, rows, date="2026-12-01 00:00 UTC", name="NVIDIA Test"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "step_x.json").write_text(json.dumps({"meta": {"device": name, "commit": "c0ffee0", "date": date},
                                                    "rows": rows}))


def _row(precision, optimizer, torch_ms, triton_ms, graph_ms=None, triton_graph_ms=None):
    row = {"precision": precision, "optimizer": optimizer, "torch": {"median_ms": torch_ms},
           "triton": {"median_ms": triton_ms}}
    if graph_ms:
        row["graph"] = {"median_ms": graph_ms}  # the torch path captured
    if triton_graph_ms:
        row["triton_graph"] = {"median_ms": triton_graph_ms}
    return row


def _qr_file(folder: Path, rows, kind="random"):
    folder.mkdir(parents=True, exist_ok=True)
    suffix = "_factor" if kind == "factor" else ""
    (folder / f"qr_x{suffix}.json").write_text(json.dumps({"meta": {"input": kind, "commit": "c0ffee0",
                                                                     "date": "2026-12-01 00:00 UTC"}, "rows": rows}))


def _qr_row(n, **ms):
    return {"shape": [4, n, n], **{f"{k}_ms": v for k, v in ms.items()}, "accurate": {k: True for k in ms}}


def _device(results: Path, key: str, name: str, capability="9.0"):
    folder = results / f"gpu_{key}"
    (folder / "check").mkdir(parents=True)
    (folder / "check" / "part.json").write_text(json.dumps({"device": name, "kind": gpu_decide.kind_of(name),
                                                            "capability": capability, "pieces": {}}))
    return folder


def test_decide_on_recorded_results(tmp_path):
    """backend="auto" takes the kernels at a precision only where every optimizer's Triton step beat
    its torch step by the margin; cuda_graph is recommended where every captured step beat the
    uncaptured one; QR's auto takes per width the fastest accurate method (shifted CholeskyQR3 only
    on the refresh's own input, which wins over random input); tiles are carried through; where two
    devices of one capability disagree each keeps its own entry and the capability only what they
    share."""
    results = tmp_path / "results"
    h200 = _device(results, "nvidia-h200", "NVIDIA H200")
    h100 = _device(results, "nvidia-h100-80gb-hbm3", "NVIDIA H100 80GB HBM3")
    margin = gpu_decide.KERNEL_MARGIN
    _step_file(h200 / "step" / "high", [_row("high", "KLShampoo", 10.0, 10.0 / (margin + 0.01), 5.0, 4.0),
                                        _row("high", "KLSOAP", 10.0, 9.0, 6.0)])
    _step_file(h200 / "step" / "medium", [_row("medium", "KLShampoo", 10.0, 9.0, 6.0),
                                          _row("medium", "KLSOAP", 10.0, 10.0 / (margin - 0.01), 6.0)])
    _step_file(h100 / "step" / "high", [_row("high", "KLShampoo", 10.0, 12.0), _row("high", "KLSOAP", 10.0, 12.0)])
    _qr_file(h200 / "refresh" / "qr", [_qr_row(768, klkern=1.0, torch=5.0, shifted_cholqr3=0.5),
                                       _qr_row(4096, klkern=9.0, torch=5.0, shifted_cholqr3=2.0)])
    _qr_file(h200 / "refresh" / "qr", [_qr_row(768, klkern=1.0, torch=5.0), _qr_row(1024, klkern=1.0, torch=5.0),
                                       _qr_row(4096, klkern=9.0, torch=5.0)], kind="factor")
    _qr_file(h100 / "refresh" / "qr", [_qr_row(768, klkern=1.0, torch=5.0, shifted_cholqr3=0.5),
                                       _qr_row(4096, klkern=9.0, torch=5.0, shifted_cholqr3=2.0)], kind="factor")
    tables = {"rotate_project": {"tf32": [[0, {"BLOCK_M": 64, "num_warps": 4}]]}}
    (h200 / "tune").mkdir()
    (h200 / "tune" / "tiles_nvidia-h200.json").write_text(json.dumps(
        {"device": "NVIDIA H200", "capability": "9.0", "commit": "c0ffee0", "date": "2026-12-01", "tables": tables}))
    decided = gpu_decide.decide(results)
    a, b = decided["devices"]["nvidia-h200"], decided["devices"]["nvidia-h100-80gb-hbm3"]
    assert a["backend_auto"] == {"high": "triton", "medium": "torch"}  # one optimizer short of the margin
    assert b["backend_auto"] == {"high": "torch"}
    # on the path auto runs: at "high" the Triton path captured (KL-SOAP has no such column), at
    # "medium" the torch path captured
    assert a["cuda_graph"] == {"recommended": True, "speedup": [1.67, round(10 / (margin + 0.01) / 4.0, 2)]}
    assert b["cuda_graph"] is None  # no captured column
    assert a["qr_auto"] == [[0, "extension"], [1025, "torch"]]  # the factor input wins over random
    assert b["qr_auto"] == [[0, "shifted_cholqr3"]]
    assert a["tiles"] == tables and b["tiles"] is None
    assert (a["kind"], b["kind"], a["capability"]) == ("nvidia-h200", "nvidia-h100-x1", "9.0")
    assert decided["capabilities"]["9.0"] == {"cuda_graph": a["cuda_graph"], "tiles": tables}  # what they share
    block = gpu_decide.rows_text(decided)
    assert ("| NVIDIA H200 (nvidia-h200) | 9.0 | - / triton / torch | extension (n <= 1024), torch (n >= 1025) |"
            in block)
    assert "| NVIDIA H100 80GB HBM3 (nvidia-h100-x1) | 9.0 | - / torch / - | shifted_cholqr3 (every n) |" in block


def test_decide_reads_the_first_runs_layout(tmp_path):
    """The first H200 run predates part records: its device and capability come from its
    environment.json, its step file sits directly under step/."""
    folder = tmp_path / "results" / "gpu_nvidia-h200"
    folder.mkdir(parents=True)
    (folder / "environment.json").write_text(json.dumps({"device": "NVIDIA H200", "capability": "9.0"}))
    _step_file(folder / "step", [_row("highest", "KLShampoo", 50.0, 100.0)])
    entry = gpu_decide.decide(tmp_path / "results")["devices"]["nvidia-h200"]
    assert entry["backend_auto"] == {"highest": "torch"} and entry["kind"] == "nvidia-h200"


def test_the_committed_defaults_are_what_decide_writes_from_the_committed_results():
    """So a default can never drift from its evidence: klkern/runtime/_gpu_decisions.py and the GPU
    rows of README.md and docs/gpu.md are exactly what `python bench/gpu_suite.py decide` writes."""
    for path, text in gpu_decide.outputs(gpu_decide.decide()).items():
        assert path.read_text() == text, f"{path.relative_to(ROOT)}: run `python bench/gpu_suite.py decide`"


def test_decide_check_fails_on_a_hand_edited_default(tmp_path, monkeypatch):
    decisions = tmp_path / "_gpu_decisions.py"
    decisions.write_text(gpu_decide.DECISIONS_FILE.read_text().replace("'torch'", "'triton'", 1))
    monkeypatch.setattr(gpu_decide, "DECISIONS_FILE", decisions)
    docs = []
    for path in gpu_decide.DOCS:
        docs.append(tmp_path / path.name)
        docs[-1].write_text(path.read_text())
    monkeypatch.setattr(gpu_decide, "DOCS", tuple(docs))
    assert gpu_decide.main(["--check"]) == 1
    assert gpu_decide.main([]) == 0 and gpu_decide.main(["--check"]) == 0  # rewritten


def test_klkern_follows_the_decisions_and_keeps_its_defaults_without_evidence(monkeypatch):
    """A device's own entry first, then its capability's, then the built-in default (the
    behaviour before any GPU result); backend="auto" and QR method="auto" read them."""
    devices = {"gpu-a": {"backend_auto": {"high": "triton"}, "qr_auto": [[0, "extension"], [2049, "torch"]]},
               "gpu-b": {"backend_auto": None}}
    caps = {"9.0": {"backend_auto": {"high": "torch", "medium": "triton"}, "qr_auto": [[0, "shifted_cholqr3"]]}}
    monkeypatch.setattr(_decisions._gpu_decisions, "DEVICES", devices)
    monkeypatch.setattr(_decisions._gpu_decisions, "CAPABILITIES", caps)
    _decisions._cached.cache_clear()
    assert _decisions.decision("backend_auto", "gpu-a", "9.0") == {"high": "triton"}
    assert _decisions.decision("backend_auto", "gpu-b", "9.0") == caps["9.0"]["backend_auto"]  # no own evidence
    assert _decisions.decision("backend_auto", "gpu-c", "8.0") is None
    cuda = torch.device("cuda")
    monkeypatch.delenv("KLKERN_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "_cuda_driver_ok", lambda: True)
    monkeypatch.setattr(_backend, "triton_import_error", lambda: None)
    for ident, precision, expect in [(("gpu-a", "9.0"), "high", "triton"), (("gpu-b", "9.0"), "high", "torch"),
                                     (("gpu-b", "9.0"), "medium", "triton"), (("gpu-a", "9.0"), "highest", "torch")]:
        monkeypatch.setattr(_decisions, "identity", lambda device, i=ident: i)
        _decisions._cached.cache_clear()
        assert _backend.resolve("auto", cuda, precision) == expect, (ident, precision)
    monkeypatch.setattr(_decisions, "identity", lambda device: ("gpu-c", "8.0"))  # no evidence: the default table
    _decisions._cached.cache_clear()
    monkeypatch.setattr(_backend, "AUTO_KERNELS", {"highest": False, "high": True, "medium": False})
    assert _backend.resolve("auto", cuda, "high") == "triton" and _backend.resolve("auto", cuda, "medium") == "torch"
    assert linalg.auto_method("cuda", 4096, True, cuda) == "torch" and linalg.auto_method("cuda", 3072, True, cuda) \
        == "extension"  # linalg's default: the extension up to AUTO_EXTENSION_MAX_N
    monkeypatch.setattr(_decisions, "identity", lambda device: ("gpu-a", "9.0"))
    _decisions._cached.cache_clear()
    assert [linalg.auto_method("cuda", n, True, cuda) for n in (768, 2048, 2049)] == ["extension"] * 2 + ["torch"]
    assert linalg.auto_method("cuda", 768, False, cuda) == "torch"  # no extension here
    monkeypatch.setattr(_decisions, "identity", lambda device: ("gpu-b", "9.0"))
    _decisions._cached.cache_clear()
    assert linalg.auto_method("cuda", 768, True, cuda) == "shifted_cholqr3"
    assert linalg.auto_method("cpu", 768, True, torch.device("cpu")) == "torch"
    _decisions._cached.cache_clear()


def test_batched_qr_runs_what_the_decisions_choose(monkeypatch):
    """method="auto" runs the method auto_method decides."""
    monkeypatch.setattr(linalg, "auto_method", lambda *a, **k: "shifted_cholqr3")
    calls = []
    real = linalg.shifted_cholqr3
    monkeypatch.setattr(linalg, "shifted_cholqr3", lambda work: calls.append(work.shape) or real(work))
    A = torch.randn(2, 8, 5, dtype=torch.float64)
    Q = linalg.batched_qr(A)
    assert calls == [A.shape] and torch.allclose(Q.mT @ Q, torch.eye(5, dtype=torch.float64), atol=1e-12)


# ------------------------------------------------------------------ the command itself


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_without_a_gpu_it_exits_at_once_with_one_line(tmp_path):
    """With this test's interpreter as $PYTHON (a venv's python whether or not the venv is active,
    so not whatever python3 is first on PATH), the suite runs on it and names it."""
    start = time.perf_counter()
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh"), "--out", str(tmp_path / "x"),
                           "--budget", "60"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHON=sys.executable))
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout.strip().count("\n") == 0 and "no CUDA GPU" in done.stdout
    assert f"(python: {sys.executable})" in done.stdout
    assert done.stderr == ""
    assert time.perf_counter() - start < 30
    assert not (tmp_path / "x").exists()


def test_the_whole_command_on_a_stand_in_gpu(tmp_path, monkeypatch, capsys):
    """main() as a lease runs it, with the CUDA probe answering for a GPU and stand-in parts: the
    preflight's environment (device kind, versions, commit), the packed folder, the records, and a
    second lease after unpack that finds nothing left to run."""
    monkeypatch.setattr(gpu_suite, "probe_cuda", lambda env: ({
        "device": "NVIDIA H100 80GB HBM3", "capability": [9, 0], "memory_gib": 79.2, "torch": torch.__version__,
        "cuda": "13.0"}, ""))
    parts = [_code_part("alpha", lambda p: PIECE_CODE, pieces=("x", "y"), inputs=("bench/gpu_suite.py",)),
             _part("beta", "raise SystemExit(4)", inputs=("bench/gpu_suite.py",))]
    monkeypatch.setattr(gpu_suite, "PARTS", parts)
    monkeypatch.setattr(gpu_suite, "PART_NAMES", [p.name for p in parts])
    results, out = tmp_path / "results", tmp_path / "out"
    argv = ["--out", str(out), "--no-install", "--results", str(results), "--budget", "60"]
    assert gpu_suite.main(argv) == 1  # beta failed
    assert sorted(p.name for p in out.iterdir()) == ["environment.json", "results.tar.gz", "suite.log", "summary.md"]
    env = json.loads((out / "environment.json").read_text())
    assert env["kind"] == "nvidia-h100-x1" and env["key"] == "nvidia-h100-80gb-hbm3" and env["capability"] == "9.0"
    assert env["versions"]["torch"] == torch.__version__ and env["commit"] and env["budget_s"] == 60
    log = (out / "suite.log").read_text()
    assert "device kind nvidia-h100-x1" in log and "alpha: runs x y (no results)" in log
    gpu_suite.unpack(out, results)
    record = json.loads((results / "alpha" / "part.json").read_text())
    assert record["status"] == "ok" and record["kind"] == "nvidia-h100-x1" and record["versions"] == env["versions"]
    assert json.loads((results / "beta" / "part.json").read_text())["status"] == "failed"
    capsys.readouterr()
    assert gpu_suite.main(argv) == 0  # nothing left: alpha done, beta failed at these inputs
    log = (out / "suite.log").read_text()
    assert "alpha: current" in log and "beta: current (failed at" in log


def test_the_plan_command_says_what_the_next_lease_runs():
    done = subprocess.run([sys.executable, "bench/gpu_suite.py", "plan"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "bench/results/gpu_nvidia-h200:" in done.stdout
    assert re.search(r"^  check +runs \(whole\)", done.stdout, re.M)  # the first run predates part records


def test_the_cuda_probe_says_why_there_is_no_gpu(tmp_path):
    """Not every failed probe is "no GPU": a torch that cannot be imported is named as such."""
    broken = tmp_path / "torch"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('libcudart.so.13: cannot open shared object file')\n")
    info, why = gpu_suite.probe_cuda(dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert "torch cannot be imported" in why and "libcudart" in why
    info, why = gpu_suite.probe_cuda(dict(os.environ))
    if not torch.cuda.is_available():
        assert why.startswith("no CUDA GPU") and info["torch"] == torch.__version__


def test_the_docs_give_the_lease_as_a_new_user_runs_it():
    """docs/gpu.md: the wheels fetched here, the one device call, then unpack and decide."""
    text = (ROOT / "docs" / "gpu.md").read_text()
    for line in ["python bench/fetch_peers.py",
                 'run(carry=["peers"], timeout_s=590, command="bash bench/gpu_suite.sh --out $OUT")',
                 "python bench/gpu_suite.py unpack <files_at>", "python bench/gpu_suite.py decide"]:
        assert line in text, line
    assert f"timeout_s={gpu_suite.COMMAND_LIMIT_S}" in text
    # the figures the docs give for the budget and the rules are the code's
    assert f"The parts get {gpu_suite.DEFAULT_BUDGET_S} s after the preflight" in text
    assert f"a {gpu_suite.PREFLIGHT_S} s preflight" in text and f"{gpu_suite.SPARE_S} s spare" in text
    assert f"at least {gpu_decide.KERNEL_MARGIN}x" in text and f"at least {gpu_decide.GRAPH_MARGIN}x" in text


def _klkern_imports(source: str) -> list:
    """(module, name) of every `from klkern... import name` in a piece of Python source."""
    return [(node.module, alias.name) for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("klkern")
            for alias in node.names]


def test_scripts_run_in_subprocesses_import_what_exists():
    """Python held in a string and run elsewhere (the suite's preflight on the GPU machine) is not
    checked by the import of its module: every klkern name such a script imports must exist, or a
    lease fails at its first line. Every string constant of bench/ that parses as Python is read."""
    import importlib
    import importlib.util

    scripts = []
    for path in sorted((ROOT / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and "import klkern" in node.value:
                try:
                    scripts.append((path.name, node.value, _klkern_imports(node.value)))
                except SyntaxError:
                    continue
    assert any(name == "gpu_suite.py" and imports for name, _, imports in scripts)  # the preflight is read
    missing = []
    for name, _, imports in scripts:
        for module, attr in imports:
            owner = importlib.import_module(module)
            if not hasattr(owner, attr) and importlib.util.find_spec(f"{module}.{attr}") is None:
                missing.append(f"{name}: from {module} import {attr}")
    assert not missing, missing
