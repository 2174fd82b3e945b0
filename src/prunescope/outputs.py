"""Checks that an output path can be written, made before any work so a long run never fails at its end."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import PrunescopeError


def _nearest_existing(path: Path) -> Path:
    """``path`` itself or its closest ancestor that exists."""
    current = path.absolute()
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


def _check_folder_writable(folder: Path, what: str, path: Path) -> None:
    if not folder.is_dir():
        raise PrunescopeError(f"cannot write {what} {path}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PrunescopeError(f"cannot write {what} {path}: folder {folder} is not writable")


def check_output_file(path: str | os.PathLike, what: str = "output file") -> Path:
    """Refuse a file path that cannot be written: an existing folder, a file below a file, a read-only folder.

    Creates nothing; files are later written through a temporary file in the same folder.
    """
    path = Path(path)
    if path.is_dir():
        raise PrunescopeError(f"{what} {path} is a folder; give a file path")
    if path.exists():
        if not os.access(path, os.R_OK | os.W_OK):
            raise PrunescopeError(f"cannot write {what} {path}: the file is not writable")
        _check_folder_writable(path.absolute().parent, what, path)
        return path
    _check_folder_writable(_nearest_existing(path.parent), what, path)
    return path


def check_output_folder(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Refuse a folder path that cannot be written: an existing file, a folder below a file, a read-only folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise PrunescopeError(f"{what} {path} is a file; give a folder path (it is created if missing)")
    _check_folder_writable(_nearest_existing(path), what, path)
    return path
