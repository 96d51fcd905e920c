"""Filesystem helpers: atomic writes, content hashes, and :class:`IndexDir`, the place an index lives.

An :class:`IndexDir` is a local directory; :class:`ObjectStoreDir` is an object-store prefix
(``s3://bucket/prefix``, through fsspec/s3fs); :func:`index_dir` picks one by the URL scheme.
Every reader and writer of an index goes through them, so the index format does not care where
the bytes are.

Object stores differ from a local disk in three ways that the index job relies on, and the
object-store implementation answers each:

* **no atomic rename**: a directory that must appear whole (the store's skeleton) is built in
  place and *committed* by a marker object written after everything else
  (:meth:`IndexDir.stage_dir` / :meth:`IndexDir.commit_dir` / :meth:`IndexDir.is_committed`;
  locally: built beside its name and renamed into place, as before);
* **PUTs are atomic**: an object is there whole or not at all, so a chunk is never half written
  and a unit's done flag, written after its chunks, can be trusted;
* **free space is unknown**: :meth:`IndexDir.free_bytes` is None and the preflight check skips.

Credentials come from the usual ``AWS_*`` environment variables (or botocore's other sources),
``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) names a non-AWS endpoint. Every failure of the
object store is raised as one :class:`StorageError` line that names the object and the cause
(access denied, missing bucket, network).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import zarr.storage
from zarr.storage import WrapperStore


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


class StorageError(OSError):
    """Reading or writing the index's storage failed; the message names the file and the cause."""

    def __str__(self) -> str:
        return str(self.strerror) if self.strerror else super().__str__()


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


COMMIT_SUFFIX = ".committed"  # object stores: the marker that commits a directory built in place


class IndexDir:
    """The local directory holding one index; paths are relative to it (see :class:`ObjectStoreDir`)."""

    def __init__(self, location: str | Path):
        self.url = str(location)
        self.path = Path(location)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    def __str__(self) -> str:
        return self.url

    @property
    def is_local(self) -> bool:
        return True

    @property
    def location(self) -> Path | str:
        """What names this index for :func:`index_dir` (a local path, or the URL)."""
        return self.path

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

    def read_tails(self, rels: list[str], n: int) -> list[bytes]:
        """The last ``n`` bytes of each file (all of a shorter one)."""
        out = []
        for rel in rels:
            p = self.path / rel
            try:
                with open(p, "rb") as f:
                    size = f.seek(0, os.SEEK_END)
                    f.seek(max(0, size - n))
                    out.append(f.read())
            except FileNotFoundError:
                raise FileNotFoundError(f"{p}: file not found") from None
            except OSError as e:
                raise _storage_error(p, "read", e) from None
        return out

    def write_bytes(self, rel: str, data: bytes) -> None:
        atomic_write_bytes(self.path / rel, data)

    def sha256(self, rel: str) -> str:
        return sha256_file(self.path / rel)

    def size(self, rel: str) -> int:
        return (self.path / rel).stat().st_size

    def listdir(self, rel: str = "") -> list[str]:
        p = self.path / rel
        return sorted(os.listdir(p)) if p.is_dir() else []

    def file_sizes(self, rel: str = "") -> dict[str, int]:
        """Every file under ``rel`` (paths relative to the index) with its size, from one listing."""
        base = self.path / rel
        out = {}
        for root, _, files in os.walk(base):
            for f in files:
                p = Path(root) / f
                out[str(p.relative_to(self.path))] = p.stat().st_size
        return out

    def walk_files(self, rel: str = "") -> list[str]:
        """Every file under ``rel``, as paths relative to the index."""
        return sorted(self.file_sizes(rel))

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

    # ------------------------------------------------------------------ directories that appear whole
    def stage_dir(self, rel: str) -> str:
        """Where to build the directory ``rel`` so that it appears whole once :meth:`commit_dir` is called.

        Locally: beside its name (``rel.partial``, emptied first), renamed into place by the commit.
        """
        building = f"{rel}.partial"
        self.remove(building)
        return building

    def commit_dir(self, building: str, rel: str) -> None:
        self.remove(rel)
        self.rename(building, rel)

    def is_committed(self, rel: str) -> bool:
        """Whether the directory ``rel`` (holding a ``zarr.json``) was committed whole."""
        return self.is_file(f"{rel}/zarr.json")

    # ------------------------------------------------------------------ zarr
    def zarr_store(self, rel: str, read_only: bool) -> Any:
        return zarr.storage.LocalStore(str(self.path / rel), read_only=read_only)


