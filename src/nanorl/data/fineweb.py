"""Download FineWeb-EDU parquet shards: parallel, resumable, retried with backoff, each shard checked.

The shards are the pre-shuffled FineWeb-EDU repack nanochat trains on (`shard_00000.parquet`, ..., each about
100 MB of text in a `text` column), fetched over plain HTTPS from the Hugging Face hub. The base URL can be
changed (`NANORL_FINEWEB_URL`, or `--url`), which is also how the tests serve shards from a local server.

A shard is written to `<name>.part`; an interrupted download resumes from there with an HTTP Range request;
once complete it must read back whole (pyarrow: the footer, then every row group's text decompressed) before it
is renamed to its final name, so a file with the final name is always a whole shard (a shard already on disk is
checked by its footer only: it was read whole when it got its name). Network errors and dropped connections are
retried with exponential backoff; a shard that keeps arriving corrupt, or a missing one (HTTP 404), is a
`NanorlError`. When one shard fails, or on Ctrl-C, the other downloads stop at their next read (within a second
on a live connection), their `.part` kept for the resume.

With HF_HUB_OFFLINE or HF_DATASETS_OFFLINE set to a true value, a shard that would come from the hub is not
asked for: the download stops at once with a `NanorlError` saying how to proceed (shards already on disk are
still checked and used; a base URL of your own, off the hub, is still fetched).
"""

from __future__ import annotations

import http.client
import os
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

from nanorl.api import NanorlError
from nanorl.config import nanorl_home
from nanorl.taskdata import hf_offline

FINEWEB_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
CHUNK = 1 << 20  # bytes per read: large enough that Python overhead is nothing next to the network


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def shards_url(url: str | None = None) -> str:
    """Where the shards come from: `url`, else $NANORL_FINEWEB_URL, else the Hugging Face hub (FINEWEB_URL). One
    that is not an http(s) or file URL is bad input, said before any request."""
    base = (url or os.environ.get("NANORL_FINEWEB_URL") or FINEWEB_URL).rstrip("/")
    if urllib.parse.urlsplit(base).scheme not in ("http", "https", "file"):
        where = f"--url {url!r}" if url else f"NANORL_FINEWEB_URL={base!r}"
        raise NanorlError(
            f"{where} is not an http(s) URL",
            hint="give the URL of the folder that holds shard_00000.parquet, ..., e.g. https://host/fineweb-edu",
            exit_code=2,
        )
    return base


def fineweb_dir() -> Path:
    return nanorl_home() / "data" / "fineweb"


def fineweb_shards(directory: Path | None = None) -> list[Path]:
    """The complete shards on disk (in-progress `.part` files are not listed), in order."""
    d = directory or fineweb_dir()
    return sorted(d.glob("shard_*.parquet")) if d.is_dir() else []


def on_hub(url: str) -> bool:
    """Whether `url` is on the Hugging Face hub (huggingface.co, hf.co), which the offline variables close."""
    host = (urllib.parse.urlsplit(url).hostname or "").lower()
    return any(host == h or host.endswith("." + h) for h in ("huggingface.co", "hf.co"))


def refuse_offline(url: str, missing: int, directory: Path) -> None:
    """A NanorlError, before any request, when `missing` shards would come from the hub (`url`) and a Hugging Face
    offline variable is set (`nanorl.taskdata.hf_offline`); nothing when none is missing or the URL is elsewhere."""
    offline = hf_offline()
    if not offline or missing < 1 or not on_hub(url):
        return
    var = offline.split("=", 1)[0]
    shards = "1 FineWeb-EDU shard" if missing == 1 else f"{missing} FineWeb-EDU shards"
    where = f"into {directory}"
    if Path(directory).absolute() == fineweb_dir().absolute():
        where += ", where data.corpus=fineweb reads them (data.fineweb_shards=0: a run downloads none, uses those)"
    raise NanorlError(
        f"downloading {shards} from the Hugging Face hub needs the network, and {offline} says to stay offline",
        hint=f"unset {var} to download; offline, copy the shards (shard_00000.parquet, ...) {where}; or point"
        " NANORL_FINEWEB_URL / --url at a copy you can reach",
    )


class CorruptShard(Exception):
    pass


class DownloadStopped(Exception):
    """A download stopped because another failed or the user pressed Ctrl-C; its `.part` is kept."""


