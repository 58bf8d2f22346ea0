"""README.md and docs/: every relative link resolves, every block marked runnable runs, and the
options table is the docstrings' (docs/generate_options.py --check).

A code block is runnable when the line before its opening fence is ``<!-- runnable -->``; it
runs in a fresh Python process from the repository root, on the CPU, within 120 s.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code is not links
    return [m.group(1) for m in LINK.finditer(text)]


def _anchor(title: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in _links(page):
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        where = (page.parent / path).resolve() if path else page
        if not where.exists():
            broken.append(target)
        elif anchor and where.suffix == ".md":
            anchors = {_anchor(line.lstrip("#")) for line in where.read_text().splitlines() if line.startswith("#")}
            if anchor not in anchors:
                broken.append(target)
    assert not broken, f"{page.name}: broken links {broken}"


def _runnable_blocks():
    for page in PAGES:
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.strip() == "<!-- runnable -->":
                fence = lines[i + 1]
                assert fence.startswith("```"), f"{page.name}:{i + 2}: a runnable marker must precede a fence"
                end = next(j for j in range(i + 2, len(lines)) if lines[j].startswith("```"))
                yield pytest.param(fence[3:].strip(), "\n".join(lines[i + 2:end]),
                                   id=f"{page.relative_to(ROOT)}:{i + 2}")


@pytest.mark.parametrize("language, code", list(_runnable_blocks()))
def test_runnable_blocks_run(language, code, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if language == "python":
        done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)},
                              capture_output=True, text=True, timeout=120)
    else:
        pytest.fail(f"runnable blocks are python; got {language!r}")
    assert done.returncode == 0, done.stdout + done.stderr


def test_there_are_runnable_blocks():
    assert len(list(_runnable_blocks())) >= 2


def test_the_spec_in_docs_is_the_projects():
    """docs/spec.md is the specification; the maintainers keep it a copy of the one their
    workspace shares between projects, and this checks the copy there (elsewhere it skips)."""
    original = ROOT.parent / "shared" / "SPEC.md"
    if not original.is_file():
        pytest.skip("maintainers' check: docs/spec.md is the specification; no workspace copy here to compare")
    assert (ROOT / "docs" / "spec.md").read_text() == original.read_text()


def test_options_table_matches_the_docstrings():
    done = subprocess.run([sys.executable, "docs/generate_options.py", "--check"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_options_check_catches_drift(monkeypatch):
    """The check can fail: a default changed in the code but not in the docstring is reported."""
    sys.path.insert(0, str(ROOT / "docs"))
    import generate_options

    from klkern.algorithms import _options

    monkeypatch.setitem(_options.DEFAULTS, "soap", dict(_options.DEFAULTS["soap"], eps=1e-6))
    _, problems = generate_options.options()
    assert any("'eps' documented default 1e-08, the code uses 1e-06" in p for p in problems), problems


# Files of the maintainers' workspace that the repository does not ship: code and docs must name
# the repository's own copies (docs/spec.md) or say what they mean instead.
OUTSIDE = re.compile(r"\b(SPEC\.md|STYLE\.md|PLATFORM\.md)|\.\./shared/|\bpapers/")


def test_comments_and_docs_name_files_of_the_repository():
    sources = [p for d in ("klkern", "triton_kernels", "bench", "csrc", "examples", "docs", "tests")
               for p in (ROOT / d).rglob("*") if p.suffix in {".py", ".md", ".cu", ".cpp", ".h", ".sh"}]
    sources += [ROOT / "README.md", ROOT / "setup.py", ROOT / "pyproject.toml"]
    allowed = {ROOT / "docs" / "spec.md",  # the verbatim specification (test above)
               Path(__file__).resolve()}  # this check and the maintainers' comparison above
    found = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in sources if p not in allowed
             and "results" not in p.relative_to(ROOT).parts
             for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if OUTSIDE.search(line)]
    assert not found, "\n".join(found)
