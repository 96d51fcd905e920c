"""Filesystem helpers: atomic writes, content hashes, and :class:`IndexDir`, the place an index lives.

An :class:`IndexDir` is a local directory today and an object-store prefix (``s3://bucket/prefix``)
through fsspec; every reader and writer of an index goes through it, so the index format does
not care where the bytes are.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


class StorageError(OSError):
    """Reading or writing the index's storage failed; the message names the file and the cause."""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), _FILE_MODE)  # mkstemp makes 0600: give the umask's usual mode instead
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise _storage_error(path, "write", e) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _storage_error(where: Any, action: str, e: OSError) -> StorageError:
    if e.errno == errno.ENOSPC:
        return StorageError(e.errno, f"{where}: disk full while trying to {action} (free space, then run again)")
    return StorageError(e.errno or 0, f"{where}: cannot {action}: {e.strerror or e}")


class IndexDir:
    """The directory (or object-store prefix) holding one index; paths are relative to it."""

    def __init__(self, location: str | Path):
        self.url = str(location)
        self.path = Path(location)

    def __repr__(self) -> str:
        return f"IndexDir({self.url!r})"

    def __str__(self) -> str:
        return self.url

    @property
    def is_local(self) -> bool:
        return True

    def local_path(self, rel: str = "") -> Path:
        return self.path / rel if rel else self.path

    def describe(self, rel: str) -> str:
        """How a message names a file of the index."""
        return str(self.path / rel)

    # ------------------------------------------------------------------ bytes
    def exists(self, rel: str) -> bool:
        return (self.path / rel).exists()

    def is_file(self, rel: str) -> bool:
        return (self.path / rel).is_file()

    def read_bytes(self, rel: str) -> bytes:
        p = self.path / rel
        try:
            return p.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"{p}: file not found") from None
        except OSError as e:
            raise _storage_error(p, "read", e) from None

    def write_bytes(self, rel: str, data: bytes) -> None:
        atomic_write_bytes(self.path / rel, data)

    def sha256(self, rel: str) -> str:
        return sha256_file(self.path / rel)

    def size(self, rel: str) -> int:
        return (self.path / rel).stat().st_size

    def listdir(self, rel: str = "") -> list[str]:
        p = self.path / rel
        return sorted(os.listdir(p)) if p.is_dir() else []

    def walk_files(self, rel: str = "") -> list[str]:
        """Every file under ``rel``, as paths relative to the index."""
        base = self.path / rel
        out = []
        for root, _, files in os.walk(base):
            for f in files:
                out.append(str((Path(root) / f).relative_to(self.path)))
        return sorted(out)

    def remove(self, rel: str) -> None:
        p = self.path / rel
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()

    def rename(self, src: str, dst: str) -> None:
        os.replace(self.path / src, self.path / dst)

    def makedirs(self, rel: str = "") -> None:
        (self.path / rel).mkdir(parents=True, exist_ok=True)

    def is_empty(self) -> bool:
        return not self.path.exists() or not any(self.path.iterdir())

    def free_bytes(self) -> int | None:
        """Free space where the index is written (None when unknown, e.g. object storage)."""
        p = self.path
        while not p.exists():
            p = p.parent
        return shutil.disk_usage(p).free

    # ------------------------------------------------------------------ zarr
    def zarr_store(self, rel: str, read_only: bool) -> Any:
        import zarr.storage

        return zarr.storage.LocalStore(str(self.path / rel), read_only=read_only)


def index_dir(location: str | Path | IndexDir) -> IndexDir:
    """An :class:`IndexDir` for a local path (or an existing IndexDir)."""
    if isinstance(location, IndexDir):
        return location
    return IndexDir(location)
