"""The main job (bench/train_lm.py) and its learning-rate sweep, on a tiny corpus."""

import csv
import io
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


train_lm = _load("train_lm")

# Written here, never downloaded: varied enough not to be memorised in a few
# steps, regular enough that every optimizer's loss falls within 12 steps.
WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly "
         "judge boxing matches and pack my box with five dozen liquor jugs").split()


STEPS = 30
LR_TINY = {"adamw": 1e-2, "shampoo-nograft": 1e-3}
# Shampoo without grafting diverges on this model from 1e-2 up and learns
# slowly below (as on the real corpus, see bench/results/lr_sweep_cpu.md):
# it is held to a drop of 0.05; the others fall by more than 0.5 nats in 30 steps.
MIN_DROP = {"shampoo-nograft": 0.05}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    lines = []
    for i in range(400):
        lines.append(" ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(9)) + ".")
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text("\n".join(lines))
    return path


@pytest.fixture(scope="module")
def tiny_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("train_lm")
    # Rates for this tiny model (the defaults are tuned for preset cpu).
    lrs = [f"--lr={name}={LR_TINY.get(name, 3e-2)}" for name in train_lm.OPTIMIZERS]
    table = train_lm.main(["--preset", "tiny", "--data", str(corpus), "--seeds", "0,1", "--steps", str(STEPS),
                           "--out", str(out), "--no-progress", *lrs])
    return out, table


def test_all_optimizers_reduce_validation_loss(tiny_run):
    out, _ = tiny_run
    with open(out / "runs.csv") as fh:
        rows = list(csv.DictReader(fh))
    for name in train_lm.OPTIMIZERS:
        for seed in ("0", "1"):
            evals = [r for r in rows if r["optimizer"] == name and r["seed"] == seed and r["val_loss"]]
            assert evals, (name, seed)
            assert int(evals[0]["step"]) == 0 and int(evals[-1]["step"]) == STEPS
            first, last = float(evals[0]["val_loss"]), float(evals[-1]["val_loss"])
            # ln 256 = 5.55 at initialisation; every optimizer must learn the byte statistics.
            assert math.isfinite(last) and last < first - MIN_DROP.get(name, 0.5), (name, seed, first, last)
            times = [float(r["wall_time_s"]) for r in rows if r["optimizer"] == name and r["seed"] == seed]
            assert times == sorted(times) and times[-1] > 0


def test_outputs_written_and_consistent(tiny_run):
    out, table = tiny_run
    assert {p.name for p in out.iterdir()} >= {"runs.csv", "summary.md", "summary.json"}
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "val_loss.png").stat().st_size > 10_000
    summary = json.loads((out / "summary.json").read_text())
    assert [r["optimizer"] for r in summary["table"]] == list(train_lm.OPTIMIZERS)
    md = (out / "summary.md").read_text()
    for r in summary["table"]:
        assert r["seeds"] == 2 and r["diverged"] == 0
        assert r["val_loss_min"] <= r["val_loss_mean"] <= r["val_loss_max"]
        assert r["state_mib"] > 0 and r["ms_per_step"] > 0
        assert f"| {r['optimizer']} |" in md and f"{r['val_loss_mean']:.4f}" in md
    state = {r["optimizer"]: r["state_mib"] for r in summary["table"]}
    # KL-Shampoo keeps no Adam second moment for its matrices.
    assert state["klshampoo"] < state["soap"]
    assert table == summary["table"]


def test_same_seed_same_run(corpus, tmp_path):
    """Same seed, same optimizer: identical losses (same init, same batches)."""
    cfg = train_lm.PRESETS["tiny"]
    args = train_lm.parse_args(["--data", str(corpus)])
    data = train_lm.load_data(args, cfg)
    runs = [train_lm.train_one("klshampoo", 3, 1e-2, cfg, data, train_lm.torch.device("cpu"),
                               progress=False) for _ in range(2)]
    losses = [[r["train_loss"] for r in run["rows"]] for run in runs]
    assert losses[0] == losses[1]


