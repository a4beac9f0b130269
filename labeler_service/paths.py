"""Paths from users, resolved inside a configured root and refused outside it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path, PurePosixPath


class PathOutsideRoot(ValueError):
    """A user-supplied path that is absolute, resolves (through ``..`` or symlinks) outside the
    root, or cannot be resolved at all (a symlink loop, a name too long)."""


def resolve_inside(root: Path, relative: str) -> Path:
    if not relative or PurePosixPath(relative).is_absolute() or "\x00" in relative:
        raise PathOutsideRoot(f"{relative!r}: must be a relative path inside the configured root")
    root = Path(root).resolve()
    try:
        path = (root / relative).resolve()  # follows symlinks: a link out of the root is caught
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop (Python < 3.13)
        # The reason only: the OS's message names the server path.
        reason = e.strerror if isinstance(e, OSError) and e.strerror else "a symlink loop"
        raise PathOutsideRoot(f"{relative!r} cannot be resolved: {reason}") from None
    if not path.is_relative_to(root):
        raise PathOutsideRoot(f"{relative!r} resolves outside the configured root")
    return path


def is_kind(path: Path, kind: str) -> bool:
    """``path.is_dir()``/``is_file()``, False where the OS cannot even look (name too long)."""
    try:
        return path.is_dir() if kind == "dir" else path.is_file()
    except OSError:
        return False


MAX_REASON_CHARS = 500  # a reason a client sees: one line, bounded


def public_reason(text: str, roots: Sequence[Path | str] = (),
                  store_location: str | None = None) -> str:
    """``text`` as a client may see it: paths under ``roots`` (the data and checkpoint roots)
    relative to them, the store's location as ``<store>``, one line, at most
    ``MAX_REASON_CHARS``. Clients see neither server path nor a multi-kilobyte traceback."""
    for root in roots:
        for form in {str(Path(root).resolve()), str(root)}:
            text = text.replace(form.rstrip("/") + "/", "")
    if store_location:
        text = text.replace(str(store_location).rstrip("/"), "<store>")
    text = " ".join(text.split())
    return text if len(text) <= MAX_REASON_CHARS else text[:MAX_REASON_CHARS - 1] + "…"
