"""Stage inputs and outputs on object storage (s3://, gs://, hdfs://, file://) through pyarrow filesystems.

The stages work on local folders (Parquet pairs, decoder banks); a URI is resolved at the edge of a
stage: ``local_copy`` downloads a remote folder once into a cache (reused while its manifest is
unchanged) and ``publish`` uploads a finished local folder, ``manifest.json`` last, so a reader that
waits for the manifest never sees a partial artifact. Credentials come from the usual environment of
each filesystem (AWS_* variables or instance roles for S3, application default credentials for GCS).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

MANIFEST = "manifest.json"


def is_uri(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def cache_root() -> Path:
    return Path(os.environ.get("R2F_CACHE", Path.home() / ".cache" / "r2f_ray")) / "remote"


def _filesystem(uri: str):
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"cannot open {uri!r} through pyarrow ({e}); use s3://, gs://, hdfs:// or file:// "
                         "and install the filesystem's credentials") from None


def _files(fs, root: str) -> list[str]:
    """Paths relative to ``root`` of every file under it."""
    import pyarrow.fs as pafs

    info = fs.get_file_info(root)
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{root!r} is not a folder on {fs.type_name}")
    found = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return sorted(f.path[len(root):].lstrip("/") for f in found if f.type == pafs.FileType.File)


def _copy(src_fs, src: str, dst_fs, dst: str) -> None:
    with src_fs.open_input_stream(src) as fin, dst_fs.open_output_stream(dst) as fout:
        while chunk := fin.read(8 << 20):
            fout.write(chunk)


def remote_exists(uri: str) -> bool:
    """Whether ``uri`` holds a finished artifact (its manifest.json)."""
    import pyarrow.fs as pafs

    fs, root = _filesystem(uri)
    return fs.get_file_info(f"{root.rstrip('/')}/{MANIFEST}").type == pafs.FileType.File


def local_copy(path: str | os.PathLike, target: str | os.PathLike | None = None) -> Path:
    """``path`` itself when local; for a URI, a local copy of the remote folder at ``target`` (default:
    in the cache), downloaded once and kept while the remote manifest.json is byte-identical to it."""
    if not is_uri(path):
        return Path(path)
    import pyarrow.fs as pafs

    from r2f_ray.io import atomic_dir

    fs, root = _filesystem(str(path))
    root = root.rstrip("/")
    names = _files(fs, root)
    if MANIFEST not in names:
        raise FileNotFoundError(f"{path} has no {MANIFEST}: not a finished r2f artifact (still uploading?)")
    with fs.open_input_stream(f"{root}/{MANIFEST}") as f:
        manifest = f.read()
    target = Path(target) if target else cache_root() / hashlib.sha256(str(path).encode()).hexdigest()[:16]
    if (target / MANIFEST).is_file() and (target / MANIFEST).read_bytes() == manifest:
        return target
    local = pafs.LocalFileSystem()
    with atomic_dir(target, overwrite=True) as tmp:
        for name in names:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            _copy(fs, f"{root}/{name}", local, str(tmp / name))
    return target


def publish(local: str | os.PathLike, uri: str) -> int:
    """Upload a finished local folder to ``uri`` (manifest.json last); returns the files copied."""
    import pyarrow.fs as pafs

    fs, root = _filesystem(uri)
    root = root.rstrip("/")
    local = Path(local)
    names = _files(pafs.LocalFileSystem(), str(local.resolve()))
    names.sort(key=lambda n: n == MANIFEST)  # the manifest marks the artifact complete: upload it last
    fs.create_dir(root, recursive=True)
    for name in names:
        if "/" in name:
            fs.create_dir(f"{root}/{name.rsplit('/', 1)[0]}", recursive=True)
        _copy(pafs.LocalFileSystem(), str(local.resolve() / name), fs, f"{root}/{name}")
    return len(names)


def staging_dir(uri: str) -> Path:
    """A local working folder for an artifact whose home is ``uri`` (stable, so a rerun resumes)."""
    return Path(os.environ.get("R2F_STAGING", cache_root().parent / "staging")) / hashlib.sha256(uri.encode()).hexdigest()[:16]


@contextmanager
def staged_output(path: str | os.PathLike, append: bool, overwrite: bool = False) -> Iterator[Path]:
    """The local folder a stage writes to. For a URI: a stable staging folder (``$R2F_STAGING``), first
    filled with the remote artifact when ``append`` (a pair dataset grows and resumes), published to the
    URI when the stage succeeds. A remote artifact that must not be replaced is refused up front."""
    if not is_uri(path):
        yield Path(path)
        return
    uri = str(path)
    local = staging_dir(uri) / "artifact"
    exists = remote_exists(uri)
    if append:
        if exists:
            local_copy(uri, local)
    else:
        if exists and not overwrite:
            raise FileExistsError(f"{uri} already exists: choose another output or pass --overwrite")
        shutil.rmtree(local, ignore_errors=True)  # an unpublished result of an earlier attempt
    local.parent.mkdir(parents=True, exist_ok=True)
    yield local
    publish(local, uri)