# ---------------------------------------------------------------------------------- object storage
T = TypeVar("T")
OBJECT_SCHEMES = ("s3", "s3a")


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_storage_options() -> dict[str, Any]:
    """fsspec/s3fs options from the environment (credentials, endpoint) with bounded timeouts and retries.

    The credentials are passed explicitly when the environment has them, so that a changed
    environment never reuses a cached filesystem with the old ones.
    """
    opts: dict[str, Any] = {
        "use_listings_cache": False,  # other processes write the same prefix: never trust a stale listing
        "config_kwargs": {
            "connect_timeout": float(os.environ.get("PROPONENT_S3_CONNECT_TIMEOUT", 10)),
            "read_timeout": float(os.environ.get("PROPONENT_S3_READ_TIMEOUT", 60)),
            "retries": {"max_attempts": int(os.environ.get("PROPONENT_S3_ATTEMPTS", 3)), "mode": "standard"},
        },
    }
    if _endpoint():
        opts["endpoint_url"] = _endpoint()
    for env, key in (("AWS_ACCESS_KEY_ID", "key"), ("AWS_SECRET_ACCESS_KEY", "secret"), ("AWS_SESSION_TOKEN", "token")):
        if os.environ.get(env):
            opts[key] = os.environ[env]
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        opts.setdefault("client_kwargs", {})["region_name"] = region
    return opts


def translate_storage_error(e: BaseException, where: str, action: str) -> BaseException:
    """One clear line for a failure of the object store; a missing key stays a FileNotFoundError."""
    if isinstance(e, StorageError):
        return e
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    low = f"{type(e).__name__} {text}".lower()
    if "nosuchbucket" in low or "bucket does not exist" in low:
        return StorageError(errno.ENOENT, f"{where}: cannot {action}: the bucket does not exist (create it first)")
    if isinstance(e, FileNotFoundError):
        return FileNotFoundError(f"{where}: file not found")
    if isinstance(e, PermissionError) or any(
        w in low
        for w in ("accessdenied", "access denied", "invalidaccesskeyid", "signaturedoesnotmatch", "forbidden", "403")
    ):
        return StorageError(
            errno.EACCES,
            f"{where}: cannot {action}: access denied ({text}); check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
            "(and AWS_SESSION_TOKEN)",
        )
    network = (
        "connect",
        "connection",
        "endpoint",
        "timeout",
        "timed out",
        "reset by peer",
        "broken pipe",
        "incompleteread",
        "server disconnected",
        "payload",
    )
    if any(w in low for w in network) or isinstance(e, (ConnectionError, TimeoutError)):
        return StorageError(
            errno.EIO, f"{where}: cannot {action}: network error talking to the object store ({text}); run again"
        )
    if isinstance(e, OSError):
        return StorageError(e.errno or errno.EIO, f"{where}: cannot {action}: {text}")
    return StorageError(errno.EIO, f"{where}: cannot {action}: {type(e).__name__}: {text}")


