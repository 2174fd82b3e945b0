"""A JSONL store of finished cells: appended as each cell finishes, read back to resume a scan.

One writer at a time: an open store holds an OS lock (``flock``) on its file until :meth:`CellStore.close`
(or the end of the process, however it ends: a killed scan leaves no stale lock).
"""

from __future__ import annotations

import json
import os
import tempfile
import weakref
from pathlib import Path

from .errors import PrunescopeError
from .jsonfile import decode_utf8, strict_json
from .outputs import check_output_file
from .profile import Cell

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock, one writer is then up to the user
    fcntl = None

HEADER_KEY = "prunescope_store"
STORE_VERSION = 1
_FRESH = "delete the file or pass another store path to start fresh"


def _holder_pid(fd: int) -> int | None:
    """The pid holding a flock on ``fd``'s file, from /proc/locks (Linux), or None."""
    stat = os.fstat(fd)
    key = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino} "
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if "->" not in line and len(fields) > 5 and fields[1] == "FLOCK" and f"{fields[5]} " == key:
            return int(fields[4]) if fields[4].isdigit() else None
    return None


def _lock(fd: int, path: Path) -> None:
    """Take the exclusive lock on ``fd`` now, or refuse naming the store and the holder's pid."""
    if fcntl is None:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _holder_pid(fd)
        holder = f" (pid {pid})" if pid is not None else ""
        raise PrunescopeError(f"store {path} is in use by another scan{holder}; one writer at a time: wait for it to "
                              "finish, or pass another store path") from None


def check_store_free(path: str | os.PathLike) -> Path:
    """Refuse a store path that cannot be written or that another scan holds; creates nothing."""
    path = check_output_file(path, "store")
    if path.exists():
        fd = os.open(path, os.O_RDONLY)
        try:
            _lock(fd, path)
        finally:
            os.close(fd)  # releases the probe's lock
    return path


class CellStore:
    """Append-only JSONL file whose first line records what the scan was run on.

    Opening a store written for a different model, data, metric, criterion, seed, levels or confidence is refused,
    and so is a store another scan holds open. A torn last line (a run killed mid-write) is dropped on open; any
    other line that is not a valid cell is refused with its line number. Use as a context manager or call
    :meth:`close` to release the lock.
    """

    def __init__(self, path: str | os.PathLike, fingerprint: dict) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.cells: dict[tuple[str, str], Cell] = {}
        check_output_file(self.path, "store")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = None
        self._finalizer = None
        existed = self.path.exists()
        for _ in range(10):  # the holder may replace the file between our open and lock: lock the file now at the path
            fd = self._open_locked()
            if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                break
            os.close(fd)
        else:
            raise PrunescopeError(f"store {self.path} keeps being replaced by another process; pass another store path")
        self._hold(fd)
        try:
            data = os.pread(fd, os.fstat(fd).st_size, 0)
            if data:
                self._read(data)
            else:
                os.write(fd, (json.dumps({HEADER_KEY: STORE_VERSION, "fingerprint": fingerprint}) + "\n").encode())
                os.fsync(fd)
        except BaseException:
            if not existed and os.fstat(fd).st_size == 0:
                self.path.unlink(missing_ok=True)
            self.close()
            raise

    def _open_locked(self) -> int:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
        except OSError as error:
            raise PrunescopeError(f"cannot open store {self.path}: {error.strerror or error}") from None
        try:
            _lock(fd, self.path)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _hold(self, fd: int) -> None:
        """Make ``fd`` (locked) the store's open file, closing (and unlocking) the previous one."""
        if self._finalizer is not None:
            self._finalizer()
        self._fd = fd
        self._finalizer = weakref.finalize(self, os.close, fd)

    def _read(self, data: bytes) -> None:
        text = decode_utf8(data, f"store {self.path}")
        lines = text.split("\n")
        try:
            header = json.loads(lines[0])
            stored = header["fingerprint"]
            version = header[HEADER_KEY]
            assert isinstance(stored, dict)
        except (ValueError, KeyError, TypeError, AssertionError):
            raise PrunescopeError(f"{self.path} is not a prunescope store; pass another store path") from None
        if version != STORE_VERSION:
            raise PrunescopeError(f"store {self.path} has format version {version!r}; this prunescope reads version "
                                  f"{STORE_VERSION}: {_FRESH}")
        different = [k for k in sorted(set(stored) | set(self.fingerprint)) if stored.get(k) != self.fingerprint.get(k)]
        if different:
            raise PrunescopeError(
                f"store {self.path} was written for a different {', '.join(different)}; refusing to mix results. "
                "Delete the file or pass another store path to start fresh"
            )
        good = [lines[0]]
        numbered = [(number, line) for number, line in enumerate(lines[1:], start=2) if line.strip()]
        for position, (number, line) in enumerate(numbered):
            try:
                item = json.loads(line)
            except ValueError:
                if position == len(numbered) - 1:
                    continue  # a torn last line from a killed run
                raise PrunescopeError(f"store {self.path} line {number} is not valid JSON; the store is damaged: {_FRESH}") from None
            try:
                cell = Cell.from_dict(item, f"store {self.path} line {number}")
            except PrunescopeError as error:
                raise PrunescopeError(f"{error}; {_FRESH}") from None
            self.cells[(cell.target, cell.level)] = cell
            good.append(line)
        if len(good) != 1 + len(numbered) or not text.endswith("\n"):
            self._rewrite("\n".join(good) + "\n")

    def _rewrite(self, text: str) -> None:
        """Replace the file atomically by ``text``, holding the lock on the new file before it becomes visible."""
        mode = os.fstat(self._fd).st_mode & 0o777
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            os.write(fd, text.encode())
            os.fsync(fd)
            os.chmod(tmp, mode)
            _lock(fd, self.path)
            os.replace(tmp, self.path)
        except BaseException:
            os.close(fd)
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        self._hold(fd)

    def get(self, target: str, level: str) -> Cell | None:
        return self.cells.get((target, level))

    def append(self, cell: Cell) -> None:
        """Append one finished cell (strict JSON: NaN as null) and flush it to disk before returning."""
        if self._fd is None:
            raise PrunescopeError(f"store {self.path} is closed; open a new CellStore to append")
        os.lseek(self._fd, 0, os.SEEK_END)
        os.write(self._fd, (strict_json(cell.to_dict()) + "\n").encode())
        os.fsync(self._fd)
        self.cells[(cell.target, cell.level)] = cell

    def close(self) -> None:
        """Release the lock and close the file; the cells read stay readable."""
        if self._finalizer is not None:
            self._finalizer()
        self._fd = None

    def __enter__(self) -> CellStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
