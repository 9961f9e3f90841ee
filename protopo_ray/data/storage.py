"""Where experiments live: a local directory or an object-store URI (s3://, gs://, file://), via pyarrow.

Ray Tune and Ray Train write to the URI themselves; the project's own records (stage JSONs, report, winner)
are written to a local working copy and mirrored to the URI after each stage, so a search on a cluster
leaves everything on shared storage and `--resume` on another machine finds the finished stages there.
Credentials come from the environment (instance profile / service account), never from files here.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pyarrow import fs as pafs

LOCAL_CACHE = Path(".protopo") / "experiments"


def is_uri(path: str | Path) -> bool:
    return "://" in str(path)


def scheme(uri: str) -> str:
    """"s3" for s3://bucket/key, "" for a local path."""
    return uri.split("://", 1)[0] if is_uri(uri) else ""


def with_scheme(path: str, like: str) -> str:
    """A path Ray reported inside its filesystem ("bucket/key" on S3) as a URI of `like`'s scheme."""
    if is_uri(path) or not is_uri(like):
        return path
    return f"{scheme(like)}://{path.lstrip('/')}"


def resolve(path: str | Path) -> str:
    """URIs as they are; local paths made absolute (trials run in other processes and directories)."""
    return str(path) if is_uri(path) else str(Path(path).resolve())


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def filesystem(uri: str | Path) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of a local path or object-store URI, and the path inside it (local: absolute)."""
    if is_uri(uri):
        return pafs.FileSystem.from_uri(str(uri))
    return pafs.LocalFileSystem(), str(Path(uri).resolve())


def working_dir(exp_uri: str) -> Path:
    """The local directory the project writes its records to: the experiment itself, or a cache of a URI."""
    if not is_uri(exp_uri):
        return Path(exp_uri)
    digest = hashlib.sha1(exp_uri.encode()).hexdigest()[:8]
    return LOCAL_CACHE / f"{Path(exp_uri.rstrip('/')).name}-{digest}"


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def upload(local: Path, uri: str) -> None:
    """Mirror a local directory to `uri` (no-op when they are the same place)."""
    if not is_uri(uri) or not local.exists():
        return
    fs, path = filesystem(uri)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local.resolve()), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download(uri: str, local: Path) -> bool:
    """Copy `uri` (a directory) into `local`; False when it does not exist."""
    if not is_uri(uri):
        return Path(uri).exists()
    if not exists(uri):
        return False
    fs, path = filesystem(uri)
    local.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(local.resolve()), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return True


def fetch_dir(uri_or_path: str, local: Path) -> Path:
    """A local copy of a checkpoint directory that may live in object storage (Ray reports bucket paths)."""
    if not is_uri(uri_or_path) and Path(uri_or_path).exists():
        return Path(uri_or_path)
    if not download(uri_or_path, local):
        raise FileNotFoundError(f"{uri_or_path}: checkpoint directory not found")
    return local
