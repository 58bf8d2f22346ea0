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

FAST_PATH = {"_engine", "_plan", "_steps", "_triton_path", "_optimizer", "_checkpoint", "optimizers", "_graph",
             "triton_kernels"}
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
