"""Tile tables, product precision and launching, shared by klkern's Triton kernels.

Tiles: one documented table per kernel and product precision instead of
autotuning: ``triton.autotune`` with more than one config does not run under
``TRITON_INTERPRET=1`` (how CI runs these kernels), and a table keeps
launches reproducible and lets CI compile every entry for real GPUs
(``compile_check.py``). Each entry was chosen so that it compiles for sm_80
and sm_90 without register spills and within the shared memory of an A100.

Precision: the optimizer's mode ("highest", "high", "medium"; see
klkern/runtime/_precision.py) becomes the ``DOT`` constexpr of a kernel
(_product.py): "highest" is fp32-accurate, by "tf32x3" (three TF32 products
of split operands on tensor cores, the default) or "ieee" (fp32 on the FMA
units; :func:`highest_dot` chooses, for the benchmarks that time both);
"high" is "tf32", "medium" "bf16"; accumulation is fp32 in every mode.
Under the interpreter ``tl.dot`` ignores ``input_precision`` and multiplies
bf16 wrongly, so the kernels round their operands themselves (``EMULATE``)
and multiply in fp32: bf16 and 3xTF32 always, TF32 when
``klkern.runtime._precision.emulate_tf32_off_gpu(True)`` asks for it.

Launching: :func:`launch` runs a kernel with the GPU table's tiles (the
interpreter's own tiles under ``TRITON_INTERPRET``) and, while
:func:`recording` is active, records what was launched (kernel, argument
types and specialisations, constexprs, the GPU tiles), which is how
compile_check.py finds the variants the optimizers really launch.
"""

from __future__ import annotations

import contextlib
import os

import torch

from klkern.runtime import _launches
from klkern.runtime._launches import Traffic

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# The optimizer's precision mode -> the kernels' DOT constexpr ("highest": see highest_dot).
DOTS = {"highest": "tf32x3", "high": "tf32", "medium": "bf16"}
# Every DOT a kernel compiles for, and the two ways of computing "highest".
DOT_MODES = ("ieee", "tf32x3", "tf32", "bf16")
HIGHEST_DOTS = ("tf32x3", "ieee")


def highest_dot(dot: str | None = None) -> str:
    """The DOT of "highest" (``dot`` given: set it, for benchmarks that time both; returns the
    previous one). Both are fp32-accurate; "tf32x3" runs on tensor cores."""
    previous = DOTS["highest"]
    if dot is not None:
        if dot not in HIGHEST_DOTS:
            raise ValueError(f"highest_dot({dot!r}): must be one of {HIGHEST_DOTS}")
        DOTS["highest"] = dot
    return previous


def dot_constexprs(mode: str) -> dict:
    """DOT and EMULATE for a precision mode ("highest", "high", "medium")."""
    if mode not in DOTS:
        raise ValueError(f"precision {mode!r}: must be one of {tuple(DOTS)}")
    dot = DOTS[mode]
    emulate = False
    if INTERPRET:
        from klkern.runtime._precision import emulating_tf32

        emulate = dot in ("bf16", "tf32x3") or (dot == "tf32" and emulating_tf32())
    return dict(DOT=dot, EMULATE=emulate)


def gpu_faithful() -> bool:
    """Whether launches are prepared as a GPU prepares them: on a GPU, and while
    :func:`recording` without executing (compile_check records, under the interpreter,
    what a GPU would launch: the GPU's tiles, grids and intermediate dtypes)."""
    return not INTERPRET or (_RECORD["log"] is not None and not _RECORD["execute"])


def intermediate_dtype(mode: str) -> torch.dtype:
    """dtype of a product that only feeds the next product: bf16 under "medium" (it would be
    rounded to bf16 when loaded anyway, so storing it so is exact and halves its traffic).
    float32 under the interpreter, whose bf16 stores truncate: the next product's operand
    emulation then rounds it to nearest even, as a GPU's store does."""
    return torch.bfloat16 if mode == "medium" and gpu_faithful() else torch.float32


# Every BLOCK_K is at least 16: triton 3.6's ``tl.dot`` rejects K < 16 (3.8 and later accept 8),
# and setup.py promises triton >= 3.6 (MIN_BLOCK_K, checked by the tests).
MIN_BLOCK_K = 16

