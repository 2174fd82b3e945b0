"""Write an export folder all at once: files go into a hidden sibling folder, which is checked and
then moved into place, so a refused or failed save leaves the target as it was."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..atomic import write_text_atomic
from ..errors import PrunescopeError

MANIFEST = "prunescope_export.json"
MODEL_FILES = (
    "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors",
    "prunescope.json", "prunescope_channels.json", "model.onnx", "model.onnx.data", MANIFEST,
)
"""Names of model files any format writes: a new save into a folder removes the stale ones, so a
folder never mixes two saves (say, an old prunescope.json beside new hf weights)."""


def check_target(folder: str | os.PathLike) -> Path:
    """``folder`` as an absolute path, refused when it names an existing file."""
    path = Path(folder).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise PrunescopeError(f"{path} is an existing file; give a folder path (created if missing)")
    return path


@contextmanager
def staging(target: Path) -> Iterator[Path]:
    """A fresh hidden folder beside ``target``; removed afterwards unless :func:`publish` moved it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _stale(name: str, old_files: set[str]) -> bool:
    return name in old_files or any(fnmatch.fnmatch(name, pattern) for pattern in MODEL_FILES)


def publish(tmp: Path, target: Path, manifest: dict) -> list[str]:
    """Move the files of ``tmp`` into ``target`` and write the manifest last; returns their names.

    A missing or empty ``target`` is replaced by ``tmp`` in one rename. Into a folder with other
    files (the CLI's plan.json, summary.json) each file is replaced atomically; stale model files
    of an earlier save are removed first, other files are left alone.
    """
    files = sorted(p.name for p in tmp.iterdir())
    manifest = {**manifest, "files": files}
    write_text_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    if not target.exists() or not any(target.iterdir()):
        if target.exists():
            target.rmdir()
        os.replace(tmp, target)
        return files
    old_files = set(read_manifest(target).get("files", [])) if (target / MANIFEST).exists() else set()
    for item in target.iterdir():
        if item.is_file() and _stale(item.name, old_files) and not (tmp / item.name).exists():
            item.unlink()
    for name in files:
        os.replace(tmp / name, target / name)
    os.replace(tmp / MANIFEST, target / MANIFEST)
    return files


def read_manifest(folder: str | os.PathLike) -> dict:
    """What :func:`prunescope.save` wrote into ``folder``: format, files, notes, check."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise PrunescopeError(f"{folder} has no {MANIFEST}; it was not written by prunescope.save")
    return json.loads(path.read_text())
