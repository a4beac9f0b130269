"""Paths from users, resolved inside a configured root and refused outside it."""

from __future__ import annotations

from pathlib import Path, PurePosixPath


class PathOutsideRoot(ValueError):
    """A user-supplied path that is absolute, or resolves (through ``..`` or symlinks) outside."""


def resolve_inside(root: Path, relative: str) -> Path:
    if not relative or PurePosixPath(relative).is_absolute() or "\x00" in relative:
        raise PathOutsideRoot(f"{relative!r}: must be a relative path inside the configured root")
    root = Path(root).resolve()
    path = (root / relative).resolve()  # follows symlinks, so a link out of the root is caught
    if not path.is_relative_to(root):
        raise PathOutsideRoot(f"{relative!r} resolves outside the configured root")
    return path