# Tile tables. Per kernel ("gemm": the batched product, "syrk": the factor EMA)
# and product precision, (smallest size, config) in increasing size order; the
# last entry whose size is <= the key applies (keys: min(M, N) for products, d
# for the factor EMA). When a launch's sizes or strides are not all 1 or
# multiples of 16, triton cannot prove its accesses aligned, loads element by
# element and needs more registers: such launches take the UNALIGNED entry.
# num_warps, num_stages and maxnreg are launch options; maxnreg=255 stops
# ptxas from trading a few bytes of spills for occupancy, which it otherwise
# does for several of these variants on sm_80.
#
# Every entry compiles without spills for sm_80 and sm_90 and fits an A100's
# shared memory for every variant the optimizers launch (compile_check.py).
# Notable limits found that way: 128x128 product tiles spill on sm_80 (255
# registers) for the heaviest epilogues (KL-SOAP: Gr, m, v and the projection),
# so the large product tiles are 128x64; bf16 128x64x64 with the Adam prologue
# needs 176 KB of shared memory (> 163 KB on an A100); the fp32 factor EMA
# spills at 128-wide tiles.
def _tiles(**cfg) -> dict:
    return dict(cfg, maxnreg=255)


GEMM_TILES: dict[str, list] = {
    "ieee": [(0, _tiles(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=8, num_stages=3)),
             (1024, _tiles(BLOCK_M=128, BLOCK_N=64, BLOCK_K=16, num_warps=8, num_stages=2))],
    "tf32x3": [(0, _tiles(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3)),
               (1024, _tiles(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3))],
    "tf32": [(0, _tiles(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3)),
             (1024, _tiles(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3))],
    "bf16": [(0, _tiles(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3)),
             (1024, _tiles(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3))],
}
SYRK_TILES: dict[str, list] = {
    "ieee": [(0, _tiles(BLOCK=64, BLOCK_K=16, num_warps=8, num_stages=2))],
    "tf32x3": [(0, _tiles(BLOCK=64, BLOCK_K=32, num_warps=8, num_stages=3))],
    "tf32": [(0, _tiles(BLOCK=64, BLOCK_K=32, num_warps=8, num_stages=3)),
             (1024, _tiles(BLOCK=128, BLOCK_K=32, num_warps=8, num_stages=3))],
    "bf16": [(0, _tiles(BLOCK=64, BLOCK_K=64, num_warps=8, num_stages=3)),
             # BLOCK_K 64 spills 12 B on sm_80 with triton 3.6 (no weights); 32 spills on neither
             (1024, _tiles(BLOCK=128, BLOCK_K=32, num_warps=8, num_stages=3))],
}
# The element-wise kernels (rotate.py's scaled moments under spike_threshold): one table, no product.
# (4 warps spilled 8-16 B under KL-SOAP's scaled moments: Gr, m, v, X and their pointers)
ELEMENTWISE_TILES = {"ieee": [(0, _tiles(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=1))]}
# adamw.py: BLOCK_E entries of one member per program.
ADAMW_TILES = {"ieee": [(0, _tiles(BLOCK_E=4096, num_warps=8, num_stages=1))]}
UNALIGNED_TILES: dict[str, dict] = {
    # tf32x3 at BLOCK_K 32 spills 16 B on sm_80 unaligned (its split operands); 16 does not
    "gemm": {"ieee": _tiles(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=8, num_stages=2),
             "tf32x3": _tiles(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=8, num_stages=2),
             "tf32": _tiles(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=2),
             "bf16": _tiles(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=2)},
    "syrk": {"ieee": _tiles(BLOCK=64, BLOCK_K=16, num_warps=8, num_stages=2),
             "tf32x3": _tiles(BLOCK=64, BLOCK_K=16, num_warps=8, num_stages=2),
             "tf32": _tiles(BLOCK=64, BLOCK_K=32, num_warps=8, num_stages=2),
             "bf16": _tiles(BLOCK=64, BLOCK_K=16, num_warps=8, num_stages=2)},
}
# Per kernel, its table (the product-shaped kernels share the product's until tuned apart).
TILE_TABLES = {"product": GEMM_TILES, "rotate": GEMM_TILES, "precondition": GEMM_TILES, "factor_ema": SYRK_TILES,
               "elementwise": ELEMENTWISE_TILES, "adamw": ADAMW_TILES}
