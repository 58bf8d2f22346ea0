"""The import rules of klkern/README.md, checked on the source (top-level imports; an import
inside a function is a deliberate late edge and is not counted). Modules are named by their
dotted path inside klkern ("engine._plan", "linalg" for klkern/linalg/__init__.py); the kernels
(triton_kernels/, installed as klkern.triton_kernels) are one node, "triton_kernels".

* no import cycle among klkern's modules;
* the packages import downwards only: runtime/ nothing of klkern; linalg/ only runtime/;
  algorithms/ only linalg/, runtime/ and the kernels; distributed/ and tools/ nothing of engine/;
  the kernels only runtime/ (precision settings, error text, the backend probe: no optimizer);
* the reference (klkern/reference.py), the oracle of every test, reaches none of the fast path
  (the step engine, its plan, the steps, the Triton path, the optimizer classes, the kernels);
* the linear algebra (klkern/linalg/) reaches only the QR extension's loader, precision settings,
  error text and the decisions of the GPU results (which QR method="auto" runs per device).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "klkern"
KERNELS = ROOT / "triton_kernels"

FAST_PATH = {"engine._engine", "engine._plan", "engine._stacking", "engine._phases", "algorithms._steps",
             "algorithms._triton_path", "engine._write", "engine._refresh", "engine._optimizer",
             "engine._checkpoint", "optimizers", "engine._graph", "triton_kernels"}
LINALG_REACHES = {"linalg._ext", "linalg._canonical", "runtime._errors", "runtime._precision", "runtime._decisions",
                  "runtime._gpu_decisions"}
# package -> the packages (and the kernels) its modules may import
PACKAGES_MAY_IMPORT = {
    "runtime": set(),
    "linalg": {"runtime"},
    "algorithms": {"linalg", "runtime", "triton_kernels"},
    "distributed": {"algorithms", "linalg", "runtime"},
    "engine": {"algorithms", "distributed", "linalg", "runtime", "triton_kernels"},
    "tools": {"algorithms", "distributed", "linalg", "runtime"},
    "triton_kernels": {"runtime"},
}


def modules() -> dict:
    """{dotted name inside klkern: path} of every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts) or "__init__"] = path
    return out


def _targets(node: ast.AST, known: dict, here: str) -> set:
    """The klkern modules a top-level import statement of module ``here`` names."""
    out = set()
    if isinstance(node, ast.ImportFrom):
        if node.level:
            if here == "triton_kernels":
                return out  # the kernels among themselves
            base = here.split(".")[: -node.level] if not str(known.get(here, "")).endswith("__init__.py") \
                else here.split(".")[: len(here.split(".")) - node.level + 1]
            module = ".".join([*base, *([node.module] if node.module else [])])
        elif node.module == "klkern" or (node.module or "").startswith("klkern."):
            module = node.module[len("klkern."):] if node.module != "klkern" else ""
        else:
            return out
        for alias in node.names:
            name = f"{module}.{alias.name}" if module else alias.name
            if name in known:
                out.add(name)
            elif module in known:
                out.add(module)
    elif isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name.startswith("klkern.") and alias.name[len("klkern."):] in known:
                out.add(alias.name[len("klkern."):])
    return out - {here}


def graph() -> dict:
    """{module: set of klkern modules it imports at top level}; the kernels as one node."""
    known = modules()
    edges: dict = {}
    for name, path in known.items():
        edges[name] = set().union(*(_targets(n, known, name) for n in ast.parse(path.read_text()).body))
    edges["triton_kernels"] = set().union(*(_targets(n, known, "triton_kernels") for path in KERNELS.glob("*.py")
                                            for n in ast.parse(path.read_text()).body))
    return edges


def reach(edges: dict, start: str) -> set:
    seen, todo = set(), [start]
    while todo:
        for nxt in edges.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def _package(module: str) -> str:
    return module.split(".")[0]


def test_the_graph_is_read():
    edges = graph()
    assert {"engine._optimizer", "reference", "linalg", "triton_kernels", "runtime._precision"} <= set(edges)
    assert "engine._checkpoint" in edges["engine._optimizer"] and "linalg" in edges["algorithms._functional"]
    assert "runtime._errors" in edges["triton_kernels"]


