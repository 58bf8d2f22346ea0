"""The main job (bench/train_lm.py) and its learning-rate sweep, on a tiny corpus."""

import csv
import importlib.util
import io
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
    # a torch dtype is named as Python writes it, and a run with it writes its summary
    args = train_lm.parse_args(["--set", "shampoo.state_dtype=torch.bfloat16"])
    assert train_lm.optimizer_args(args) == {"shampoo": {"state_dtype": torch.bfloat16}}
    train_lm.main(["--preset", "tiny", "--data", str(corpus), "--optimizers", "shampoo", "--seeds", "0",
                   "--steps", "2", "--no-progress", "--out", str(tmp_path / "bf16"),
                   "--set", "shampoo.state_dtype=torch.bfloat16"])
    assert "bfloat16" in (tmp_path / "bf16" / "summary.json").read_text()
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
                enumerate([("adamw", 0), ("klshampoo", 0), ("adamw", 1), ("klshampoo", 1)], 1)]  # seed-major
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


def test_seconds_to_target_interpolates_training_time():
    run = {"rows": [{"wall_time_s": 0.0, "val_loss": 5.0}, {"wall_time_s": 1.0, "val_loss": ""},
                    {"wall_time_s": 4.0, "val_loss": 3.0}, {"wall_time_s": 10.0, "val_loss": 1.0}]}
    assert train_lm.seconds_to(run, 4.0) == 2.0  # halfway between the evaluations at 0 s and 4 s
    assert train_lm.seconds_to(run, 2.0) == 7.0
    assert train_lm.seconds_to(run, 0.5) == math.inf
    row = {"seconds_to_target": [7.0, 5.0], "adamw_seconds": 10.0}
    assert train_lm._seconds_cell(row) == "7, 5 (0.60x)"
    assert train_lm._seconds_cell({"seconds_to_target": [7.0, math.inf], "adamw_seconds": 10.0}) == "7, not reached"
    assert train_lm._seconds_cell({"seconds_to_target": None}) == "-"


def test_gpu_preset_is_tens_of_millions_of_parameters_under_bf16():
    cfg = train_lm.PRESETS["gpu"]
    with torch.device("meta"):
        params = sum(p.numel() for p in train_lm.GPT(cfg, 256).parameters())
    assert 10e6 < params < 100e6
    assert (cfg.autocast, cfg.fused_adamw, cfg.warmup_steps > 0) == ("bf16", True, True)
    assert train_lm.optimizer_spec("adamw", cfg)[1]["fused"] is True
    assert "fused" not in train_lm.optimizer_spec("adamw", train_lm.PRESETS["cpu"])[1]  # the CPU job as it was


def test_gpu_preset_settings_on_a_tiny_model(corpus):
    """The GPU preset's mechanisms on the CPU: bf16 autocast changes the numbers and training still
    learns, the preset's matmul precision holds during the run only, fused AdamW, and the untimed
    warm-up leaves the timed run exactly as without it."""
    from dataclasses import replace

    base = train_lm.PRESETS["tiny"]
    gpu_like = replace(base, autocast="bf16", fused_adamw=True, matmul_precision="high", warmup_steps=3)
    args = train_lm.parse_args(["--data", str(corpus)])
    data = train_lm.load_data(args, base)
    cpu = torch.device("cpu")
    seen = []
    before = torch.get_float32_matmul_precision()

    def run(name, cfg):
        out = train_lm.train_one(name, 0, 1e-2, cfg, data, cpu, progress=False,
                                 on_row=lambda r: seen.append(torch.get_float32_matmul_precision()))
        return [r["train_loss"] for r in out["rows"][1:]], out

    for name in ("adamw", "klshampoo"):
        warm, out = run(name, gpu_like)
        assert not out["diverged"] and out["final_val_loss"] < out["rows"][0]["val_loss"], name
        cold, _ = run(name, replace(gpu_like, warmup_steps=0))
        assert warm == cold, name  # the warm-up touches nothing the run sees
        full, _ = run(name, replace(base, fused_adamw=gpu_like.fused_adamw))
        assert full != warm, name  # autocast is on
    assert set(seen) == {"high", before} and torch.get_float32_matmul_precision() == before
    with pytest.raises(ValueError, match="Config.autocast"):
        train_lm.autocast(replace(base, autocast="fp16"), cpu)


def test_a_peer_that_is_not_installed_is_skipped_and_said(corpus, tmp_path):
    if importlib.util.find_spec("heavyball") is not None:
        pytest.skip("heavyball is installed here")
    table = train_lm.main(["--preset", "tiny", "--data", str(corpus), "--seeds", "0", "--optimizers",
                           "adamw,heavyball-soap", "--out", str(tmp_path), "--no-progress"])
    assert [r["optimizer"] for r in table] == ["adamw"]
    meta = json.loads((tmp_path / "summary.json").read_text())["meta"]
    assert meta["skipped"] and "heavyball" in meta["skipped"][0]
    assert "skipped (not installed here): heavyball-soap" in (tmp_path / "summary.md").read_text()
    with pytest.raises(SystemExit, match="no optimizer to run"):
        train_lm.main(["--preset", "tiny", "--data", str(corpus), "--optimizers", "heavyball-soap",
                       "--out", str(tmp_path)])


def test_learning_rates_from_a_sweep(tmp_path):
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({"meta": {"preset": "gpu"}, "best": {"klsoap": 0.003, "adamw": 0.001}}))
    lrs = train_lm.learning_rates(train_lm.parse_args(["--preset", "gpu", "--lr-from", str(sweep),
                                                       "--lr", "adamw=5e-4"]))
    assert (lrs["klsoap"], lrs["adamw"]) == (0.003, 5e-4)  # --lr wins over the sweep
    assert lrs["heavyball-soap"] == lrs["soap"]  # a peer starts from its algorithm's rate
    with pytest.raises(SystemExit, match="not 'cpu'"):
        train_lm.learning_rates(train_lm.parse_args(["--lr-from", str(sweep)]))


def test_a_comparison_cut_short_leaves_its_summary_so_far(corpus, tmp_path, monkeypatch):
    """The summary is rewritten after every run (seed-major), so a run killed by a time limit
    leaves whole comparisons of the seeds done, marked partial."""
    real = train_lm.train_one
    calls = []

    def cut(*args, **kwargs):
        calls.append(args[:2])
        if len(calls) == 3:
            raise KeyboardInterrupt  # the third run never ends
        return real(*args, **kwargs)
    monkeypatch.setattr(train_lm, "train_one", cut)
    with pytest.raises(KeyboardInterrupt):
        train_lm.main(["--preset", "tiny", "--data", str(corpus), "--seeds", "0,1", "--optimizers",
                       "adamw,klshampoo", "--out", str(tmp_path), "--no-progress"])
    assert calls == [("adamw", 0), ("klshampoo", 0), ("adamw", 1)]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [(r["optimizer"], r["seeds"]) for r in summary["table"]] == [("adamw", 1), ("klshampoo", 1)]
    assert "**partial**: 2 of 4 runs done" in (tmp_path / "summary.md").read_text()