_UNALIGNED_OF = {"product": "gemm", "rotate": "gemm", "precondition": "gemm", "factor_ema": "syrk"}

# Candidates a GPU run tunes among (bench/tune_tiles.py), per tile kind and DOT: the usual Hopper
# tiles (64-128 x 64-128 x 16-64, 3-4 stages, 4-8 warps), each compiled for sm_80 and sm_90 by
# the slow compile test (compile_check record --candidates) with the heaviest epilogue of every
# kernel that uses it; the tuned table picks among them per kernel and size class, and the
# defaults above are among them. 128 x 128 output tiles spill (both archs) under the fused
# epilogues of rotate (KL-SOAP: Gr, m, v, X and the projections) and precondition (the parameter
# write), so only the plain product tries them; a 128-wide factor EMA at BLOCK_K 16 spills 8 B
# on sm_80 with 3xTF32.
_TF32_CANDIDATES = [dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3),
                    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3),
                    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=4)]
_GEMM_CANDIDATES = {
    "ieee": [dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=8, num_stages=3),
             dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=16, num_warps=8, num_stages=2),
             dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=16, num_warps=8, num_stages=3)],
    # 3xTF32 and TF32 tile alike (the same operand loads; 3xTF32 issues three products per tile)
    "tf32x3": [dict(c) for c in _TF32_CANDIDATES],
    "tf32": [dict(c) for c in _TF32_CANDIDATES],
    "bf16": [dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3),
             dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3),
             dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3)],
}
# the plain product (no epilogue) also tries 128 x 128 tiles on tensor cores (on the FMA units,
# "ieee", a 128 x 128 accumulator spilled about 1 KB on sm_80 and sm_90)
_PRODUCT_CANDIDATES = {dot: cands + ([] if dot == "ieee" else [
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=16 if dot == "tf32x3" else 32, num_warps=8, num_stages=3)])
    for dot, cands in _GEMM_CANDIDATES.items()}
_SYRK_CANDIDATES = {
    "ieee": [dict(BLOCK=64, BLOCK_K=16, num_warps=8, num_stages=2),
             dict(BLOCK=64, BLOCK_K=16, num_warps=4, num_stages=3)],
    "tf32x3": [dict(BLOCK=64, BLOCK_K=32, num_warps=8, num_stages=3),
               dict(BLOCK=64, BLOCK_K=16, num_warps=4, num_stages=4)],
    "tf32": [dict(BLOCK=64, BLOCK_K=32, num_warps=8, num_stages=3),
             dict(BLOCK=128, BLOCK_K=32, num_warps=8, num_stages=3),
             dict(BLOCK=64, BLOCK_K=32, num_warps=4, num_stages=4)],
    "bf16": [dict(BLOCK=64, BLOCK_K=64, num_warps=8, num_stages=3),
             dict(BLOCK=128, BLOCK_K=32, num_warps=8, num_stages=3),
             # 4 stages of this tile need 197 KB of shared memory, over sm_80's 163 KB
             dict(BLOCK=128, BLOCK_K=64, num_warps=8, num_stages=3)],
}
CANDIDATES = {kernel: {dot: [_tiles(**c) for c in cands] for dot, cands in table.items()}
              for kernel, table in (("product", _PRODUCT_CANDIDATES), ("rotate", _GEMM_CANDIDATES),
                                    ("precondition", _GEMM_CANDIDATES), ("factor_ema", _SYRK_CANDIDATES))}

# Tile tables a GPU run measured (bench/tune_tiles.py; `python bench/gpu_suite.py decide` carries
# them into klkern/runtime/_gpu_decisions.py under "tiles": {kernel: {dot: [[least size, config],
# ...]}}), looked up for the device a launch runs on (its own entry, else its compute
# capability's); a kernel and DOT they lack keep the table above.


