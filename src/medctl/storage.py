"""Files under a local folder or an S3-compatible bucket, through fsspec/s3fs.

- The endpoint comes from ``data.source.endpoint_url`` or the ``S3_ENDPOINT_URL`` environment variable
  (Backblaze B2, MinIO, AWS); empty means AWS itself.
- Credentials come from the usual AWS variables or profile through botocore. They are never passed
  around, printed, logged or written anywhere; error messages are scrubbed of them as a last guard.
- Transient failures (connection drops, timeouts, 5xx, throttling) are retried by botocore itself
  (its ``standard`` retry mode: exponential backoff with jitter, ``data.source.retries`` retries per
  request); "access denied" and "not found" are not, since a retry cannot fix them. What outlives the
  retries is put in plain words here (:func:`describe_storage_error`, :func:`unavailable`).
- A root is listed ONCE per run (:func:`list_files`); ids are matched against that listing.
- Remote files are downloaded into ``data.download_dir`` under a name keyed by URL + ETag + size, so a
  rerun never downloads an unchanged object again.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import fsspec

from medctl.errors import DataError, StorageUnavailable, redact_url_credentials
from medctl.io import atomic_write

REMOTE_PROTOCOLS = ("s3://", "s3a://")
SECRET_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60
COPY_CHUNK = 8 * 2**20  # bytes per read of a download


# ------------------------------------------------------------------------------------------ urls
def is_remote(url: str) -> bool:
    return url.startswith(REMOTE_PROTOCOLS)


def join_url(root: str, key: str) -> str:
    """``root`` + relative ``key`` ("s3://b/p/" + "x/y.dcm" -> "s3://b/p/x/y.dcm")."""
    if not root:
        return key
    return root.rstrip("/") + "/" + key.lstrip("/")


def strip_protocol(url: str) -> str:
    for protocol in REMOTE_PROTOCOLS:
        if url.startswith(protocol):
            return url[len(protocol) :]
    return str(Path(url).expanduser().absolute())


def endpoint_for(endpoint_url: str = "") -> str:
    """The S3 endpoint: the config value, else ``S3_ENDPOINT_URL``, else "" (AWS's own)."""
    return endpoint_url or os.environ.get("S3_ENDPOINT_URL", "")


# ------------------------------------------------------------------------------------ credentials
def credentials_source() -> str | None:
    """Where botocore finds credentials ("env", "shared-credentials-file", ...), or None; never values."""
    import botocore.session

    credentials = botocore.session.Session().get_credentials()
    if credentials is None or not credentials.access_key:
        return None
    return getattr(credentials, "method", None) or "found"


def redact_secrets(text: str) -> str:
    """Replace any credential value from the environment that appears in ``text`` with ``***``: the AWS
    variables, and the user and password of a URL (``S3_ENDPOINT_URL=http://user:pass@host``), written
    inside a URL or on their own."""
    values = [os.environ.get(name, "") for name in SECRET_VARIABLES]
    endpoint = urlsplit(os.environ.get("S3_ENDPOINT_URL", ""))
    values += [unquote(endpoint.password or "")]
    for value in values:
        if len(value) >= 4:
            text = text.replace(value, "***")
    return redact_url_credentials(text)


def _credential_marker() -> str:
    """A digest of the credential variables, so a changed key gets a fresh client (never the keys)."""
    names = (*SECRET_VARIABLES, "AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_REGION")
    joined = "\0".join(os.environ.get(name, "") for name in names)
    return hashlib.sha256(joined.encode()).hexdigest()


# ------------------------------------------------------------------------------------ filesystems
def filesystem(url: str, endpoint_url: str = "", *, retries: int = 3) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem for ``url``: local, or s3fs at the resolved endpoint (one per process)
    whose botocore client retries each transient failure ``retries`` times (``data.source.retries``)."""
    if not is_remote(url):
        return fsspec.filesystem("file")
    return _s3_filesystem(endpoint_for(endpoint_url), _credential_marker(), retries)


@functools.lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str, _credentials: str, retries: int) -> fsspec.AbstractFileSystem:
    import s3fs

    fs = s3fs.S3FileSystem(
        endpoint_url=endpoint or None,
        skip_instance_cache=True,
        config_kwargs={
            "connect_timeout": CONNECT_TIMEOUT_S,
            "read_timeout": READ_TIMEOUT_S,
            # botocore's own policy: 5xx, throttling, timeouts and refused connections, with backoff
            "retries": {"mode": "standard", "total_max_attempts": retries + 1},
        },
    )
    fs.retries = 1  # s3fs's own loop on top would multiply the attempts: botocore's is the one policy
    return fs


# ---------------------------------------------------------------------------------------- retries
def is_transient(exc: BaseException) -> bool:
    """True for failures a retry may fix (network, timeouts, 5xx, throttling); never 403/404. Raised
    here only once botocore's retries are spent: an outage (exit 1), not bad data."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    try:
        import botocore.exceptions as bexc

        if isinstance(exc, (bexc.ConnectionError, bexc.HTTPClientError)):
            return True
        if isinstance(exc, bexc.ClientError):
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            code = exc.response.get("Error", {}).get("Code", "")
            return status >= 500 or code in {"SlowDown", "Throttling", "RequestTimeout"}
    except ImportError:  # s3fs (and so botocore) is a dependency; keep local use working regardless
        pass
    try:
        import aiohttp

        if isinstance(exc, aiohttp.ClientError):
            return True
    except ImportError:
        pass
    # s3fs maps unknown S3 errors (InternalError, ServiceUnavailable) to a bare OSError
    return type(exc) is OSError


def describe_storage_error(exc: BaseException, url: str, endpoint_url: str = "") -> str:
    """The failure in plain words: unreachable endpoint, access denied, not found, or the error."""
    try:
        import botocore.exceptions as bexc

        if isinstance(exc, bexc.EndpointConnectionError):
            endpoint = endpoint_for(endpoint_url) or "AWS"
            return (
                f"cannot reach the S3 endpoint {endpoint}: check S3_ENDPOINT_URL or data.source.endpoint_url"
            )
        if isinstance(exc, bexc.NoCredentialsError):
            return "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
    except ImportError:
        pass
    if isinstance(exc, PermissionError):
        return redact_secrets(f"access denied to {url} ({exc}): check the credentials and the bucket policy")
    if isinstance(exc, FileNotFoundError):
        return f"{url} does not exist ({exc}): check the bucket name and path"
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return f"network failure reading {url}: {exc}"
    return redact_secrets(f"{url}: {type(exc).__name__}: {exc}")


def unavailable(exc: BaseException, endpoint_url: str = "", message: str = "") -> StorageUnavailable:
    """A transient failure that outlived the retries, as StorageUnavailable(endpoint, reason)."""
    endpoint = endpoint_for(endpoint_url) or "AWS S3"
    reason = redact_secrets(f"{type(exc).__name__}: {exc}".replace("\n", " "))
    return StorageUnavailable(endpoint, reason, message)


# ---------------------------------------------------------------------------------------- listing
@dataclass(frozen=True)
class FileInfo:
    key: str  # path relative to the listed root, "/"-separated
    url: str  # full URL or absolute local path
    size: int
    fingerprint: str  # size + mtime (local) or ETag (S3): changes when the content does


@dataclass
class Listing:
    """Every file under ``root``, listed once; ``keys`` sorted for prefix look-ups."""

    root: str
    files: dict[str, FileInfo]
    keys: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.keys = sorted(self.files)

    def with_prefix(self, prefix: str) -> Iterable[str]:
        """Keys starting with ``prefix``, in sorted order (a bisect, not a scan)."""
        start = bisect.bisect_left(self.keys, prefix)
        for key in self.keys[start:]:
            if not key.startswith(prefix):
                break
            yield key


def list_files(root: str, *, endpoint_url: str = "", retries: int = 3, prefix: str = "") -> Listing:
    """List every file under ``root`` (optionally only under ``root/prefix``) once, with fingerprints.

    Raises DataError in plain words when the root cannot be listed or holds no file.
    """
    if not root:
        raise DataError("data.source.root is empty: set it to a local folder or s3://bucket/prefix/")
    fs = filesystem(root, endpoint_url, retries=retries)
    base = strip_protocol(root).rstrip("/")
    target = f"{base}/{prefix}".rstrip("/") if prefix else base
    if not is_remote(root) and not Path(base).is_dir():
        raise DataError(f"data.source.root {root} is not a folder: check the path")
    try:
        found = fs.find(target, detail=True)
    except Exception as exc:
        message = f"cannot list {root}: {describe_storage_error(exc, root, endpoint_url)}"
        if is_transient(exc):  # an outage (exit 1), not the user's input
            raise unavailable(exc, endpoint_url, message) from exc
        raise DataError(message) from exc
    files = {}
    for path, info in found.items():
        if info.get("type", "file") != "file":
            continue
        key = path[len(base) :].lstrip("/")
        if not key or Path(key).name.startswith("."):
            continue
        files[key] = FileInfo(key, _url_of(root, key), int(info.get("size") or 0), _fingerprint(info))
    return Listing(root, files)


def _url_of(root: str, key: str) -> str:
    if is_remote(root):
        return join_url(root, key)
    return str(Path(strip_protocol(root)) / key)


def _fingerprint(info: dict[str, Any]) -> str:
    etag = info.get("ETag") or info.get("etag")
    size = info.get("size") or 0
    if etag:
        return f"etag:{str(etag).strip(chr(34))}:{size}"
    mtime = info.get("mtime") or info.get("LastModified") or info.get("created") or ""
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    return f"size:{size}:mtime:{mtime}"


def stat(url: str, *, endpoint_url: str = "", retries: int = 3) -> FileInfo:
    """One file's info (used for the table, which is not part of a listing)."""
    fs = filesystem(url, endpoint_url, retries=retries)
    path = strip_protocol(url)
    try:
        info = fs.info(path)
    except Exception as exc:
        raise DataError(describe_storage_error(exc, url, endpoint_url)) from exc
    if info.get("type", "file") != "file":
        raise DataError(f"{url} is a folder, not a file")
    return FileInfo(Path(path).name, url, int(info.get("size") or 0), _fingerprint(info))


# -------------------------------------------------------------------------------------- downloads
def local_copy(info: FileInfo, *, download_dir: str | Path, endpoint_url: str = "", retries: int = 3) -> Path:
    """A local path holding ``info``'s content: the file itself when local, else a cached download.

    Downloads land in ``download_dir/<digest of url+fingerprint>/<name>`` through
    :func:`medctl.io.atomic_write`, so a rerun finds the finished copy and an interrupted one leaves
    nothing half-written.
    """
    if not is_remote(info.url):
        return Path(info.url)
    digest = hashlib.sha256(f"{info.url}\0{info.fingerprint}".encode()).hexdigest()[:24]
    return _download(info, Path(download_dir).expanduser() / digest / Path(info.key).name, endpoint_url, retries)


def sibling_copy(info: FileInfo, name: str, beside: Path, *, endpoint_url: str = "", retries: int = 3) -> Path | None:
    """The file ``name`` of ``info``'s folder (a BrainVision ``.eeg``, an EEGLAB ``.fdt``) beside ``beside``, the
    local copy of ``info`` (:func:`local_copy`), where readers look for it; None when the folder has no such file.

    Local: the file itself, already beside. Remote: downloaded next to ``beside`` (again when its size changed).
    A name with a folder in it is a DataError; an outage is StorageUnavailable, as for any download.
    """
    if Path(name).name != name or name in ("", ".", ".."):
        raise DataError(f"{info.url}: names a file {name!r} outside its own folder; medctl reads side files beside it")
    if not is_remote(info.url):
        path = Path(info.url).parent / name
        return path if path.is_file() else None
    url = f"{info.url.rsplit('/', 1)[0]}/{name}"
    fs = filesystem(url, endpoint_url, retries=retries)
    try:
        found = fs.info(strip_protocol(url))
    except FileNotFoundError:
        return None
    except Exception as exc:
        if is_transient(exc):  # the endpoint is away after the retries: an outage, not a bad file
            raise unavailable(exc, endpoint_url) from exc
        raise DataError(describe_storage_error(exc, url, endpoint_url)) from exc
    side = FileInfo(name, url, int(found.get("size") or 0), _fingerprint(found))
    return _download(side, beside.parent / name, endpoint_url, retries)


def _download(info: FileInfo, target: Path, endpoint_url: str, retries: int) -> Path:
    """``info``'s content at ``target`` (atomically), unless a file of its size is already there."""
    if target.is_file() and target.stat().st_size == info.size:
        return target
    fs = filesystem(info.url, endpoint_url, retries=retries)
    try:
        with atomic_write(target, "wb") as fh, fs.open(strip_protocol(info.url), "rb") as remote:
            shutil.copyfileobj(remote, fh, COPY_CHUNK)
    except Exception as exc:
        if is_transient(exc):  # the endpoint is away after the retries: an outage, not a bad file
            raise unavailable(exc, endpoint_url) from exc
        raise DataError(describe_storage_error(exc, info.url, endpoint_url)) from exc
    return target


def fetch(
    url: str, *, download_dir: str | Path, endpoint_url: str = "", retries: int = 3
) -> tuple[Path, FileInfo]:
    """A local copy of one URL (a table, a checkpoint) and its info; local paths are returned as is."""
    if not is_remote(url):
        path = Path(url).expanduser()
        if not path.is_file():
            raise DataError(f"{url} not found: check the path")
        st = path.stat()
        return path, FileInfo(path.name, str(path), st.st_size, f"size:{st.st_size}:mtime:{st.st_mtime}")
    info = stat(url, endpoint_url=endpoint_url, retries=retries)
    return local_copy(info, download_dir=download_dir, endpoint_url=endpoint_url, retries=retries), info