def test_bad_arguments(corpus, tmp_path):
    with pytest.raises(SystemExit, match="unknown optimizer"):
        train_lm.main(["--preset", "tiny", "--data", str(corpus), "--optimizers", "adam"])
    with pytest.raises(SystemExit, match="OPT=LR"):
        train_lm.main(["--preset", "tiny", "--data", str(corpus), "--lr", "klshampoo"])
    with pytest.raises(SystemExit, match="OPT.KEY=VALUE"):
        train_lm.main(["--preset", "tiny", "--data", str(corpus), "--set", "klshampoo=1"])
    args = train_lm.parse_args(["--set", "klshampoo.init_factor=1e-3", "--set", "soap.betas=(0.9, 0.99)"])
    assert train_lm.optimizer_args(args) == {"klshampoo": {"init_factor": 1e-3}, "soap": {"betas": (0.9, 0.99)}}
    opt = train_lm.make_optimizer("klshampoo", [torch.nn.Parameter(torch.zeros(2, 2))], 1e-2,
                                  train_lm.PRESETS["tiny"], {"init_factor": 1e-3})
    assert opt.param_groups[0]["init_factor"] == 1e-3
    small = tmp_path / "small.txt"
    small.write_text("abc")
    with pytest.raises(SystemExit, match="corpus too small"):
        train_lm.main(["--preset", "tiny", "--data", str(small), "--out", str(tmp_path)])


def test_lr_sweep_picks_lowest_loss_and_extends_edges(corpus, tmp_path):
    lr_sweep = _load("lr_sweep")
    argv = ["--preset", "tiny", "--data", str(corpus), "--optimizers", "adamw", "--no-progress"]
    best = lr_sweep.main([*argv, "--grid", "1e-5,1e-2", "--extend", "0", "--out", str(tmp_path / "a")])
    record = json.loads((tmp_path / "a.json").read_text())
    losses = record["final_val_loss"]["adamw"]
    assert set(losses) == {"1e-05", "0.01"}
    assert losses["1e-05"] > losses["0.01"]  # 12 steps at 1e-5 barely move
    assert best == {"adamw": 0.01} == record["best"]
    assert "**" in (tmp_path / "a.md").read_text()

    # The best rate on the upper edge: the sweep goes one ladder step further.
    best = lr_sweep.main([*argv, "--grid", "1e-5,1e-4", "--extend", "1", "--out", str(tmp_path / "b")])
    losses = json.loads((tmp_path / "b.json").read_text())["final_val_loss"]["adamw"]
    assert set(losses) == {"1e-05", "0.0001", "0.0003"}
    assert best == {"adamw": 3e-4} and losses["0.0003"] < losses["0.0001"] < losses["1e-05"]


def test_every_argument_settable_the_same_way():
    """--set overrides the comparison's own defaults too (adamw.betas used to fail with
    "multiple values for keyword argument 'betas'")."""
    cfg = train_lm.PRESETS["tiny"]
    p = [torch.nn.Parameter(torch.zeros(3, 3))]
    opt = train_lm.make_optimizer("adamw", p, 1e-3, cfg, {"betas": (0.8, 0.9)})
    assert opt.param_groups[0]["betas"] == (0.8, 0.9)
    opt = train_lm.make_optimizer("shampoo", p, 1e-3, cfg, {"grafting": "none", "weight_decay": 0.5})
    assert opt.param_groups[0]["grafting"] == "none" and opt.param_groups[0]["weight_decay"] == 0.5
    for name, rule in (("klshampoo-rms", "rms"), ("klsoap-debiased", "debiased"), ("klshampoo-0.1", 0.1)):
        assert train_lm.make_optimizer(name, p, 1e-3, cfg).param_groups[0]["init_factor"] == rule


