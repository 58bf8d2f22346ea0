"""Train a small GPT on real text with AdamW and every klkern optimizer.

The main job of the project. From the repository root::

    python bench/train_lm.py                       # the CPU comparison (< 10 min, 2 cores)
    python bench/train_lm.py --preset gpu --device cuda --seeds 0,1 \
        --optimizers adamw,klshampoo,klsoap,soap,shampoo,shampoo-nograft,heavyball-soap   # the GPU main job
    python bench/train_lm.py --preset shakespeare-char --device cuda \
        --data path/to/shakespeare.txt             # the nanoGPT setting, on a GPU

The ``gpu`` preset is the main job on a GPU: a 25M-parameter GPT on a fixed token budget
(600 steps of 64 x 256 byte tokens, 9.8M tokens, of the whole stdlib) under bf16 autocast, torch's fused AdamW as the
baseline, the factor products at ``torch.set_float32_matmul_precision("high")`` (klkern keeps its
eigenvalue estimates in float32 whatever the setting), and an untimed warm-up on a throwaway copy
of the model before each timed run, so that compiling kernels (klkern's Triton kernels,
HeavyBall's torch.compile) is not counted as training time. Its summary adds the seconds each run
takes to reach AdamW's final loss and their ratio to AdamW's training time.
``heavyball-soap`` is HeavyBall's SOAP at its defaults (learning rate, refresh period and
largest preconditioned dimension matched), run when ``heavyball`` imports and reported as
skipped otherwise (``bench/fetch_peers.py`` installs it on a machine without network).

Every optimizer receives ALL parameters of the model (embeddings, attention
and MLP matrices, LayerNorm gains and biases); klkern routes 1-D parameters
to its AdamW path. Every run with the same seed sees the same initial weights
and the same sequence of batches.

Default corpus: the Python standard library's own ``.py`` sources (present on
every Python install, so no download), gathered in sorted path order, skipping
``site-packages`` and test folders, capped at ``--max-bytes``; the last 10 % of
the bytes is the validation split. ``--data FILE`` trains on any text file
(same 90/10 rule).

Outputs in ``--out`` (default: a new folder ``runs/train_lm_<preset>-<UTC time>``, printed at
the start and the end; ``--out bench/results/train_lm_<preset>`` refreshes the committed results):
``runs.csv`` (optimizer, seed, lr, step, train loss, val loss, training wall
time), ``summary.md`` / ``summary.json`` (final validation loss, mean and
spread over seeds, time per step, optimizer-state memory) and ``val_loss.png``
(validation loss against steps and against wall-clock time; needs matplotlib).
"""

from __future__ import annotations

import argparse
import ast
import csv
import datetime
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a clone without installing
    sys.path.insert(0, str(ROOT))

import klkern  # noqa: E402
from bench._meta import git_commit, utc_now  # noqa: E402
from klkern.algorithms import _functional as F_klkern  # noqa: E402
from klkern.engine._optimizer import tensor_bytes  # noqa: E402

OPTIMIZERS = ("adamw", "klshampoo", "klsoap", "soap", "shampoo", "shampoo-nograft")
# The initialisation study (bench/results/init_study.md): KL-Shampoo and KL-SOAP with the
# scale-free eigenvalue initialisations of klkern (init_factor="rms" / "debiased") and with the
# prototype's constant 0.1 (which stays one argument away whatever the default is).
VARIANTS = ("klshampoo-rms", "klshampoo-debiased", "klshampoo-0.1", "klsoap-rms", "klsoap-debiased", "klsoap-0.1",
            "klshampoo-stale", "klsoap-stale", "soap-stale", "klshampoo-first", "klshampoo-absfloor",
            "klsoap-relfloor")
# The floor study (bench/results/floor_study.md): "-absfloor" is the SPEC's absolute eigenvalue
# floor 1 / c_k^2 (eigval_floor="absolute", KL-SOAP's default), "-relfloor" the floor s / c_k^2
# relative to the block's first gradient (KL-Shampoo's default).
# The staleness study (bench/results/staleness_study.md): "-stale" refreshes only the bases whose
# staleness exceeds STALENESS_THRESHOLD at a refresh step (staleness_threshold).
STALENESS_THRESHOLD = 0.02
# A public implementation beside klkern's in the main job (when installed; never a dependency).
PEER_OPTIMIZERS = ("heavyball-soap",)
ALL_OPTIMIZERS = OPTIMIZERS + VARIANTS + PEER_OPTIMIZERS


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Config:
    n_layer: int
    n_head: int
    d_model: int
    context: int
    batch_size: int
    steps: int
    eval_every: int
    eval_batches: int
    dropout: float = 0.0
    tied_head: bool = True
    tokens: str = "bytes"  # "bytes" (vocab 256) or "chars" (the text's characters)
    warmup_frac: float = 0.05
    min_lr_frac: float = 0.1
    weight_decay: float = 0.01
    precondition_frequency: int = 10
    autocast: str = ""  # "bf16": the forward and backward passes under torch.autocast(bfloat16)
    fused_adamw: bool = False  # AdamW as torch's fused implementation (the fastest on a GPU)
    matmul_precision: str = ""  # torch.set_float32_matmul_precision for the runs ("": leave torch's)
    warmup_steps: int = 0  # untimed steps on a throwaway model before each run (kernel compilation)
    max_bytes: int = 4_000_000  # the stdlib corpus's cap when --max-bytes is not given