class ObjectStoreDir(IndexDir):
    """An index under an object-store prefix (``s3://bucket/prefix``), through fsspec (s3fs).

    Same interface as the local :class:`IndexDir` (see the module docstring for what differs).
    Every object-store error is raised as one :class:`StorageError` line (a missing key as
    :class:`FileNotFoundError`).
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        parts = urlsplit(str(url))
        if parts.scheme not in OBJECT_SCHEMES or not parts.netloc:
            raise ValueError(f"{url}: expected s3://BUCKET[/PREFIX]")
        self.scheme = parts.scheme
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        self.root = f"{self.bucket}/{self.prefix}" if self.prefix else self.bucket
        self.url = f"s3://{self.root}"
        self.options = storage_options if storage_options is not None else s3_storage_options()
        self._fs: Any = None
        self._bucket_checked = False

    @property
    def is_local(self) -> bool:
        return False

    @property
    def location(self) -> Path | str:
        return self.url

    def local_path(self, rel: str = "") -> Path:
        raise StorageError(errno.EINVAL, f"{self.url}: an object-store index has no local path")

    def describe(self, rel: str) -> str:
        return f"{self.url}/{rel}" if rel else self.url

    def key(self, rel: str) -> str:
        return f"{self.root}/{rel}".rstrip("/") if rel else self.root

    @property
    def fs(self) -> Any:
        if self._fs is None:
            import s3fs  # lazy: s3fs only for s3:// indexes

            self._fs = s3fs.S3FileSystem(**self.options)
        return self._fs

    def _call(self, rel: str, action: str, fn: Callable[[], T]) -> T:
        if not self._bucket_checked:
            self._check_bucket()
        try:
            return fn()
        except Exception as e:
            raise translate_storage_error(e, self.describe(rel), action) from None

    def _check_bucket(self) -> None:
        """Fail first with the real cause: a missing bucket, bad credentials, an unreachable endpoint."""
        try:
            self.fs.call_s3("head_bucket", Bucket=self.bucket)
        except FileNotFoundError:
            raise StorageError(
                errno.ENOENT, f"s3://{self.bucket}: the bucket does not exist (create it first, or check the URL)"
            ) from None
        except Exception as e:
            err = translate_storage_error(e, f"s3://{self.bucket}", "access the bucket")
            if getattr(err, "errno", None) != errno.EACCES:
                raise err from None
            # access denied to the bucket itself: the credentials may be scoped to the prefix, so the
            # requests that follow decide (bad credentials are refused there with the same message)
        self._bucket_checked = True

    def _info(self, rel: str) -> dict[str, Any] | None:
        def info() -> dict[str, Any] | None:
            try:
                return dict(self.fs.info(self.key(rel)))
            except FileNotFoundError as e:
                if "bucket does not exist" in str(e).lower():
                    raise
                return None

        return self._call(rel, "look up", info)

    # ------------------------------------------------------------------ bytes
    def exists(self, rel: str) -> bool:
        return self._info(rel) is not None

    def is_file(self, rel: str) -> bool:
        info = self._info(rel)
        return info is not None and info.get("type") == "file"

    def read_bytes(self, rel: str) -> bytes:
        return self._call(rel, "read", lambda: bytes(self.fs.cat_file(self.key(rel))))

    def read_tails(self, rels: list[str], n: int) -> list[bytes]:
        """The last ``n`` bytes of each object: suffix-range GETs, issued concurrently."""
        if not rels:
            return []
        keys = [self.key(r) for r in rels]
        got = self._call(
            rels[0], "read", lambda: self.fs.cat_ranges(keys, [-n] * len(keys), [None] * len(keys), on_error="return")
        )
        for rel, g in zip(rels, got, strict=True):
            if isinstance(g, BaseException):
                raise translate_storage_error(g, self.describe(rel), "read") from None
        return [bytes(g) for g in got]

    def write_bytes(self, rel: str, data: bytes) -> None:
        """One PUT: readers see the old object or the new one, never a part."""
        self._call(rel, "write", lambda: self.fs.pipe_file(self.key(rel), data))

    def sha256(self, rel: str) -> str:
        return sha256_bytes(self.read_bytes(rel))

    def size(self, rel: str) -> int:
        info = self._info(rel)
        if info is None:
            raise FileNotFoundError(f"{self.describe(rel)}: file not found")
        return int(info.get("size", 0))

    def listdir(self, rel: str = "") -> list[str]:
        def ls() -> list[str]:
            try:
                names = self.fs.ls(self.key(rel), detail=False)
            except FileNotFoundError as e:
                if "bucket does not exist" in str(e).lower():
                    raise
                return []
            return sorted(str(n).rstrip("/").rsplit("/", 1)[-1] for n in names)

        return self._call(rel, "list", ls)

    def file_sizes(self, rel: str = "") -> dict[str, int]:
        base = self.root + "/"

        def find() -> dict[str, int]:
            found = self.fs.find(self.key(rel), detail=True)
            return {
                str(k)[len(base) :]: int(v.get("size", 0))
                for k, v in found.items()
                if str(k).startswith(base) and v.get("type") == "file"
            }

        return self._call(rel, "list", find)

    def remove(self, rel: str) -> None:
        def rm() -> None:
            keys = set(self.fs.find(self.key(rel)))  # everything under the prefix (or the object itself)
            if rel and self.is_file(rel):
                keys.add(self.key(rel))
            if keys:
                self.fs.rm(sorted(keys))

        self._call(rel, "delete", rm)

    def rename(self, src: str, dst: str) -> None:
        raise StorageError(errno.ENOTSUP, f"{self.url}: object stores have no atomic rename ({src} -> {dst})")

    def makedirs(self, rel: str = "") -> None:
        """Nothing to do: prefixes exist as soon as an object is under them (checks the bucket)."""
        self._call(rel, "access", lambda: None)

    def is_empty(self) -> bool:
        return not self.listdir("")

    def free_bytes(self) -> int | None:
        return None

    # ------------------------------------------------------------------ directories that appear whole
    def stage_dir(self, rel: str) -> str:
        """Built in place: the commit marker (``rel.committed``) is removed first and written last."""
        self.remove(rel + COMMIT_SUFFIX)
        self.remove(rel)
        return rel

    def commit_dir(self, building: str, rel: str) -> None:
        assert building == rel
        self.write_bytes(rel + COMMIT_SUFFIX, json.dumps({"committed": rel}).encode() + b"\n")

    def is_committed(self, rel: str) -> bool:
        return self.is_file(rel + COMMIT_SUFFIX) and self.is_file(f"{rel}/zarr.json")

    # ------------------------------------------------------------------ zarr
    def zarr_store(self, rel: str, read_only: bool) -> Any:
        self._call(rel, "open", lambda: None)  # the bucket check, before zarr's first request
        store = zarr.storage.FsspecStore.from_url(
            f"s3://{self.key(rel)}", storage_options=self.options, read_only=read_only
        )
        return TranslatingStore(store, self.describe(rel))


class TranslatingStore(WrapperStore[Any]):
    """A zarr store wrapper that raises every object-store failure as one :class:`StorageError` line."""

    def __init__(self, store: Any, where: str = "") -> None:
        super().__init__(store)
        self.where = where

    def _with_store(self, store: Any) -> Any:
        return type(self)(store, self.where)

    def _err(self, e: BaseException, key: str, action: str) -> BaseException:
        return translate_storage_error(e, f"{self.where}/{key}", action)

    async def get(self, key: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().get(key, *args, **kwargs)
        except Exception as e:
            raise self._err(e, key, "read") from None

    async def get_partial_values(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().get_partial_values(*args, **kwargs)
        except Exception as e:
            raise self._err(e, "", "read") from None

    async def exists(self, key: str) -> bool:
        try:
            return await super().exists(key)
        except Exception as e:
            raise self._err(e, key, "look up") from None

    async def set(self, key: str, value: Any) -> None:
        try:
            await super().set(key, value)
        except Exception as e:
            raise self._err(e, key, "write") from None

    async def set_if_not_exists(self, key: str, value: Any) -> None:
        try:
            await super().set_if_not_exists(key, value)
        except Exception as e:
            raise self._err(e, key, "write") from None

    async def delete(self, key: str) -> None:
        try:
            await super().delete(key)
        except Exception as e:
            raise self._err(e, key, "delete") from None

    async def delete_dir(self, prefix: str) -> None:
        try:
            await super().delete_dir(prefix)
        except Exception as e:
            raise self._err(e, prefix, "delete") from None

    async def is_empty(self, prefix: str) -> bool:
        try:
            return await super().is_empty(prefix)
        except Exception as e:
            raise self._err(e, prefix, "list") from None

    async def _listing(self, it: AsyncIterator[str], prefix: str) -> AsyncIterator[str]:
        try:
            async for k in it:
                yield k
        except Exception as e:
            raise self._err(e, prefix, "list") from None

    def list(self) -> AsyncIterator[str]:
        return self._listing(super().list(), "")

    def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        return self._listing(super().list_prefix(prefix), prefix)

    def list_dir(self, prefix: str) -> AsyncIterator[str]:
        return self._listing(super().list_dir(prefix), prefix)


def is_object_url(location: str | Path) -> bool:
    return isinstance(location, str) and location.split("://", 1)[0].lower() in OBJECT_SCHEMES and "://" in location


def index_dir(location: str | Path | IndexDir) -> IndexDir:
    """The :class:`IndexDir` for ``location``: an existing one, ``s3://...`` (object store) or a local path."""
    if isinstance(location, IndexDir):
        return location
    if is_object_url(location):
        return ObjectStoreDir(str(location))
    if isinstance(location, str) and "://" in location:
        scheme = location.split("://", 1)[0]
        raise ValueError(f"{location}: unsupported storage scheme {scheme!r} (a local path or s3://BUCKET/PREFIX)")
    return IndexDir(location)