def tuned_table(kernel: str, dot: str, tables: dict | None) -> list | None:
    """The measured table of ``kernel`` at ``dot`` in ``tables`` (a decided "tiles" entry), if any."""
    entries = (tables or {}).get(kernel, {}).get(dot)
    return [(int(least), _tiles(**{k: v for k, v in cfg.items() if k != "maxnreg"})) for least, cfg in entries] \
        if entries else None


def decided_tiles(device: torch.device) -> dict | None:
    """The "tiles" decision for ``device`` (None off CUDA, while recording for compile_check, which
    compiles every table, and where no GPU result speaks for the device)."""
    if device.type != "cuda" or INTERPRET:
        return None
    from klkern.runtime import _decisions

    return _decisions.for_device("tiles", device)


def _all_decided_tiles() -> list:
    from klkern.runtime import _gpu_decisions

    entries = list(_gpu_decisions.DEVICES.values()) + list(_gpu_decisions.CAPABILITIES.values())
    return [e["tiles"] for e in entries if e.get("tiles")]


# The interpreter costs ~1.5 ms per program: few, large programs.
_INTERPRETER_TILES = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, BLOCK=32, BLOCK_E=1024, num_warps=4, num_stages=1)
OPTIONS = ("num_warps", "num_stages", "maxnreg")  # launch options, not constexprs


def aligned(*sizes: int) -> bool:
    """Whether triton specialises all of ``sizes`` (dimensions and strides) as aligned: 1 or a multiple of 16."""
    return all(s == 1 or s % 16 == 0 for s in sizes)


_FORCED: dict = {}


@contextlib.contextmanager
def forced_tiles(kernel: str, cfg: dict):
    """Every launch of ``kernel`` inside the block uses ``cfg`` (bench/tune_tiles.py times candidates so)."""
    previous = _FORCED.get(kernel)
    _FORCED[kernel] = dict(cfg)
    try:
        yield
    finally:
        if previous is None:
            _FORCED.pop(kernel)
        else:
            _FORCED[kernel] = previous


def pick_tiles(table: str, dot: str, size: int, is_aligned: bool = True, device: torch.device | None = None) -> dict:
    """The GPU tile config of kernel ``table`` for precision ``dot`` at ``size`` (the measured
    table of ``device`` where one was decided, else the default table)."""
    if table in _FORCED:
        return dict(_FORCED[table])
    if not is_aligned and table in _UNALIGNED_OF:
        return dict(UNALIGNED_TILES[_UNALIGNED_OF[table]][dot])
    chosen = None
    decided = decided_tiles(device) if device is not None else None
    for least, cfg in tuned_table(table, dot, decided) or TILE_TABLES[table][dot]:
        if size >= least:
            chosen = cfg
    return dict(chosen)


def table_entries(table: str, dot: str, is_aligned: bool, candidates: bool = False) -> list:
    """Every config a launch of this kind could get (what compile_check compiles): the default
    table's, every decided table's, and with ``candidates`` every tuning candidate."""
    if not is_aligned and table in _UNALIGNED_OF:
        return [dict(UNALIGNED_TILES[_UNALIGNED_OF[table]][dot])]
    out = [dict(cfg) for _, cfg in TILE_TABLES[table][dot]]
    for tables in _all_decided_tiles():
        out += [dict(cfg) for _, cfg in tuned_table(table, dot, tables) or ()]
    if candidates:
        out += [dict(cfg) for cfg in CANDIDATES.get(table, {}).get(dot, ())]
    unique: dict = {}
    for cfg in out:
        unique.setdefault(tuple(sorted(cfg.items())), cfg)
    return list(unique.values())


def run_tiles(cfg: dict) -> dict:
    """The tiles and options a launch in this process uses: ``cfg`` (on a GPU, and while
    recording for compile_check), or the interpreter's."""
    if gpu_faithful():
        return dict(cfg)
    return {key: _INTERPRETER_TILES[key] for key in cfg if key != "maxnreg"}


# ---------------------------------------------------------------- launching and recording

_RECORD: dict = {"log": None, "execute": True}


