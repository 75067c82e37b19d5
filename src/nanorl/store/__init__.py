"""Where checkpoints are mirrored: a local folder or an S3 bucket (any S3-compatible endpoint).

    store = open_store("s3://bucket/prefix")      # or "/some/dir", "file:///some/dir"
    store.put(local_file, "runs/x/base/model.safetensors")
    store.get("runs/x/base/model.safetensors", local_file)
    store.exists(key); store.list(prefix); store.delete(key)
    store.check()                                 # reachable and usable? else a NanorlError saying what to fix

The S3 endpoint comes from `NANORL_S3_ENDPOINT` (else boto3's own `AWS_ENDPOINT_URL`, else AWS), credentials
from boto3's usual chain (environment, ~/.aws). Every failure is a `NanorlError` saying what to check.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from nanorl.api import NanorlError
from nanorl.store.local import LocalStore


def sha256_file(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB blocks: what checkpoints record in state.json, and what a pull checks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_folder_url(url: str) -> None:
    """Refuse a store URL that is neither s3:// nor a plain folder (or file://): another scheme, or a mistyped
    `s3:/b/p`, `S3:/b`, `s3//b/p`, which would otherwise be a local folder of that name (and a run on a rented
    machine would mirror to the disk that goes with the machine)."""
    if url.startswith("file://"):
        return
    if "://" in url:
        raise NanorlError(f"unsupported store {url!r}", hint="use s3://bucket/prefix or a local folder", exit_code=2)
    if re.match(r"(?i)s3(:|//)", url) or re.match(r"[A-Za-z][A-Za-z0-9+.-]*:/", url):
        raise NanorlError(
            f"store {url!r} looks like a mistyped URL",
            hint="s3://bucket/prefix (two slashes), or a local folder (./s3/... for one named so)",
            exit_code=2,
        )


def open_store(url: str):
    """A store for `url`: s3://bucket[/prefix] or a local path (file:// optional)."""
    if not url:
        raise NanorlError("no store given", hint="e.g. checkpoint.store=s3://bucket/prefix or a local folder")
    if url.startswith("s3://"):
        from nanorl.store.s3 import S3Store

        bucket, _, prefix = url[len("s3://") :].partition("/")
        if not bucket:
            raise NanorlError(f"invalid store URL {url!r}: no bucket", hint="s3://bucket/prefix", exit_code=2)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}", bucket):  # botocore's rule, before any request
            raise NanorlError(
                f"invalid store URL {url!r}: {bucket!r} is not a bucket name",
                hint="s3://bucket/prefix (a bucket name has 3-63 letters, digits, '.' and '-')",
                exit_code=2,
            )
        return S3Store(bucket, prefix.strip("/"))
    check_folder_url(url)
    return LocalStore(Path(url.removeprefix("file://")))


__all__ = ["open_store", "LocalStore"]
