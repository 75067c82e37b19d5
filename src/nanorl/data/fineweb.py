"""Download FineWeb-EDU parquet shards: parallel, resumable, retried with backoff, each shard checked.

The shards are the pre-shuffled FineWeb-EDU repack nanochat trains on (`shard_00000.parquet`, ..., each about
100 MB of text in a `text` column), fetched over plain HTTPS from the Hugging Face hub. The base URL can be
changed (`NANORL_FINEWEB_URL`, or `--url`), which is also how the tests serve shards from a local server.

A shard is written to `<name>.part`; an interrupted download resumes from there with an HTTP Range request;
once complete its parquet footer must read back (pyarrow) before it is renamed to its final name, so a file
with the final name is always a whole shard. Network errors and dropped connections are retried with
exponential backoff; a shard that keeps arriving corrupt, or a missing one (HTTP 404), is a `NanorlError`.

With HF_HUB_OFFLINE or HF_DATASETS_OFFLINE set to a true value, a shard that would come from the hub is not
asked for: the download stops at once with a `NanorlError` saying how to proceed (shards already on disk are
still checked and used; a base URL of your own, off the hub, is still fetched).
"""

from __future__ import annotations

import http.client
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nanorl.api import NanorlError
from nanorl.config import nanorl_home
from nanorl.taskdata import hf_offline

FINEWEB_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
CHUNK = 1 << 20  # bytes per read: large enough that Python overhead is nothing next to the network


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def shards_url(url: str | None = None) -> str:
    """Where the shards come from: `url`, else $NANORL_FINEWEB_URL, else the Hugging Face hub (FINEWEB_URL)."""
    return (url or os.environ.get("NANORL_FINEWEB_URL") or FINEWEB_URL).rstrip("/")


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


def validate_shard(path: Path) -> int:
    """Read the parquet footer; return the number of rows. Raises CorruptShard when it does not read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.read_metadata(path)
        if "text" not in meta.schema.names:
            raise CorruptShard(f"{path.name} has no 'text' column")
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
) -> Path:
    """Fetch `url` to `path` (resuming `path.part`), validate it, rename it into place. Idempotent."""
    if path.exists():
        try:
            validate_shard(path)
            return path
        except CorruptShard:
            path.unlink()  # a damaged final file (disk trouble, a manual copy): fetch it again
    refuse_offline(url, 1, path.parent)
    part = path.with_name(path.name + ".part")
    last_error = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))  # 1x, 2x, 4x, ... the base delay
        have = part.stat().st_size if part.exists() else 0
        headers = {"User-Agent": "nanorl", **({"Range": f"bytes={have}-"} if have else {})}
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as r:
                resumed = have > 0 and r.status == 206
                length = r.headers.get("Content-Length")
                expected = (have if resumed else 0) + int(length) if length is not None else None
                with open(part, "ab" if resumed else "wb") as fh:
                    while chunk := r.read(CHUNK):
                        fh.write(chunk)
                        if on_bytes:
                            on_bytes(len(chunk))
            got = part.stat().st_size
            if expected is not None and got != expected:
                last_error = f"connection closed after {got} of {expected} bytes"
                continue  # resume from what arrived
            validate_shard(part)
            part.replace(path)
            return path
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # the .part is already whole (or longer than the file): check it
                try:
                    validate_shard(part)
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
            last_error = f"HTTP {e.code} {e.reason}"
        except CorruptShard as e:
            part.unlink(missing_ok=True)  # its bytes are wrong somewhere: start over, not resume
            last_error = str(e)
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            last_error = f"{type(e).__name__}: {getattr(e, 'reason', None) or e}"
    raise NanorlError(
        f"could not download {path.name} from {url} after {retries + 1} attempts: {last_error}",
        hint="check the network and the base URL; run the command again to resume",
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

    def one(i: int) -> Path:
        p = download_shard(f"{base}/{shard_name(i)}", d / shard_name(i), retries, backoff, timeout, on_bytes)
        if on_shard:
            on_shard(p)
        return p

    # threads, not processes: the work is waiting on sockets, and urllib releases the GIL while it waits
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(one, range(start, start + shards)))