def test_steps_to_target_and_kl_logging(corpus, tmp_path):
    run = {"rows": [{"step": 0, "val_loss": 5.0}, {"step": 10, "val_loss": ""}, {"step": 20, "val_loss": 3.0},
                    {"step": 40, "val_loss": 1.0}]}
    assert train_lm.steps_to(run, 4.0) == 10.0  # halfway between the evaluations at 0 and 20
    assert train_lm.steps_to(run, 2.0) == 30.0
    assert train_lm.steps_to(run, 0.5) == float("inf")
    table = train_lm.main(["--preset", "tiny", "--data", str(corpus), "--seeds", "0", "--optimizers",
                           "adamw,klshampoo", "--out", str(tmp_path), "--no-progress",
                           "--lr", "adamw=1e-2", "--lr", "klshampoo=3e-2"])
    kl_row = next(r for r in table if r["optimizer"] == "klshampoo")
    assert kl_row["target"] == next(r for r in table if r["optimizer"] == "adamw")["val_loss_mean"]
    assert len(kl_row["steps_to_target"]) == 1
    with open(tmp_path / "runs.csv") as fh:
        rows = list(csv.DictReader(fh))
    kls = [float(r["kl"]) for r in rows if r["optimizer"] == "klshampoo" and r["kl"]]
    assert kls and all(math.isfinite(k) for k in kls)
    assert not any(r["kl"] for r in rows if r["optimizer"] == "adamw")
    assert "steps to AdamW's final loss" in (tmp_path / "summary.md").read_text()


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_one_line_per_run_start_and_end_without_a_terminal(corpus, tmp_path, capsys, monkeypatch):
    """Redirected stderr (here pytest's capture, not a terminal): no bars and no carriage returns,
    but a line when each run starts, saying which of how many, and one with its final loss. A
    terminal gets the bars (carriage returns), and --no-progress the lines there too."""
    argv = ["--preset", "tiny", "--data", str(corpus), "--seeds", "0,1", "--optimizers", "adamw,klshampoo",
            "--steps", "2", "--out", str(tmp_path)]
    train_lm.main(argv)
    err = capsys.readouterr().err
    assert "\r" not in err and "it/s" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("[run ")]
    expected = [f"[run {i}/4] {name} seed={seed} lr=" for i, (name, seed) in
                enumerate([("adamw", 0), ("adamw", 1), ("klshampoo", 0), ("klshampoo", 1)], 1)]
    assert len(lines) == 8, err
    for i, prefix in enumerate(expected):
        start, end = lines[2 * i], lines[2 * i + 1]
        assert start.startswith(prefix) and start.endswith(": 2 steps ..."), start
        assert end.startswith(prefix) and "final val loss" in end and "after 2 steps" in end, end

    for extra, bars in (([], True), (["--no-progress"], False)):
        terminal = _Terminal()
        monkeypatch.setattr(sys, "stderr", terminal)
        train_lm.main([*argv, "--seeds", "0", "--optimizers", "adamw", *extra])
        monkeypatch.undo()
        shown = terminal.getvalue()
        assert ("\r" in shown) == bars, shown
        assert "[run 1/1] adamw seed=0" in shown


def test_a_run_that_ends_above_its_start_is_reported_diverged(corpus, tmp_path, capsys, monkeypatch):
    """A finite final loss above the untrained model's (a run that blew up and stayed up) is a
    divergence, as a NaN is: the line says so with both losses, and the summary leaves the run out
    of the mean and counts it as diverged."""
    calls = []

    def rising(*args, **kwargs):
        calls.append(1)
        return 5.0 + 1000.0 * (len(calls) > 1)  # the start, then far above it

    monkeypatch.setattr(train_lm, "evaluate", rising)
    table = train_lm.main(["--preset", "tiny", "--data", str(corpus), "--seeds", "0", "--optimizers", "adamw",
                           "--steps", "2", "--out", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert "diverged (final val loss 1005.0000, above the untrained model's 5.0000)" in err, err
    (row,) = table
    assert row["diverged"] == 1 and not math.isfinite(row["val_loss_mean"])
    assert "1 of 1 diverged" in (tmp_path / "summary.md").read_text()