def validate_shard(path: Path, whole: bool = False) -> int:
    """Read the parquet footer, and with `whole` every row group's text (decompressed: bytes damaged in the
    middle of the file fail there, not in the footer); return the number of rows. Raises CorruptShard when it
    does not read. Reading a whole 100 MB shard takes a fraction of a second, next to its download."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.read_metadata(path)
        if "text" not in meta.schema.names:
            raise CorruptShard(f"{path.name} has no 'text' column")
        if whole:
            f = pq.ParquetFile(path)
            for i in range(f.num_row_groups):  # a row group at a time: the memory of one, not of the shard
                f.read_row_group(i, columns=["text"])
        return meta.num_rows
    except (OSError, pa.ArrowException) as e:
        raise CorruptShard(f"{path.name} is not a readable parquet file ({e})") from None


def download_shard(
    url: str,
    path: Path,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 60.0,
    on_bytes: Callable[[int], None] | None = None,
    stop: threading.Event | None = None,
) -> Path:
    """Fetch `url` to `path` (resuming `path.part`), validate it, rename it into place. Idempotent. `stop` (set
    by another thread) ends it with DownloadStopped at its next read or backoff."""
    stop = stop or threading.Event()
    if path.exists():
        try:
            validate_shard(path)
            return path
        except CorruptShard:
            path.unlink()  # a damaged final file (disk trouble, a manual copy): fetch it again
    refuse_offline(url, 1, path.parent)
    part = path.with_name(path.name + ".part")
    last_error, corrupt = "", False
    for attempt in range(retries + 1):
        if attempt and stop.wait(backoff * 2 ** (attempt - 1)):  # 1x, 2x, 4x, ... the base delay
            raise DownloadStopped(path.name)
        have = part.stat().st_size if part.exists() else 0
        headers = {"User-Agent": "nanorl", **({"Range": f"bytes={have}-"} if have else {})}
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as r:
                resumed = have > 0 and r.status == 206
                length = r.headers.get("Content-Length")
                expected = (have if resumed else 0) + int(length) if length is not None else None
                with open(part, "ab" if resumed else "wb") as fh:
                    # read1: what has arrived (up to CHUNK), so that `stop` is seen, and the bar moves, often
                    while chunk := r.read1(CHUNK):
                        fh.write(chunk)
                        if on_bytes:
                            on_bytes(len(chunk))
                        if stop.is_set():
                            raise DownloadStopped(path.name)
            got = part.stat().st_size
            if expected is not None and got != expected:
                last_error = f"connection closed after {got} of {expected} bytes"
                continue  # resume from what arrived
            validate_shard(part, whole=True)
            part.replace(path)
            return path
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # the .part is already whole (or longer than the file): check it
                try:
                    validate_shard(part, whole=True)
                    part.replace(path)
                    return path
                except CorruptShard:
                    part.unlink()
                    last_error = "a stale partial file"
                    continue
            if e.code in (401, 403, 404):
                raise NanorlError(
                    f"{url}: HTTP {e.code} {e.reason}",
                    hint="check the shard index and the base URL (NANORL_FINEWEB_URL / --url)",
                ) from None
            last_error, corrupt = f"HTTP {e.code} {e.reason}", False
        except CorruptShard as e:
            part.unlink(missing_ok=True)  # its bytes are wrong somewhere: start over, not resume
            last_error, corrupt = str(e), True
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            last_error, corrupt = f"{type(e).__name__}: {getattr(e, 'reason', None) or e}", False
    raise NanorlError(
        f"could not download {path.name} from {url} after {retries + 1} attempts: {last_error}",
        hint="the server sends a file that is not a whole parquet shard: check that the base URL (--url,"
        " NANORL_FINEWEB_URL) serves FineWeb-EDU's shards"
        if corrupt
        else "check the network and the base URL; run the command again to resume",
    )


def download_fineweb(
    shards: int,
    base_url: str | None = None,
    directory: Path | None = None,
    workers: int = 4,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 60.0,
    start: int = 0,
    on_bytes: Callable[[int], None] | None = None,
    on_shard: Callable[[Path], None] | None = None,
) -> list[Path]:
    """Download shards `start .. start+shards-1` in parallel; return their paths once all are complete."""
    if shards < 1:
        raise NanorlError("--shards must be at least 1", exit_code=2)
    base = shards_url(base_url)
    d = directory or fineweb_dir()
    # offline, and shards to fetch from the hub: one error before any folder, thread or request
    refuse_offline(base, sum(not (d / shard_name(i)).is_file() for i in range(start, start + shards)), d)
    d.mkdir(parents=True, exist_ok=True)

    stop = threading.Event()

    def one(i: int) -> Path:
        p = download_shard(f"{base}/{shard_name(i)}", d / shard_name(i), retries, backoff, timeout, on_bytes, stop)
        if on_shard:
            on_shard(p)
        return p

    # threads, not processes: the work is waiting on sockets, and urllib releases the GIL while it waits
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        futures = [pool.submit(one, i) for i in range(start, start + shards)]
        wait(futures, return_when=FIRST_EXCEPTION)  # the first failure, whichever shard it is
        failed = next((f.exception() for f in futures if f.done() and f.exception() is not None), None)
        if failed is not None:
            raise failed
        return [f.result() for f in futures]
    except BaseException:  # a shard that failed, or Ctrl-C: the others stop now, not when their shard is whole
        stop.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
