"""The import rules of klkern/README.md, checked on the source (top-level imports; an import
inside a function is a deliberate late edge and is not counted).

* no import cycle among klkern's modules;
* the reference (klkern/reference.py), the oracle of every test, reaches none of the fast path
  (the step engine, its plan, the steps, the Triton path, the optimizer classes, the kernels);
* the kernels (triton_kernels/, installed as klkern.triton_kernels) import from klkern only
  what has no optimizer in it (precision settings, error text, the backend probe);
* the linear algebra (klkern/linalg.py) reaches only the QR extension's loader, precision
  settings and error text.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "klkern"
KERNELS = ROOT / "triton_kernels"

FAST_PATH = {"_engine", "_plan", "_stacking", "_phases", "_steps", "_triton_path", "_write", "_refresh", "_optimizer",
             "_checkpoint", "optimizers", "_graph", "triton_kernels"}
KERNELS_MAY_IMPORT = {"_precision", "_errors", "_backend"}
LINALG_REACHES = {"_ext", "_errors", "_precision"}


def _targets(node: ast.AST, package: str) -> set:
    """klkern module names a top-level import statement names (package-relative)."""
    out = set()
    if isinstance(node, ast.ImportFrom):
        if node.level == 1 and package == "klkern":
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(alias.name for alias in node.names)
        elif node.level == 1 and package == "triton_kernels":
            pass  # the kernels among themselves
        elif node.module and node.module.startswith("klkern"):
            parts = node.module.split(".")
            if len(parts) > 1:
                out.add(parts[1])
            else:
                out.update(alias.name for alias in node.names)
    elif isinstance(node, ast.Import):
        for alias in node.names:
            parts = alias.name.split(".")
            if parts[0] == "klkern" and len(parts) > 1:
                out.add(parts[1])
    return out


def graph() -> dict:
    """{module: set of klkern modules it imports at top level} for klkern/*.py; the kernels as
    one node, "triton_kernels"."""
    edges: dict = {}
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text())
        edges[path.stem] = set().union(*(_targets(n, "klkern") for n in tree.body)) - {path.stem}
    edges["triton_kernels"] = set().union(*(_targets(n, "triton_kernels") for path in KERNELS.glob("*.py")
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


def test_the_graph_is_read():
    edges = graph()
    assert {"_optimizer", "reference", "linalg", "triton_kernels"} <= set(edges)
    assert "_checkpoint" in edges["_optimizer"] and "linalg" in edges["_functional"]


def test_no_import_cycle():
    edges = graph()
    cycles = sorted(m for m in edges if m in reach(edges, m) and m != "__init__")
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_the_reference_reaches_no_fast_path():
    assert not reach(graph(), "reference") & FAST_PATH, reach(graph(), "reference") & FAST_PATH


def test_the_kernels_import_no_optimizer():
    assert graph()["triton_kernels"] <= KERNELS_MAY_IMPORT, graph()["triton_kernels"]


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
    """What is specific to an algorithm is asked of its object (klkern/_algorithms.py), never
    decided by comparing its name; the reference keeps its own comparisons on purpose (its
    docstring: it must not share a mistake with the paths it checks)."""
    offenders = []
    for path in sorted([*PACKAGE.glob("*.py"), *KERNELS.glob("*.py")]):
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
    long = {str(p.relative_to(ROOT)): n for p in [*PACKAGE.glob("*.py"), *KERNELS.glob("*.py")]
            if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long
