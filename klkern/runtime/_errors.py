"""How klkern reports an exception it caught (a kernel that failed to compile or launch, an
extension that failed to build): the whole cause, not the first line of the message.

Triton's ``CompilationError`` starts with a source excerpt and a caret line and gives the
reason (e.g. "K >= 16") last or in a chained exception; a failed ``cpp_extension`` build
gives the compiler's error in the middle of a long log. :func:`describe` keeps the whole
chain; :func:`summary` is the one line a warning or a table row shows.
"""

from __future__ import annotations

_NOISE = set("^~ |")


def describe(err: BaseException, limit: int = 6000) -> str:
    """``Type: message`` of ``err`` and of each exception it was raised from, whole."""
    parts, seen = [], set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current).strip()
        parts.append(f"{type(current).__name__}: {text}" if text else type(current).__name__)
        current = current.__cause__ or current.__context__
    return "\n-- caused by --\n".join(parts)[:limit]


def summary(err: BaseException | str, limit: int = 300) -> str:
    """One line: the exception's type and the lines of its chain that say what went wrong
    (error lines of a build log, else the last lines that are not source carets)."""
    text = err if isinstance(err, str) else describe(err)
    first = text.split(":", 1)[0] if not isinstance(err, str) else ""
    lines = [ln.strip() for ln in text.splitlines()
             if ln.strip() and set(ln.strip()) - _NOISE and not ln.startswith("-- caused by")]
    errors = [ln for ln in lines if "error" in ln.lower() and ln != text.splitlines()[0].strip()]
    keep = errors[-2:] if errors else lines[-2:]
    body = " | ".join(dict.fromkeys(keep))
    if first and not body.startswith(first):
        body = f"{first}: {body}"
    return body[:limit] if body else text[:limit]
