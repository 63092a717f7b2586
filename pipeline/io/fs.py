"""Where data lives: local paths and ``s3://`` URIs, behind one small interface.

Local paths keep their plain ``pathlib`` behaviour. ``s3://bucket/key`` goes
through pyarrow's S3 filesystem, configured from the standard AWS environment:
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` (or
the shared config files, or an instance role), ``AWS_REGION`` /
``AWS_DEFAULT_REGION``, and ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` for
S3-compatible stores (MinIO, Ceph, moto). The endpoint is passed explicitly:
pyarrow's own reading of ``AWS_ENDPOINT_URL`` differs between versions.

Outputs are written whole or not at all. An ``s3://`` output is first written
like a local one, beside the job's journal, then uploaded. An upload is not
atomic by itself (an output stream that fails half-way still completes the
object it was writing), so it goes to a temporary key beside the target and is
then copied server-side onto the target key (one ``CopyObject``: readers see
the old object or the new one, never a part), and the temporary key is deleted.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path, PurePosixPath
from typing import IO, Any

import pyarrow as pa
import pyarrow.fs as pafs

SCHEMES = ("s3",)
UPLOAD_CHUNK = 8 << 20
DataPath = Path | str  # a local path, or an ``s3://`` URI kept as text


def is_uri(path: DataPath) -> bool:
    return isinstance(path, str) and "://" in path


def parse_data_path(value: Any) -> DataPath:
    """A job file's path: ``s3://bucket/key`` stays text, anything else is a Path.

    Raises ValueError (pydantic turns it into a one-line job error) for other
    schemes or an URI without a bucket and key.
    """
    if isinstance(value, Path):
        return value
    if not isinstance(value, str):
        raise ValueError("must be a path or an s3:// URI")
    if "://" not in value:
        return Path(value)
    scheme, _, rest = value.partition("://")
    if scheme.lower() not in SCHEMES:
        raise ValueError(f"unsupported scheme {scheme}://; use a local path or s3://bucket/key")
    bucket, _, key = rest.partition("/")
    if not bucket or not key.strip("/"):
        raise ValueError(f"{value}: an s3:// URI needs a bucket and a key (s3://bucket/key)")
    return f"s3://{rest}"


@dataclass(frozen=True)
class Remote:
    """An ``s3://`` URI resolved to its filesystem and the path inside it."""

    fs: pafs.FileSystem
    path: str  # bucket/key, without a trailing slash

    def uri(self, path: str) -> str:
        return f"s3://{path}"


def remote(uri: str) -> Remote:
    return Remote(s3_filesystem(), uri.split("://", 1)[1].rstrip("/"))


@cache
def s3_filesystem() -> pafs.S3FileSystem:
    """One S3 filesystem per process, from the standard AWS environment variables."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None
    return pafs.S3FileSystem(endpoint_override=endpoint, region=region)


def _info(path: DataPath) -> pafs.FileInfo:
    target = remote(str(path))
    return target.fs.get_file_info(target.path)


def exists(path: DataPath) -> bool:
    if not is_uri(path):
        return Path(path).exists()
    return _info(path).type != pafs.FileType.NotFound


def is_dir(path: DataPath) -> bool:
    if not is_uri(path):
        return Path(path).is_dir()
    return _info(path).type == pafs.FileType.Directory


def suffix(path: DataPath) -> str:
    return (Path(path).suffix if not is_uri(path) else PurePosixPath(str(path)).suffix).lower()


def parquet_files(path: DataPath) -> list[DataPath]:
    """The Parquet files of a folder or prefix, sorted; a file is its own list."""
    if not is_dir(path):
        return [path]
    if not is_uri(path):
        return list(sorted(Path(path).rglob("*.parquet")))
    target = remote(str(path))
    infos = target.fs.get_file_info(pafs.FileSelector(target.path, recursive=True))
    found = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
    return [target.uri(p) for p in found]


def readable(path: DataPath) -> Any:
    """What pyarrow's readers accept: the local path itself, or an open S3 file."""
    if not is_uri(path):
        return path
    target = remote(str(path))
    return target.fs.open_input_file(target.path)


def open_binary(path: DataPath) -> IO[bytes]:
    """A binary file object for line-by-line reading (JSON Lines schema pass)."""
    if not is_uri(path):
        return Path(path).open("rb")
    target = remote(str(path))
    return target.fs.open_input_stream(target.path)


def absolute(path: DataPath) -> DataPath:
    """A path that means the same thing from another process or working directory."""
    return path if is_uri(path) else Path(path).resolve()


def inside(child: DataPath, parent: DataPath) -> bool:
    """True if ``child`` is ``parent`` or lies within it (for the output-over-input check)."""
    if is_uri(child) != is_uri(parent):
        return False
    if not is_uri(child):
        c, p = Path(child).resolve(), Path(parent).resolve()
        return c == p or p in c.parents
    child_uri, parent_uri = str(child).rstrip("/"), str(parent).rstrip("/")
    return child_uri == parent_uri or child_uri.startswith(parent_uri + "/")


def output_problem(path: DataPath) -> str | None:
    """Why an s3:// output cannot be written (checked before anything is sent), or None."""
    if not is_uri(path):
        return None
    bucket = str(path).split("://", 1)[1].split("/", 1)[0]
    try:
        kind = s3_filesystem().get_file_info(bucket).type
    except OSError as exc:
        return f"cannot reach {path}: {' '.join(str(exc).split())[:300]}"
    if kind != pafs.FileType.Directory:
        return f"{path}: bucket {bucket!r} not found"
    return None


def default_journal(output: str) -> Path:
    """The journal of an ``s3://`` output: local, under ``.pipeline/`` in the working directory."""
    *folders, name = output.split("://", 1)[1].rstrip("/").split("/")
    return Path(".pipeline", "s3", *folders, f"{name}.journal.sqlite")


def basename(path: DataPath) -> str:
    return Path(path).name if not is_uri(path) else str(path).rstrip("/").rsplit("/", 1)[-1]


def upload_whole(local: Path, uri: str) -> None:
    """Upload a finished local file so that ``uri`` shows the old object or the new one, never a part."""
    with remote_output(uri) as sink, local.open("rb") as source:
        while chunk := source.read(UPLOAD_CHUNK):
            sink.write(chunk)


@contextlib.contextmanager
def remote_output(uri: str) -> Iterator[pa.NativeFile]:
    """A stream to a temporary key beside ``uri``, moved onto ``uri`` only if the block completes."""
    target = remote(uri)
    parent, _, name = target.path.rpartition("/")
    _remove_stale(target.fs, parent, name)
    tmp = f"{parent}/.{name}.{os.getpid()}.tmp"
    try:
        with target.fs.open_output_stream(tmp) as sink:
            yield sink
        # S3 has no rename: pyarrow's move is a server-side CopyObject, then a delete.
        target.fs.move(tmp, target.path)
    finally:
        with contextlib.suppress(OSError):
            if target.fs.get_file_info(tmp).type != pafs.FileType.NotFound:
                target.fs.delete_file(tmp)


def _remove_stale(fs: pafs.FileSystem, parent: str, name: str) -> None:
    """Temporary keys left by a killed run (the run lock is held, so none is live)."""
    try:
        infos = fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True))
    except OSError:
        return
    prefix = f"{parent}/.{name}."
    for info in infos:
        if info.path.startswith(prefix) and info.path.endswith(".tmp"):
            with contextlib.suppress(OSError):
                fs.delete_file(info.path)