@contextlib.contextmanager
def recording(execute: bool = True):
    """Collect a description of every launch made inside the block (a list, yielded).

    ``execute=False`` records without running the kernels (their outputs are
    left unwritten): which kernels an optimizer step launches, with which
    arguments and constexprs, depends on shapes, dtypes and options only."""
    previous = dict(_RECORD)
    log: list = []
    _RECORD.update(log=log, execute=execute)
    try:
        yield log
    finally:
        _RECORD.update(previous)


_TYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32",
               torch.int64: "i64", torch.float64: "fp64", torch.bool: "i1"}


def _describe_arg(value):
    """(triton type, specialisation) of a runtime argument: "1" (int equal to 1),
    "16" (int or pointer divisible by 16) or "" (none), as triton's JIT specialises."""
    if isinstance(value, torch.Tensor):
        return "*" + _TYPE_NAMES[value.dtype], "16" if value.data_ptr() % 16 == 0 else ""
    if isinstance(value, bool):
        return "u1", ""
    if isinstance(value, int):
        kind = "i32" if -2**31 <= value < 2**31 else "i64"
        return kind, "1" if value == 1 else ("16" if value % 16 == 0 else "")
    if isinstance(value, float):
        return "fp32", ""
    raise TypeError(f"cannot describe kernel argument of type {type(value).__name__}")


def launch(kernel, grid: tuple, args: tuple, constexprs: dict, cfg: dict, table: str, is_aligned: bool,
           traffic: Traffic) -> None:
    """``kernel[grid](*args, **constexprs, **run_tiles(cfg))``: the GPU tiles ``cfg``, or the
    interpreter's (the caller computed ``grid`` and any tile-count arguments from
    ``run_tiles(cfg)``); records the launch with ``cfg`` (from table ``table``, its aligned or
    unaligned part) while :func:`recording` is active, and reports ``traffic`` (the bytes the
    launch moves, klkern/runtime/_launches.py) to whoever counts."""
    fn = getattr(kernel, "fn", kernel)
    _launches.report(fn.__name__.strip("_"), traffic)
    log = _RECORD["log"]
    if log is not None:
        # What a GPU launch would compile: the interpreter's operand emulation is off there.
        gpu = dict(constexprs, EMULATE=False) if "EMULATE" in constexprs else constexprs
        log.append({
            "kernel": f"{fn.__module__}:{fn.__qualname__}",
            "args": [_describe_arg(a) for a in args],
            "constexprs": {k: (v if isinstance(v, (bool, int, str)) else {"tl_dtype": str(v)})
                           for k, v in gpu.items()},
            "tiles": dict(cfg),
            "table": table,
            "aligned": is_aligned,
        })
    if _RECORD["execute"]:
        with _launches.quiet():
            kernel[grid](*args, **constexprs, **run_tiles(cfg))


def nbytes(*tensors) -> int:
    """Bytes of the tensors' elements (None counts nothing)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


# ---------------------------------------------------------------- input checks

# dtypes of state the kernels read and write (bases, factors, moments): every state_dtype the
# optimizers accept (float16 is refused there: its range underflows squared gradients); lam is float32.
STATE_DTYPES = (torch.float32, torch.bfloat16)


def check_stack(name: str, t: torch.Tensor, shape: tuple, dtypes=(torch.float32,)) -> None:
    """Launcher input check: a (B, ...) stack of the expected shape and dtype on one device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name}: dtype {t.dtype} not supported; expected one of {list(dtypes)}")


def check_sides(who: str, name: str, pair, B: int, m: int, n: int, side_a: bool | None = None,
                 side_b: bool | None = None) -> None:
    """``pair = (vector of side a (B, m), of side b (B, n))``: given for a rotated side, None for an
    unrotated one (when the sides are known)."""
    if pair is None:
        return
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ValueError(f"{who}: {name} must be a pair (side a (B, m) or None, side b (B, n) or None)")
    for vec, d, on, side in ((pair[0], m, side_a, "a"), (pair[1], n, side_b, "b")):
        if on is True and vec is None:
            raise ValueError(f"{who}: {name} of side {side} is missing (that side is rotated)")
        if on is False and vec is not None:
            raise ValueError(f"{who}: {name} of side {side} must be None (that side is not rotated: unit "
                             "eigenvalues)")
        if vec is not None:
            check_stack(f"{name}_{side}", vec, (B, d))