PRESETS = {
    # The default comparison: 6 optimizers x 3 seeds on a 2-core CPU.
    "cpu": Config(n_layer=3, n_head=4, d_model=96, context=64, batch_size=16,
                  steps=500, eval_every=50, eval_batches=8),
    # A few seconds per run; the tests use it.
    "tiny": Config(n_layer=1, n_head=2, d_model=16, context=16, batch_size=4,
                   steps=12, eval_every=4, eval_batches=2),
    # The same model on characters of a text (the Shakespeare corpus in the experiments).
    "shakespeare-cpu": Config(n_layer=3, n_head=4, d_model=96, context=64, batch_size=16,
                              steps=500, eval_every=50, eval_batches=8, tokens="chars"),
    # nanoGPT shakespeare-char (the SOAP gradient-whitening paper's setting):
    # 6 layers, 6 heads, 384 dims, context 256, ~10.6M parameters. For a GPU.
    "shakespeare-char": Config(n_layer=6, n_head=6, d_model=384, context=256, batch_size=64,
                               steps=5000, eval_every=250, eval_batches=20, dropout=0.2,
                               tokens="chars", warmup_frac=0.02, weight_decay=0.1),
    # The main job on a GPU (issue 33): 8 layers, 8 heads, 512 dims, context 256, 25.3M parameters,
    # a fixed budget of 600 x 64 x 256 = 9.8M byte tokens, under one pass over the whole stdlib's
    # training split (about 11M tokens on Python 3.11-3.12; the summary states the passes), bf16
    # autocast.
    "gpu": Config(n_layer=8, n_head=8, d_model=512, context=256, batch_size=64,
                  steps=600, eval_every=60, eval_batches=16, warmup_frac=0.05, weight_decay=0.1,
                  autocast="bf16", fused_adamw=True, matmul_precision="high", warmup_steps=20,
                  max_bytes=64_000_000),
}

# Per-preset default learning rates, chosen by bench/lr_sweep.py on the same
# grid for every optimizer (see bench/results/lr_sweep_<preset>.md). Presets
# without a sweep fall back to "cpu"'s values.
DEFAULT_LR = {
    "cpu": {"adamw": 3e-3, "klshampoo": 1e-2, "klsoap": 1e-2, "soap": 1e-2,
            "shampoo": 1e-2, "shampoo-nograft": 1e-4,
            # bench/results/lr_sweep_stdlib.md (the initialisation study)
            "klshampoo-0.1": 1e-2, "klshampoo-rms": 3e-2, "klshampoo-debiased": 1e-2,
            "klsoap-0.1": 1e-2, "klsoap-rms": 1e-2, "klsoap-debiased": 1e-2},
    # bench/results/lr_sweep_shakespeare.md
    "shakespeare-cpu": {"adamw": 3e-3, "klshampoo": 1e-2, "klsoap": 1e-2, "soap": 1e-2, "shampoo": 1e-2,
                        "shampoo-nograft": 1e-4, "klshampoo-0.1": 1e-2, "klshampoo-rms": 1e-2,
                        "klshampoo-debiased": 1e-2, "klsoap-0.1": 1e-2, "klsoap-rms": 1e-2,
                        "klsoap-debiased": 1e-2},
}

ADAMW_BETAS = (0.9, 0.95)  # the nanoGPT setting; klkern optimizers keep their defaults


# --------------------------------------------------------------------------- data