def test_no_import_cycle():
    edges = graph()
    cycles = sorted(m for m in edges if m in reach(edges, m) and m != "__init__")
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_the_packages_import_downwards_only():
    edges = graph()
    wrong = sorted(f"{m} -> {t}" for m, targets in edges.items() if _package(m) in PACKAGES_MAY_IMPORT
                   for t in targets
                   if _package(t) != _package(m) and _package(t) not in PACKAGES_MAY_IMPORT[_package(m)])
    assert not wrong, wrong


def test_the_reference_reaches_no_fast_path():
    assert not reach(graph(), "reference") & FAST_PATH, reach(graph(), "reference") & FAST_PATH


def test_linalg_reaches_only_its_loader():
    assert reach(graph(), "linalg") <= LINALG_REACHES, reach(graph(), "linalg")


ALGORITHM_NAMES = {"klshampoo", "klsoap", "soap", "shampoo", "adamw",  # as the state and defaults key them
                   "KLShampoo", "KLSOAP", "SOAP", "Shampoo", "AdamW",  # as the classes are named
                   "KL-Shampoo", "KL-SOAP"}  # as the papers write them
# The whole family, as the state keys and as the classes name it: listing all of it (__all__, a loop
# over every optimizer) is not a decision about some algorithms.
FAMILIES = ({"klshampoo", "klsoap", "soap", "shampoo"}, {"KLShampoo", "KLSOAP", "SOAP", "Shampoo"})
# A group option whose value is spelled like an algorithm: large_dim_policy="adamw" sends the modes
# above max_precond_dim to the AdamW path; comparing it is not asking which algorithm a block is.
NOT_AN_ALGORITHM = ("large_dim_policy",)


def _names_compared(tree: ast.AST, source: str) -> list:
    """(line, source) of every comparison of a value with an algorithm's name (or a tuple of them)."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        constants = set()
        for operand in operands:
            items = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
            constants |= {i.value for i in items if isinstance(i, ast.Constant) and isinstance(i.value, str)}
        text = ast.get_source_segment(source, node) or ""
        if constants & ALGORITHM_NAMES and not any(word in text for word in NOT_AN_ALGORITHM):
            found.append((node.lineno, text))
    for node in ast.walk(tree):  # a named subset of the algorithms (KL = ("klshampoo", "klsoap")), to compare with
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, (ast.Tuple, ast.List, ast.Set)):
            named = {e.value for e in node.value.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
            if any(1 < len(named & family) < len(family) for family in FAMILIES):
                found.append((node.lineno, ast.get_source_segment(source, node) or ""))
    return found


def test_no_module_compares_algorithm_names_but_the_algorithms_own():
    """What is specific to an algorithm is asked of its object (klkern/algorithms/_algorithms.py), never
    decided by comparing its name; the reference keeps its own comparisons on purpose (its
    docstring: it must not share a mistake with the paths it checks)."""
    offenders = []
    for path in sorted([*PACKAGE.rglob("*.py"), *KERNELS.glob("*.py")]):
        if path.name in ("_algorithms.py", "reference.py"):
            continue
        source = path.read_text()
        offenders += [f"{path.relative_to(ROOT)}:{line}: {text}" for line, text in _names_compared(ast.parse(source),
                                                                                                   source)]
    assert not offenders, "\n".join(offenders)
    # the check itself finds what it is meant to find
    sample = 'if path == "soap": pass\nif algo in ("klshampoo", "klsoap"): pass\nif p == "adamw" or x: pass\n' \
             'if group["large_dim_policy"] == "adamw": pass\nKL = ("klshampoo", "klsoap")\n'
    assert [line for line, _ in _names_compared(ast.parse(sample), sample)] == [1, 2, 3, 5]


def test_no_module_over_500_lines():
    """A module a reader can hold: none of klkern's or the kernels' over 500 lines (split by role,
    klkern/README.md)."""
    long = {str(p.relative_to(ROOT)): n for p in [*PACKAGE.rglob("*.py"), *KERNELS.glob("*.py")]
            if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long