def stdlib_corpus(max_bytes: int) -> tuple[bytes, str]:
    """The standard library's .py sources in sorted path order, capped."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    chunks, total = [], 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in skip for part in rel.parts):
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if not chunks:
        raise SystemExit(f"no .py files found under {root}; pass --data FILE")
    return b"".join(chunks)[:max_bytes], f"Python {platform.python_version()} stdlib ({root})"


def encode(raw: bytes, tokens: str) -> tuple[torch.Tensor, int]:
    if tokens == "bytes":
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).long(), 256
    text = raw.decode("utf-8", errors="replace")
    vocab = sorted(set(text))
    index = {ch: i for i, ch in enumerate(vocab)}
    return torch.tensor([index[ch] for ch in text], dtype=torch.long), len(vocab)


def load_data(args, cfg: Config) -> dict:
    if args.data:
        raw = Path(args.data).read_bytes()
        raw, source = raw[: args.max_bytes or len(raw)], str(args.data)
    else:
        raw, source = stdlib_corpus(args.max_bytes or cfg.max_bytes)
    ids, vocab = encode(raw, cfg.tokens)
    split = int(0.9 * len(ids))
    train, val = ids[:split], ids[split:]
    if len(val) <= cfg.context + 1:
        raise SystemExit(f"corpus too small: {len(ids)} tokens for context {cfg.context}")
    return {"train": train, "val": val, "vocab": vocab, "source": source,
            "sha256": hashlib.sha256(raw).hexdigest()[:16], "bytes": len(raw)}


def batch(data: torch.Tensor, starts: torch.Tensor, context: int, device) -> tuple:
    offsets = torch.arange(context + 1)
    chunk = data[starts[:, None] + offsets]
    return chunk[:, :-1].to(device), chunk[:, 1:].to(device)


# --------------------------------------------------------------------------- model


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.n_head = cfg.n_head
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.fc_out = nn.Linear(4 * cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + F.dropout(self.proj(y.transpose(1, 2).reshape(b, t, d)), self.dropout, self.training)
        h = self.fc_out(F.gelu(self.fc(self.ln2(x))))
        return x + F.dropout(h, self.dropout, self.training)


class GPT(nn.Module):
    """Token + position embeddings, pre-norm blocks, final LayerNorm, head."""

    def __init__(self, cfg: Config, vocab: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, cfg.d_model)
        self.pos = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, vocab, bias=False)
        if cfg.tied_head:
            self.head.weight = self.tok.weight
        self.dropout = cfg.dropout
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith(("proj.weight", "fc_out.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx, targets):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        x = F.dropout(x, self.dropout, self.training)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


# --------------------------------------------------------------------------- optimizers


def optimizer_spec(name: str, cfg: Config) -> tuple:
    """(class, keyword arguments) of a named optimizer of the comparison, before --set."""
    common = dict(weight_decay=cfg.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW, dict(common, betas=ADAMW_BETAS, **({"fused": True} if cfg.fused_adamw else {}))
    shared = dict(common, precondition_frequency=cfg.precondition_frequency)
    if name == "heavyball-soap":
        try:
            import heavyball  # type: ignore[import-not-found]
        except ImportError as exc:
            raise PeerMissing(f"{name}: heavyball is not installed (bench/fetch_peers.py installs it)") from exc
        # HeavyBall at its defaults but for what the comparison matches: every mode preconditioned,
        # the refresh period fixed (no schedule)
        return heavyball.SOAP, dict(shared, max_precond_dim=1 << 20, use_precond_schedule=False)
    base, _, init = name.partition("-")
    classes = {"klshampoo": klkern.KLShampoo, "klsoap": klkern.KLSOAP, "soap": klkern.SOAP,
               "shampoo": klkern.Shampoo}
    if name not in ALL_OPTIMIZERS or base not in classes:
        raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(ALL_OPTIMIZERS)}")
    if base == "shampoo":
        return klkern.Shampoo, dict(shared, grafting="none" if init == "nograft" else "adam")
    if init == "stale":
        shared["staleness_threshold"] = STALENESS_THRESHOLD
    elif init == "first":  # Adam's order (bench/results/spike_recovery_cpu.md)
        shared["eigenvalues_first"] = True
    elif init in ("absfloor", "relfloor"):  # the eigenvalue floors (bench/results/floor_study.md)
        shared["eigval_floor"] = "absolute" if init == "absfloor" else "relative"
    elif init:
        shared["init_factor"] = float(init) if init[0].isdigit() else init
    return classes[base], shared


class PeerMissing(RuntimeError):
    """A public implementation of the comparison that is not installed here (the run is skipped)."""


def installed(names: list, cfg: Config) -> tuple[list, list]:
    """(the optimizers of ``names`` that can run here, why each other one cannot): a public
    implementation that is not installed is skipped, and said so on stderr."""
    ready, skipped = [], []
    for name in names:
        try:
            optimizer_spec(name, cfg)
            ready.append(name)
        except PeerMissing as exc:
            print(f"skipped: {exc}", file=sys.stderr)
            skipped.append(str(exc))
    return ready, skipped


class RefreshCounter:
    """Counts the eigenbases klkern refreshes (per block and mode) while active: both routes of
    klkern.algorithms._functional.refresh_ (power_step and the periodic QR of Q R) are wrapped."""

    def __init__(self):
        self.count = 0

    def __enter__(self):
        self._saved = (F_klkern.power_step, F_klkern.batched_qr)

        def power_step(R, *args, **kwargs):
            self.count += R.shape[0]
            return self._saved[0](R, *args, **kwargs)

        def batched_qr(A, *args, **kwargs):
            self.count += A.shape[0]
            return self._saved[1](A, *args, **kwargs)
        F_klkern.power_step, F_klkern.batched_qr = power_step, batched_qr
        return self

    def __exit__(self, *exc):
        F_klkern.power_step, F_klkern.batched_qr = self._saved


def peer_versions(names) -> dict:
    """{distribution: version} of the public implementations among ``names``."""
    import importlib.metadata

    return {"heavyball": importlib.metadata.version("heavyball")} if "heavyball-soap" in names else {}


def make_optimizer(name: str, params, lr: float, cfg: Config, extra: dict | None = None):
    """The optimizer ``name`` with learning rate ``lr``; ``extra`` (from --set) overrides any of
    its arguments, the defaults of the comparison included (e.g. adamw.betas)."""
    cls, kwargs = optimizer_spec(name, cfg)
    return cls(params, **{**kwargs, "lr": lr, **(extra or {})})


def state_bytes(opt) -> int:
    return opt.state_bytes() if hasattr(opt, "state_bytes") else tensor_bytes(opt.state)


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup, then cosine decay to min_lr_frac (a multiplier of lr)."""
    warmup = max(1, int(cfg.warmup_frac * cfg.steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    return cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------- one run


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kl_of(opt) -> float | str:
    """The numel-weighted mean of the per-entry KL objective over the preconditioned parameters
    (klkern's optimizer.diagnostics()), or "" for optimizers without one."""
    if not hasattr(opt, "diagnostics"):
        return ""
    sizes = {i: p.numel() for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    pairs = [(stats["kl"], sizes[key]) for key, stats in opt.diagnostics().items()
             if "kl" in stats and math.isfinite(stats["kl"])]
    return sum(v * n for v, n in pairs) / sum(n for _, n in pairs) if pairs else ""


def autocast(cfg: Config, device) -> torch.autocast:
    """The preset's autocast context for forward passes (disabled when ``cfg.autocast`` is "")."""
    if cfg.autocast not in ("", "bf16"):
        raise ValueError(f"Config.autocast must be '' or 'bf16'; got {cfg.autocast!r}")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.autocast == "bf16")


@torch.no_grad()
def evaluate(model, data, starts, cfg: Config, device) -> float:
    model.eval()
    losses = []
    for chunk in starts.split(cfg.batch_size):
        x, y = batch(data, chunk, cfg.context, device)
        with autocast(cfg, device):
            losses.append(model(x, y).float().item())
    model.train()
    return sum(losses) / len(losses)


def progress_bars(progress) -> bool:
    """Whether ``progress`` asks for tqdm bars and stderr can show them: True (the default) means
    bars in a terminal and lines elsewhere (a bar redrawn with carriage returns fills a log
    file with hundreds of lines per run); "lines" always means lines."""
    isatty = getattr(sys.stderr, "isatty", None)
    return progress is True and bool(isatty and isatty())


def warm_up(name: str, lr: float, cfg: Config, data: dict, device, extra: dict | None = None) -> None:
    """``cfg.warmup_steps`` untimed training steps of a throwaway model (its own weights and
    batches), refresh steps and an evaluation included, so that what compiles on first use
    (Triton kernels, torch.compile, cuBLAS handles) is not counted as the timed run's training time.
    Leaves no state behind: the timed run reseeds torch's generator."""
    model = GPT(cfg, data["vocab"]).to(device)
    opt = make_optimizer(name, model.parameters(), lr, cfg, extra)
    batches = torch.Generator().manual_seed(987654)
    for _ in range(cfg.warmup_steps):
        starts = torch.randint(0, len(data["train"]) - cfg.context - 1, (cfg.batch_size,), generator=batches)
        x, y = batch(data["train"], starts, cfg.context, device)
        with autocast(cfg, device):
            loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    evaluate(model, data["val"], torch.arange(cfg.batch_size), cfg, device)
    _sync(device)
    del model, opt


def train_one(name: str, seed: int, lr: float, cfg: Config, data: dict, device,
              progress: bool | str = True, on_row=None, val_seed: int = 1234, extra: dict | None = None,
              label: str = "") -> dict:
    """Train one model; return its log rows and summary figures.

    ``seed`` fixes the initial weights and the batch order; ``val_seed`` the
    validation windows (the learning-rate sweep uses other windows than the
    comparison it tunes). ``progress``: True, a tqdm bar on stderr when it is a terminal, else
    one line on stderr when the run starts and one when it ends; "lines", those lines
    whatever stderr is; False, nothing. ``label`` prefixes them (``[run 4/18]``).

    The preset's matmul precision holds for the run (torch's setting is restored after it); its
    warm-up (``cfg.warmup_steps``) runs first, untimed."""
    saved = torch.get_float32_matmul_precision()
    if cfg.matmul_precision:
        torch.set_float32_matmul_precision(cfg.matmul_precision)
    try:
        if cfg.warmup_steps:
            warm_up(name, lr, cfg, data, device, extra)
        return _train_one(name, seed, lr, cfg, data, device, progress, on_row, val_seed, extra, label)
    finally:
        torch.set_float32_matmul_precision(saved)


def _train_one(name, seed, lr, cfg, data, device, progress, on_row, val_seed, extra, label) -> dict:
    torch.manual_seed(seed)
    model = GPT(cfg, data["vocab"]).to(device)
    opt = make_optimizer(name, model.parameters(), lr, cfg, extra)
    for group in opt.param_groups:
        group["base_lr"] = group["lr"]

    train, val = data["train"], data["val"]
    batches = torch.Generator().manual_seed(seed)
    val_starts = torch.randint(0, len(val) - cfg.context - 1,
                               (cfg.eval_batches * cfg.batch_size,),
                               generator=torch.Generator().manual_seed(val_seed))
    bar = None
    title = f"{label} {name} seed={seed} lr={lr:g}".strip()
    if progress_bars(progress):
        try:
            from tqdm import tqdm
            bar = tqdm(total=cfg.steps, desc=title, leave=True, dynamic_ncols=True, file=sys.stderr)
        except ImportError:
            pass
    lines = bool(progress) and bar is None
    if lines:
        print(f"{title}: {cfg.steps} steps ...", file=sys.stderr, flush=True)

    rows, wall, opt_time, diverged = [], 0.0, 0.0, False
    step_times = []
    refreshes = RefreshCounter()
    row = {"optimizer": name, "seed": seed, "lr": lr, "step": 0, "train_loss": "",
           "val_loss": evaluate(model, val, val_starts, cfg, device), "wall_time_s": 0.0, "kl": ""}
    rows.append(row)
    if on_row:
        on_row(row)
    for step in range(1, cfg.steps + 1):
        starts = torch.randint(0, len(train) - cfg.context - 1, (cfg.batch_size,), generator=batches)
        x, y = batch(train, starts, cfg.context, device)
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * lr_at(step - 1, cfg)
        _sync(device)
        t0 = time.perf_counter()
        with autocast(cfg, device):
            loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        _sync(device)
        t1 = time.perf_counter()
        with refreshes:
            opt.step()
        _sync(device)
        t2 = time.perf_counter()
        wall += t2 - t0
        opt_time += t2 - t1
        step_times.append(t2 - t0)
        train_loss = loss.float().item()
        val_loss = None
        if step % cfg.eval_every == 0 or step == cfg.steps:
            val_loss = evaluate(model, val, val_starts, cfg, device)
        if not math.isfinite(train_loss) or (val_loss is not None and not math.isfinite(val_loss)):
            diverged = True
        row = {"optimizer": name, "seed": seed, "lr": lr, "step": step, "train_loss": train_loss,
               "val_loss": "" if val_loss is None else val_loss, "wall_time_s": wall,
               "kl": "" if val_loss is None else kl_of(opt)}
        rows.append(row)
        if on_row:
            on_row(row)
        if bar is not None:
            bar.update(1)
            if val_loss is not None:
                bar.set_postfix(train=f"{train_loss:.3f}", val=f"{val_loss:.3f}")
        if diverged:
            break
    if bar is not None:
        bar.close()
    final_val = next((r["val_loss"] for r in reversed(rows) if r["val_loss"] != ""), float("nan"))
    first_val = next((r["val_loss"] for r in rows if r["val_loss"] != ""), float("nan"))
    # a run that ends above the untrained model's loss has diverged too, finite or not
    worse = not diverged and math.isfinite(final_val) and final_val > first_val
    diverged = diverged or worse
    if lines:
        ending = (f"diverged (final val loss {final_val:.4f}, above the untrained model's {first_val:.4f})"
                  if worse else "diverged" if diverged else f"final val loss {final_val:.4f}")
        print(f"{title}: {ending} after {rows[-1]['step']} steps, {wall:.0f} s", file=sys.stderr, flush=True)
    return {
        "optimizer": name, "seed": seed, "lr": lr, "rows": rows, "diverged": diverged,
        "final_val_loss": float("nan") if diverged else final_val,
        "ms_per_step": 1e3 * statistics.median(step_times),
        "opt_ms_per_step": 1e3 * opt_time / len(step_times),
        "state_mib": state_bytes(opt) / 2**20,
        "params": sum(p.numel() for p in model.parameters()),
        "bases_refreshed": refreshes.count,
    }


# --------------------------------------------------------------------------- reports


def _reaches(run: dict, target: float, clock: str) -> float:
    """The ``clock`` value of the run's rows ("step" or "wall_time_s") at which its validation
    loss first reaches ``target``, linear between evaluations; inf when it never does."""
    evals = [(r[clock], r["val_loss"]) for r in run["rows"] if r["val_loss"] != ""]
    for (x0, v0), (x1, v1) in zip(evals, evals[1:]):
        if v1 <= target:
            return float(x1) if v0 == v1 else x0 + (x1 - x0) * (v0 - target) / (v0 - v1)
    return math.inf


def steps_to(run: dict, target: float) -> float:
    """First step at which the run's validation loss reaches ``target``, or inf."""
    return _reaches(run, target, "step")


def seconds_to(run: dict, target: float) -> float:
    """Training wall time (forward, backward and optimizer step; not evaluations) at which the
    run's validation loss reaches ``target``, or inf."""
    return _reaches(run, target, "wall_time_s")


def summarize(results: list[dict]) -> list[dict]:
    adamw_runs = [r for r in results if r["optimizer"] == "adamw" and math.isfinite(r["final_val_loss"])]
    adamw = [r["final_val_loss"] for r in adamw_runs]
    target = statistics.fmean(adamw) if adamw else None
    # AdamW's time to its own final loss: its whole training time (mean over its seeds)
    adamw_s = statistics.fmean(r["rows"][-1]["wall_time_s"] for r in adamw_runs) if adamw_runs else None
    table = []
    for name in dict.fromkeys(r["optimizer"] for r in results):
        runs = [r for r in results if r["optimizer"] == name]
        finals = [r["final_val_loss"] for r in runs if math.isfinite(r["final_val_loss"])]
        table.append({
            "optimizer": name,
            "lr": runs[0]["lr"],
            "seeds": len(runs),
            "diverged": sum(r["diverged"] for r in runs),
            "val_loss_mean": statistics.fmean(finals) if finals else float("nan"),
            "val_loss_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "val_loss_min": min(finals) if finals else float("nan"),
            "val_loss_max": max(finals) if finals else float("nan"),
            "ms_per_step": statistics.median(r["ms_per_step"] for r in runs),
            "opt_ms_per_step": statistics.median(r["opt_ms_per_step"] for r in runs),
            "state_mib": runs[0]["state_mib"],
            "bases_refreshed": statistics.fmean(r.get("bases_refreshed", 0) for r in runs),
            "target": target,
            "steps_to_target": ([steps_to(r, target) for r in runs] if target is not None else None),
            "seconds_to_target": ([seconds_to(r, target) for r in runs] if target is not None else None),
            "adamw_seconds": adamw_s,
        })
    return table


def markdown(table: list[dict], meta: dict) -> str:
    lines = [
        f"# train_lm: preset `{meta['preset']}`",
        "",
        f"- corpus: {meta['source']}, {meta['bytes']} bytes (sha256 {meta['sha256']}), "
        f"{meta['tokens']} tokens, vocab {meta['vocab']}, 90/10 train/val split"
        + ("; the standard library of the Python that ran this: another Python version trains on other text "
           "(compare the sha256)" if " stdlib (" in meta["source"] else ""),
        f"- model: {meta['params']} parameters; config: {meta['config']}",
        f"- device: {meta['device']}; torch {meta['torch']}; python {meta['python']}; "
        f"threads {meta['threads']}; klkern {meta['klkern']}; commit {meta.get('commit', 'unknown')}; "
        f"date {meta['date']}",
        *([f"- precision: autocast {meta['autocast']}; float32 matmul precision {meta['matmul_precision']}; "
           f"AdamW {'fused' if meta['fused_adamw'] else 'torch default (foreach)'}; "
           f"{meta['passes']:g} passes over the training split"
           + (f"; peers: {', '.join(f'{k} {v}' for k, v in meta['peers'].items())}" if meta.get("peers") else "")]
          if "autocast" in meta else []),
        f"- command: `{meta['command']}`",
        *([f"- skipped (not installed here): {'; '.join(meta['skipped'])}"] if meta.get("skipped") else []),
        *([f"- **partial**: {meta['runs_done']} of {meta['runs_planned']} runs done (seed-major order)"]
          if meta.get("runs_done", 0) < meta.get("runs_planned", 0) else []),
        *([f"- optimizer arguments beyond the defaults: {meta['optimizer_args']}"]
          if meta.get("optimizer_args") else []),
        "",
        "Final validation loss (mean +- std over seeds, [min, max]); time per training step "
        "(median, forward+backward+optimizer) and per optimizer step (mean); optimizer state.",
        "",
        "Steps to target: the step at which the validation loss first reaches AdamW's final "
        "validation loss (mean over its seeds; linear between evaluations), per seed; seconds to "
        "target: the training wall time (forward, backward, optimizer; evaluations not counted) at "
        "that point, per seed, and (x) their mean over AdamW's mean training time. Bases "
        "refreshed: eigenbases (one per block and preconditioned mode) refreshed in a run, mean over seeds.",
        "",
        "| optimizer | lr | seeds | final val loss | [min, max] | steps to AdamW's final loss | "
        "seconds to AdamW's final loss | ms/step | optimizer ms/step | state MiB | bases refreshed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        loss = (f"{r['val_loss_mean']:.4f} +- {r['val_loss_std']:.4f}"
                if math.isfinite(r["val_loss_mean"]) else "diverged")
        if r["diverged"]:
            loss += f" ({r['diverged']} of {r['seeds']} diverged)"
        reach = "-" if r.get("steps_to_target") is None else ", ".join(
            "not reached" if not math.isfinite(x) else f"{x:.0f}" for x in r["steps_to_target"])
        lines.append(
            f"| {r['optimizer']} | {r['lr']:g} | {r['seeds']} | {loss} | "
            f"[{r['val_loss_min']:.4f}, {r['val_loss_max']:.4f}] | {reach} | {_seconds_cell(r)} | "
            f"{r['ms_per_step']:.1f} | "
            f"{r['opt_ms_per_step']:.1f} | {r['state_mib']:.3f} | {r.get('bases_refreshed', 0):.0f} |")
    ranked = sorted((r for r in table if math.isfinite(r["val_loss_mean"])), key=lambda r: r["val_loss_mean"])
    if len(ranked) > 1:
        lines += ["", "Ordered by mean final validation loss (lowest first): "
                  + " < ".join(f"{r['optimizer']} ({r['val_loss_mean']:.4f})" for r in ranked) + "."]
    return "\n".join(lines) + "\n"


def _seconds_cell(r: dict) -> str:
    """"12.3, 14.0 (0.65x)": the seconds to AdamW's final loss per seed and their mean's ratio to
    AdamW's training time; "-" without AdamW in the comparison."""
    times = r.get("seconds_to_target")
    if not times:
        return "-"
    cell = ", ".join("not reached" if not math.isfinite(x) else f"{x:.3g}" for x in times)
    if all(math.isfinite(x) for x in times) and r.get("adamw_seconds"):
        cell += f" ({statistics.fmean(times) / r['adamw_seconds']:.2f}x)"
    return cell


def plot(results: list[dict], path: Path, title: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e '.[train]')", file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.5))
    colors = {}
    for r in results:
        color = colors.setdefault(r["optimizer"], f"C{len(colors) % 10}")
        evals = [row for row in r["rows"] if row["val_loss"] != ""]
        label = r["optimizer"] if r["seed"] == min(x["seed"] for x in results
                                                   if x["optimizer"] == r["optimizer"]) else None
        axes[0].plot([e["step"] for e in evals], [e["val_loss"] for e in evals], color=color,
                     alpha=0.8, label=label)
        axes[1].plot([e["wall_time_s"] for e in evals], [e["val_loss"] for e in evals], color=color,
                     alpha=0.8, label=label)
        kls = [(e["step"], e["kl"]) for e in evals if e.get("kl") not in ("", None)]
        if kls:
            axes[2].plot([s for s, _ in kls], [k for _, k in kls], color=color, alpha=0.8, label=label)
    axes[2].set_xlabel("step")
    axes[2].set_ylabel("KL objective vs. isotropic, per entry (lower fits better)")
    axes[2].set_title("preconditioner fit (optimizer.diagnostics()['kl'])", fontsize=9)
    axes[2].grid(alpha=0.3)
    if axes[2].lines:
        axes[2].legend(fontsize=8)
    finals = [r["final_val_loss"] for r in results if math.isfinite(r["final_val_loss"])]
    for ax, xlabel in zip(axes[:2], ("step", "training wall time (s)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (nats/token)")
        starts = [r["rows"][0]["val_loss"] for r in results if r["rows"] and r["rows"][0]["step"] == 0]
        if finals and starts:  # from the best final loss up to the loss at initialisation
            ax.set_ylim(min(finals) - 0.1, max(starts) + 0.2)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                   help=f"comma-separated subset of {','.join(ALL_OPTIMIZERS)} (variants: -rms/-debiased/-0.1 "
                        f"set init_factor, -stale sets staleness_threshold={STALENESS_THRESHOLD}, -first sets "
                        "eigenvalues_first=True, -absfloor/-relfloor set eigval_floor='absolute'/'relative', "
                        "shampoo-nograft sets grafting='none')")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--lr", action="append", default=[], metavar="OPT=LR",
                   help="override a learning rate, e.g. --lr klshampoo=3e-3 (repeatable)")
    p.add_argument("--lr-from", metavar="JSON",
                   help="learning rates from a sweep of this preset (bench/lr_sweep.py's .json; --lr overrides)")
    p.add_argument("--steps", type=int, help="override the preset's number of steps")
    p.add_argument("--set", action="append", default=[], metavar="OPT.KEY=VALUE",
                   help="extra optimizer argument, e.g. --set klshampoo.init_factor=1e-3 or "
                         "--set shampoo.state_dtype=torch.bfloat16 (repeatable)")
    p.add_argument("--data", help="train on this text file instead of the stdlib sources")
    p.add_argument("--max-bytes", type=int, default=0,
                   help="cap on corpus bytes (default: 4 MB for the stdlib, whole --data file)")
    p.add_argument("--device", default="cpu", help="torch device to train on (default: cpu; e.g. cuda)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", help="output folder (default: a new runs/train_lm_<preset>-<time>; "
                                 "bench/results/train_lm_<preset> refreshes the committed results)")
    p.add_argument("--no-progress", action="store_true",
                   help="no tqdm progress bars, one line when each run starts and ends (the default when "
                        "stderr is not a terminal, e.g. redirected to a log)")
    p.add_argument("--replot", metavar="DIR", help="only redraw DIR/val_loss.png from DIR/runs.csv")
    p.add_argument("--resume", action="store_true",
                   help="keep the finished runs already in --out (same preset, config, corpus, device and rates) "
                        "and run only the others")
    p.add_argument("--budget", type=float, default=0.0,
                   help="seconds: start no run that would likely end past this (0: no limit)")
    return p.parse_args(argv)


def learning_rates(args) -> dict:
    lrs = dict(DEFAULT_LR.get(args.preset, DEFAULT_LR["cpu"]))
    for name in ALL_OPTIMIZERS:  # a variant without a swept rate starts from its base optimizer's
        base = name.split("-")[1] if name in PEER_OPTIMIZERS else name.split("-")[0]  # a peer: its algorithm's
        lrs.setdefault(name, lrs.get(base, 3e-3))
    if args.lr_from:  # the winners of a sweep (bench/lr_sweep.py's JSON) on this preset
        sweep = json.loads(Path(args.lr_from).read_text())
        if sweep["meta"].get("preset") != args.preset:
            raise SystemExit(f"--lr-from {args.lr_from}: a sweep of preset {sweep['meta'].get('preset')!r}, "
                             f"not {args.preset!r}")
        lrs.update({name: float(lr) for name, lr in sweep["best"].items()})
    for item in args.lr:
        name, _, value = item.partition("=")
        if name not in ALL_OPTIMIZERS or not value:
            raise SystemExit(f"--lr expects OPT=LR with OPT in {', '.join(ALL_OPTIMIZERS)}; got {item!r}")
        lrs[name] = float(value)
    return lrs


RUN_FIELDS = ["optimizer", "seed", "lr", "step", "train_loss", "val_loss", "wall_time_s", "kl"]
# What a run kept by --resume must share with the runs to come (the rest of the meta may differ)
RESUME_KEYS = ("preset", "config", "sha256", "tokens", "optimizer_args", "device", "torch")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what platform knows of it."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()}, {platform.machine()}"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def resumed(out: Path, meta: dict, lrs: dict) -> list[dict]:
    """The finished runs in ``out`` (summary.json's runs with their rows from runs.csv) that --resume
    keeps: those of the same preset, config, corpus, device and optimizer arguments, at the learning
    rate this invocation would use. A run cut short is not kept (it is run again)."""
    summary = out / "summary.json"
    if not summary.is_file() or not (out / "runs.csv").is_file():
        return []
    old = json.loads(summary.read_text())
    differs = [k for k in RESUME_KEYS if old["meta"].get(k) != meta.get(k)]
    if differs:
        print(f"train_lm --resume: not resuming {out}: its runs differ in {', '.join(differs)}", file=sys.stderr)
        return []
    rows = {(r["optimizer"], r["seed"]): r["rows"] for r in read_runs(out / "runs.csv")}
    kept = []
    for run in old.get("runs", []):
        key = (run["optimizer"], run["seed"])
        if key in rows and run["lr"] == lrs.get(run["optimizer"]):
            kept.append({**run, "rows": rows[key]})
    print(f"train_lm --resume: keeping {len(kept)} finished runs of {out}", file=sys.stderr)
    return kept


def read_runs(path: Path) -> list[dict]:
    """The runs of a runs.csv, as train_one's results (rows and final loss)."""
    runs: dict = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            row["step"] = int(row["step"])
            row["wall_time_s"] = float(row["wall_time_s"])
            row["val_loss"] = float(row["val_loss"]) if row["val_loss"] else ""
            row["kl"] = float(row["kl"]) if row.get("kl") else ""
            key = (row["optimizer"], int(row["seed"]))
            runs.setdefault(key, {"optimizer": key[0], "seed": key[1], "rows": []})["rows"].append(row)
    for r in runs.values():
        r["final_val_loss"] = next((x["val_loss"] for x in reversed(r["rows"]) if x["val_loss"] != ""),
                                   float("nan"))
    return list(runs.values())


def optimizer_args(args) -> dict:
    """{optimizer: {argument: value}} from --set OPT.KEY=VALUE."""
    out: dict = {}
    for item in args.set:
        target, _, value = item.partition("=")
        name, _, key = target.partition(".")
        if name not in ALL_OPTIMIZERS or not key or not value:
            raise SystemExit(f"--set expects OPT.KEY=VALUE with OPT in {', '.join(ALL_OPTIMIZERS)}; got {item!r}")
        if value.startswith("torch.") and isinstance(getattr(torch, value[6:], None), torch.dtype):
            out.setdefault(name, {})[key] = getattr(torch, value[6:])  # e.g. state_dtype=torch.bfloat16
            continue
        try:
            out.setdefault(name, {})[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out.setdefault(name, {})[key] = value
    return out


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.replot:
        folder = Path(args.replot)
        summary = json.loads((folder / "summary.json").read_text())
        meta = summary["meta"]
        plot(read_runs(folder / "runs.csv"), folder / "val_loss.png",
             f"GPT ({meta['params']} params), preset {meta['preset']}")
        return summary["table"]
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = PRESETS[args.preset]
    if args.steps:
        cfg = replace(cfg, steps=args.steps, eval_every=min(cfg.eval_every, args.steps))
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    for n in names:
        if n not in ALL_OPTIMIZERS:
            raise SystemExit(f"unknown optimizer {n!r}; choose from {', '.join(ALL_OPTIMIZERS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    names, skipped = installed(names, cfg)
    if not names:
        raise SystemExit("no optimizer to run: " + "; ".join(skipped))
    lrs = learning_rates(args)
    extras = optimizer_args(args)
    device = torch.device(args.device)
    if args.out:
        out = Path(args.out)
    else:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        out = ROOT / "runs" / f"train_lm_{args.preset}-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    print(f"results go to {out}", file=sys.stderr)

    data = load_data(args, cfg)
    print(f"corpus: {data['source']}: {data['bytes']} bytes, {len(data['train'])} train / "
          f"{len(data['val'])} val tokens, vocab {data['vocab']}", file=sys.stderr)
    passes = cfg.steps * cfg.batch_size * cfg.context / len(data["train"])
    if passes > 1:
        print(f"note: {cfg.steps} steps of {cfg.batch_size} x {cfg.context} tokens make {passes:.2f} passes "
              "over the training split (later passes see repeated data)", file=sys.stderr)

    commit = git_commit()  # taken before the runs: the code they ran
    with torch.device("meta"):
        params = sum(p.numel() for p in GPT(cfg, data["vocab"]).parameters())
    meta = {
        "preset": args.preset, "source": data["source"], "bytes": data["bytes"],
        "sha256": data["sha256"], "tokens": cfg.tokens, "vocab": data["vocab"],
        "params": params, "config": asdict(cfg),
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({cpu_model()}, {os.cpu_count()} cores)"),
        "torch": torch.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(), "klkern": klkern.__version__,
        "commit": commit, "date": utc_now(), "optimizer_args": extras, "skipped": skipped,
        "passes": float(f"{passes:.3g}"), "autocast": cfg.autocast or "none", "fused_adamw": cfg.fused_adamw,
        "matmul_precision": cfg.matmul_precision or torch.get_float32_matmul_precision(),
        "peers": peer_versions(names),
        "command": " ".join(["python bench/train_lm.py", *(sys.argv[1:] if argv is None else argv)]),
    }
    results: list[dict] = resumed(out, meta, lrs) if args.resume else []
    kept = {(r["optimizer"], r["seed"]) for r in results}
    # seed-major: a run cut short (a lease's time limit) still leaves whole comparisons behind
    runs = [(name, seed) for seed in seeds for name in names if (name, seed) not in kept]
    meta["runs_done"], meta["runs_planned"] = len(results), len(results) + len(runs)
    table = summarize(results)
    with open(out / "runs.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=RUN_FIELDS)
        writer.writeheader()
        for r in results:
            writer.writerows(r["rows"])
        started, longest = time.monotonic(), 0.0
        for i, (name, seed) in enumerate(runs, 1):
            if args.budget and time.monotonic() - started + longest > args.budget:
                print(f"train_lm: budget of {args.budget:g} s reached; not run: "
                      + ", ".join(f"{n} seed {s}" for n, s in runs[i - 1:]), file=sys.stderr)
                break
            t0 = time.monotonic()
            result = train_one(name, seed, lrs[name], cfg, data, device,
                               progress="lines" if args.no_progress else True, on_row=writer.writerow,
                               extra=extras.get(name), label=f"[run {i}/{len(runs)}]")
            longest = max(longest, time.monotonic() - t0)
            fh.flush()
            result.update(commit=commit, date=utc_now())  # a resumed comparison's runs may come from several
            results.append(result)
            meta["runs_done"] = len(results)
            table = summarize(results)  # the summary so far, after every run
            (out / "summary.md").write_text(markdown(table, meta))
            (out / "summary.json").write_text(json.dumps(
                {"meta": meta, "table": table, "runs": [{k: v for k, v in r.items() if k != "rows"} for r in results]},
                indent=1, default=str) + "\n")

    plot(results, out / "val_loss.png", f"GPT ({meta['params']} params), preset {args.preset}")
    print(markdown(table, meta))
    print(f"results in {out}", file=sys.stderr)
    return table


if __name__ == "__main__":
    main()
