"""Corpora, FineWeb shard downloads (against a local HTTP server), and the packing loader."""

import http.server
import json
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanorl.api import NanorlError
from nanorl.data import PackedLoader, download_fineweb, open_corpus
from nanorl.data.corpus import Corpus
from nanorl.data.fineweb import download_shard, fineweb_shards, shard_name
from nanorl.tokenizer import train_tokenizer

# ---------------------------------------------------------------------------------------------------------
# the packing loader


def _docs(n=300):
    # documents of varied lengths, each naming itself, so a row's documents can be read back
    return [f"doc{i} " + " ".join(f"w{(i * j) % 50}" for j in range(1 + (i * 7) % 60)) for i in range(n)]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(_docs(), vocab_size=400)


def _batches(loader, n):
    return [next(loader) for _ in range(n)]


def _same(a, b):
    return all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b, strict=True))


def test_batches_shape_shift_and_determinism(tok):
    a = PackedLoader(_docs(), tok, batch_size=4, seq_len=32, seed=1, block_docs=64)
    b = PackedLoader(_docs(), tok, batch_size=4, seq_len=32, seed=1, block_docs=64)
    c = PackedLoader(_docs(), tok, batch_size=4, seq_len=32, seed=2, block_docs=64)
    ba, bb, bc = _batches(a, 20), _batches(b, 20), _batches(c, 20)
    x, y = ba[0]
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one token
    assert _same(ba, bb)
    assert not _same(ba, bc)


def test_rows_start_at_bos_and_lose_no_tokens(tok):
    """Best-fit packing: rows start with <|bos|>, and over one pass every document token appears exactly once
    (less the block-end partial rows the loader reports as dropped)."""
    docs = _docs(200)
    loader = PackedLoader(docs, tok, batch_size=1, seq_len=160, shuffle=False, block_docs=50)
    rows = []
    while loader.epoch == 0:
        dropped = loader.stats["dropped_tokens"]  # before the call that packs the next epoch's first block
        rows.append(loader.next_rows()[0])
    rows.pop()  # the loop ends on the first row of the next epoch
    emitted = Counter(int(t) for r in rows for t in r)
    expected = Counter(t for ids in tok.encode_batch(docs, bos=True) for t in ids)
    assert sum((expected - emitted).values()) == dropped
    assert not emitted - expected  # nothing invented
    # docs here are shorter than a row: only a leftover tail, at a block end, can start a row without <|bos|>
    assert sum(int(r[0]) == tok.bos_id for r in rows) >= 0.9 * len(rows)


def test_ddp_ranks_see_disjoint_documents(tok):
    docs = _docs(400)
    seen = []
    for rank in (0, 1):
        loader = PackedLoader(docs, tok, batch_size=2, seq_len=48, seed=3, rank=rank, world_size=2, block_docs=50)
        rows = {tuple(r) for _ in range(40) for r in loader.next_rows().tolist()}
        text = tok.decode([t for r in rows for t in r])
        seen.append((rows, {w for w in text.replace("<|bos|>", " ").split() if w.startswith("doc")}))
    (rows0, docs0), (rows1, docs1) = seen
    assert not rows0 & rows1
    assert docs0 and docs1 and not docs0 & docs1


@pytest.mark.parametrize("skip", [0, 1, 7, 23, 61])  # within a block, across blocks, across epochs
def test_exact_resume(tok, skip):
    kwargs = dict(batch_size=3, seq_len=40, seed=5, block_docs=40)
    loader = PackedLoader(_docs(), tok, **kwargs)
    _batches(loader, skip)
    state = json.loads(json.dumps(loader.state_dict()))  # survives a checkpoint's JSON
    expected = _batches(loader, 8)
    resumed = PackedLoader(_docs(), tok, **kwargs)
    resumed.load_state_dict(state)
    assert _same(_batches(resumed, 8), expected)
    # a list of every rank's states (what a DDP checkpoint saves) works too
    again = PackedLoader(_docs(), tok, **kwargs)
    again.load_state_dict([{**state, "rank": 1}, state])
    assert _same(_batches(again, 8), expected)


def test_resume_refuses_a_different_stream(tok):
    state = PackedLoader(_docs(), tok, batch_size=2, seq_len=40).state_dict()
    other = PackedLoader(_docs(), tok, batch_size=2, seq_len=40, rank=0, world_size=2)
    with pytest.raises(NanorlError, match="world_size"):
        other.load_state_dict(state)


def test_corpus_too_small_or_empty(tok):
    with pytest.raises(NanorlError, match="too small"):
        next(PackedLoader(["hi"], tok, batch_size=1, seq_len=64, block_docs=1))
    with pytest.raises(NanorlError, match="no documents"):
        next(PackedLoader([], tok, batch_size=1, seq_len=8))


def test_task_corpus_feeds_the_loader(tok):
    from nanorl.plugins import get_plugins

    corpus = open_corpus("task", task=get_plugins().task("arith"))
    x, _ = next(PackedLoader(corpus, tok, batch_size=2, seq_len=64))
    assert x[0, 0] == tok.bos_id
    with pytest.raises(NanorlError, match="needs a task"):
        open_corpus("task")


# ---------------------------------------------------------------------------------------------------------
# local corpora


def _write_parquet(path, texts, row_group_size=2):
    pq.write_table(pa.table({"text": texts}), path, row_group_size=row_group_size)


def test_a_task_without_a_corpus_says_how_to_give_it_one():
    """The hint serves both readers: a user (another corpus) and the task's author (a corpus() method)."""
    from nanorl.api import Task

    class QuizTask(Task):
        name = "quiz"

    with pytest.raises(NanorlError, match="task 'quiz' has no pretraining corpus of its own") as err:
        open_corpus("task", task=QuizTask())
    assert err.value.exit_code == 2
    assert "data.corpus=fineweb" in err.value.hint and "or a path" in err.value.hint
    assert "give QuizTask a corpus(split) method" in err.value.hint and "docs/plugins.md" in err.value.hint


def test_local_files_dirs_and_globs(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nstill first\n\n\nsecond doc\n")
    (tmp_path / "b.jsonl").write_text('{"text": "third"}\n\n{"text": "fourth", "id": 4}\n')
    _write_parquet(tmp_path / "c.parquet", ["fifth", "sixth", "seventh"])
    (tmp_path / "notes.md").write_text("ignored: not a corpus type")
    want = ["first doc\nstill first", "second doc", "third", "fourth", "fifth", "sixth", "seventh"]
    assert list(open_corpus(str(tmp_path)).docs()) == want
    assert list(open_corpus(str(tmp_path / "*.jsonl")).docs()) == ["third", "fourth"]
    both = f"{tmp_path / 'b.jsonl'},{tmp_path / 'c.parquet'}"
    corpus = open_corpus(both)
    assert list(corpus.docs()) == want[2:] and corpus.stats["docs"] == 5
    with pytest.raises(NanorlError, match="no corpus files"):
        open_corpus(str(tmp_path / "missing*.txt"))


def test_bad_lines_name_the_file_or_are_skipped_and_counted(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{not json}\n{"txt": "no text field"}\n\xff\xfe\n{"text": "ok too"}\n')
    with pytest.raises(NanorlError, match=r"bad\.jsonl:2"):
        list(open_corpus(str(bad)).docs())
    corpus = open_corpus(str(bad), skip_bad=True)
    assert list(corpus.docs()) == ["ok", "ok too"]
    assert corpus.stats["skipped_lines"] == 3


def test_a_glob_takes_corpus_files_only_and_a_named_file_of_another_type_fails_at_once(tmp_path):
    """Found when the corpus is opened (the runner's preflight), not when a pass reaches the file hours later."""
    (tmp_path / "a.txt").write_text("alpha\n")
    (tmp_path / "README.md").write_text("not a corpus file")
    assert list(open_corpus(str(tmp_path / "*")).docs()) == ["alpha"]  # as for the directory
    with pytest.raises(NanorlError, match="README.md: unsupported file type") as err:
        open_corpus(f"{tmp_path / 'a.txt'},{tmp_path / 'README.md'}")
    assert err.value.exit_code == 2
    with pytest.raises(NanorlError, match=r"no corpus files at .*\*\.md.*1 file matched") as err:
        open_corpus(str(tmp_path / "*.md"))


def test_windows_files_and_empty_documents(tmp_path):
    """A UTF-8 byte-order mark (Windows editors, PowerShell) is not text: it made a .jsonl's first line invalid
    JSON and became the first character of a .txt's first document. CRLF line ends read as LF. An empty document
    is skipped: it would only be a lone <|bos|> in a row, and a corpus of nothing else has no documents."""
    (tmp_path / "a.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "first"}\r\n{"text": ""}\r\n{"text": "second"}\r\n')
    (tmp_path / "b.txt").write_bytes(b"\xef\xbb\xbfone\r\nline two\r\n\r\nthree\r\n")
    _write_parquet(tmp_path / "c.parquet", ["", "fourth"])
    assert list(open_corpus(str(tmp_path)).docs()) == ["first", "second", "one\nline two", "three", "fourth"]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "e.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(NanorlError, match="no documents"):
        list(open_corpus(str(empty)).docs())


def test_corrupt_parquet_and_empty_corpus(tmp_path):
    good = tmp_path / "good.parquet"
    _write_parquet(good, ["a", "b"])
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(good.read_bytes()[:-20])  # truncated: the footer is gone
    with pytest.raises(NanorlError, match="broken.parquet"):
        list(open_corpus(str(tmp_path)).docs())
    corpus = open_corpus(str(tmp_path), skip_bad=True)
    assert list(corpus.docs()) == ["a", "b"] and corpus.stats["skipped_files"] == 1
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(NanorlError, match="no documents"):
        list(open_corpus(str(empty)).docs())
    with pytest.raises(NanorlError, match="no documents"):
        list(Corpus([lambda: []], name="nothing").docs())


# ---------------------------------------------------------------------------------------------------------
# FineWeb shard downloads against a local server


class _Server:
    """A local HTTP server with Range support that can drop a connection mid-body or serve corrupt bytes."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.drop_once: set[str] = set()  # names whose next response is cut after half the body
        self.slow: set[str] = set()  # names sent 4 KB at a time, 50 ms apart
        self.requests: list[tuple[str, str | None]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                rng = self.headers.get("Range")
                outer.requests.append((name, rng))
                body = outer.files.get(name)
                if body is None:
                    self.send_error(404)
                    return
                start = int(rng.split("=")[1].rstrip("-")) if rng else 0
                if start >= len(body):
                    self.send_error(416)
                    return
                self.send_response(206 if rng else 200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if name in outer.drop_once:
                    outer.drop_once.discard(name)
                    self.wfile.write(body[start : start + (len(body) - start) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(2)  # the connection drops mid-body
                    return
                if name in outer.slow:
                    for i in range(start, len(body), 4096):
                        self.wfile.write(body[i : i + 4096])
                        self.wfile.flush()
                        time.sleep(0.05)
                    return
                self.wfile.write(body[start:])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/shards"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _shard_bytes(tmp_path: Path, i: int) -> bytes:
    p = tmp_path / f"src{i}.parquet"
    _write_parquet(p, [f"shard {i} doc {j} " + "text " * 200 for j in range(50)], row_group_size=10)
    return p.read_bytes()


@pytest.fixture
def server(tmp_path):
    s = _Server({shard_name(i): _shard_bytes(tmp_path, i) for i in range(3)})
    yield s
    s.close()


def test_download_shards_in_parallel(server, tmp_path, monkeypatch):
    monkeypatch.setenv("NANORL_FINEWEB_URL", server.url)  # the env var names the base URL
    got = []
    paths = download_fineweb(3, workers=3, backoff=0.01, on_bytes=got.append)
    assert [p.name for p in paths] == [shard_name(i) for i in range(3)]
    assert fineweb_shards() == paths  # the default folder under NANORL_HOME
    assert sum(got) == sum(len(server.files[p.name]) for p in paths)
    for p in paths:
        assert p.read_bytes() == server.files[p.name]
    docs = list(open_corpus("fineweb").docs())
    assert len(docs) == 150 and docs[0].startswith("shard 0 doc 0")
    # a second call finds them complete and downloads nothing
    n = len(server.requests)
    download_fineweb(3, base_url=server.url, backoff=0.01)
    assert len(server.requests) == n


def test_dropped_connection_resumes(server, tmp_path):
    name = shard_name(1)
    server.drop_once.add(name)
    path = download_shard(f"{server.url}/{name}", tmp_path / name, retries=3, backoff=0.01)
    assert path.read_bytes() == server.files[name]
    assert not (tmp_path / (name + ".part")).exists()
    first, second = [r for n, r in server.requests if n == name]
    assert first is None and second is not None and second.startswith("bytes=")  # resumed with a Range request


def test_partial_file_from_an_earlier_run_resumes(server, tmp_path):
    name = shard_name(2)
    (tmp_path / (name + ".part")).write_bytes(server.files[name][:1000])
    download_shard(f"{server.url}/{name}", tmp_path / name, retries=1, backoff=0.01)
    assert (tmp_path / name).read_bytes() == server.files[name]
    assert server.requests == [(name, "bytes=1000-")]


def test_corrupt_shard_is_a_clear_error(server, tmp_path):
    name = shard_name(0)
    server.files[name] = b"PAR1" + b"\x00" * 5000  # right size class, wrong bytes
    with pytest.raises(NanorlError, match=name) as err:
        download_shard(f"{server.url}/{name}", tmp_path / name, retries=2, backoff=0.01)
    assert "not a readable parquet file" in str(err.value)
    assert not (tmp_path / name).exists() and not (tmp_path / (name + ".part")).exists()


def test_missing_shard_is_not_retried(server, tmp_path):
    with pytest.raises(NanorlError, match="404"):
        download_shard(f"{server.url}/nope.parquet", tmp_path / "nope.parquet", retries=3, backoff=0.01)
    assert len(server.requests) == 1


def test_a_shard_damaged_inside_is_refused_though_its_footer_reads(server, tmp_path):
    """Bytes damaged inside a shard leave its footer readable: a footer-only check let such a shard take its final
    name, and the run failed on it later, hours into pretraining. The download reads it whole (what breaks the
    decompression of a row group fails there)."""
    name = shard_name(0)
    body = bytearray(server.files[name])
    for i in range(100, 164):  # in the first row group's data
        body[i] ^= 0x55
    server.files[name] = bytes(body)
    pq.read_metadata(pa.BufferReader(server.files[name]))  # the footer still reads
    with pytest.raises(NanorlError, match="not a readable parquet file") as err:
        download_shard(f"{server.url}/{name}", tmp_path / name, retries=1, backoff=0.01)
    assert "not a whole parquet shard" in err.value.hint
    assert not (tmp_path / name).exists() and not (tmp_path / (name + ".part")).exists()


def test_a_failed_shard_stops_the_other_downloads_at_once(server, tmp_path):
    """One shard missing (404) while another is still arriving: the error comes at once, the other download
    stopped with what it has kept for the resume (it used to run to its end first; Ctrl-C waited the same way)."""
    server.files[shard_name(0)] = server.files[shard_name(0)] * 8  # ~90 s at the slow rate
    server.slow.add(shard_name(0))
    del server.files[shard_name(1)]
    t0 = time.perf_counter()
    with pytest.raises(NanorlError, match="404"):
        download_fineweb(2, base_url=server.url, directory=tmp_path, workers=2, backoff=0.01)
    assert time.perf_counter() - t0 < 5
    part = tmp_path / (shard_name(0) + ".part")
    assert 0 < part.stat().st_size < len(server.files[shard_name(0)])


def test_a_base_url_that_is_not_a_url_is_bad_input(monkeypatch, tmp_path):
    with pytest.raises(NanorlError, match="--url 'notaurl' is not an http") as err:
        download_fineweb(1, base_url="notaurl", directory=tmp_path)
    assert err.value.exit_code == 2
    monkeypatch.setenv("NANORL_FINEWEB_URL", "mirror.example/shards")
    with pytest.raises(NanorlError, match="NANORL_FINEWEB_URL='mirror.example/shards' is not an http"):
        download_fineweb(1, directory=tmp_path)


def test_download_in_a_pipe_prints_a_line_a_shard_and_no_blank_line(server, tmp_path):
    """A bar in a pipe or a log draws nothing but leaves an empty line: there, a line a shard instead."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    r = subprocess.run(
        [sys.executable, "-m", "nanorl", "data", "download", "fineweb", "--shards", "2", "--url", server.url,
         "--dir", str(tmp_path / "d")],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("fineweb: 1/2 shards") and lines[1].startswith("fineweb: 2/2 shards")
    assert lines[2].startswith("2 shards") and len(lines) == 3


def test_corpus_text_bytes_come_from_file_metadata(tmp_path):
    """The size behind the base stage's passes estimate: a parquet file's `text` column from its metadata, a
    text or JSONL file's size; unknown (None) for a task's corpus, which only a full pass could measure."""
    import random

    rng = random.Random(0)
    texts = ["".join(rng.choice("abcdefghij klmnop é") for _ in range(rng.randint(50, 3000))) for _ in range(300)]
    true = sum(len(t.encode()) for t in texts)
    _write_parquet(tmp_path / "a.parquet", texts, row_group_size=100)
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    (tmp_path / "c.txt").write_text("\n\n".join(texts))
    for name in ("a.parquet", "b.jsonl", "c.txt"):
        assert Corpus([tmp_path / name]).text_bytes() == pytest.approx(true, rel=0.03), name
    assert Corpus([tmp_path / "a.parquet", tmp_path / "c.txt"]).text_bytes() == pytest.approx(2 * true, rel=0.03)
    assert Corpus([lambda: iter(texts)]).text_bytes() is None


def test_base_names_the_fineweb_shards_for_one_pass(tmp_path):
    """Two downloaded shards and a budget of ~3 passes over them: the warning names the --shards that make one."""
    from types import SimpleNamespace

    from rich.console import Console

    from nanorl.stages.base import announce_passes

    texts = [f"document {i} " + "word " * 400 for i in range(50)]
    shards = [tmp_path / "shard_00000.parquet", tmp_path / "shard_00001.parquet"]
    for path in shards:
        _write_parquet(path, texts, row_group_size=10)
    corpus = Corpus(shards, name="fineweb")
    tok = SimpleNamespace(encode_batch=lambda docs: [[0] * (len(d) // 4 - 1) for d in docs])  # 4 bytes a token
    console = Console(record=True, width=300)
    ctx = SimpleNamespace(bus=SimpleNamespace(console=console))
    corpus_tokens = corpus.text_bytes() / 4
    passes = announce_passes(ctx, corpus, tok, run_tokens=int(3 * corpus_tokens))
    assert passes == pytest.approx(3, rel=0.02)
    out = console.export_text()
    assert "the run will see the same text ~3.0 times" in out and "fineweb --shards 6" in out


def test_prepare_meets_a_rank_without_rows_before_the_first_batch_and_changes_no_batch(tok):
    # one long document in blocks of one document per rank: rank 0 gets it, rank 1 nothing. `prepare` raises on
    # rank 1 before training (every rank calls it, and nanorl.stages.common.prepare_loader makes them raise together)
    long_doc = [" ".join(f"w{i % 50}" for i in range(400))]
    for rank in (0, 1):
        loader = PackedLoader(long_doc, tok, batch_size=1, seq_len=32, block_docs=1, rank=rank, world_size=2)
        if rank == 1:
            with pytest.raises(NanorlError, match="too small.*rank 1"):
                loader.prepare()
        else:
            loader.prepare()
    # prepared or not, the same batches from the same position
    a = PackedLoader(_docs(), tok, batch_size=3, seq_len=40, seed=2)
    b = PackedLoader(_docs(), tok, batch_size=3, seq_len=40, seed=2)
    b.prepare()
    assert b.state_dict() == a.state_dict()
    assert _same(_batches(a, 5), _batches(b, 5))


def test_a_run_with_fineweb_shards_downloads_them_before_its_tokenizer(server, tmp_path, monkeypatch, capsys):
    """data.fineweb_shards=2 with data.corpus=fineweb: the first two shards are fetched (with the downloader
    above) before the tokenizer trains, and nothing is asked for once they are there."""
    from nanorl.cli import main
    from nanorl.config import resolve
    from nanorl.data import fineweb_shards, train_run_tokenizer

    monkeypatch.setenv("NANORL_FINEWEB_URL", server.url)
    cfg = resolve(overrides=["data.corpus=fineweb", "data.fineweb_shards=2", "model.vocab_size=300"])
    tok = train_run_tokenizer(cfg, None, tmp_path / "tok")
    assert [p.name for p in fineweb_shards()] == [shard_name(0), shard_name(1)]
    assert tok.meta["corpus"] == "fineweb" and tok.meta["trained_docs"] == 100
    n = len(server.requests)
    train_run_tokenizer(cfg, None, tmp_path / "tok")
    assert len(server.requests) == n
    # the CLI, one shard more, with a progress line
    code = 0
    try:
        main(["tokenizer", "train", "--corpus", "fineweb", "data.fineweb_shards=3", "--vocab-size", "300"])
    except SystemExit as e:
        code = e.code
    assert code in (0, None), capsys.readouterr().err
    assert "downloading 1 of the first 3 shards" in capsys.readouterr().out
    assert len(fineweb_shards()) == 3


def test_a_pipeline_on_fineweb_downloads_its_shards_instead_of_refusing(server, monkeypatch, capsys):
    """`nanorl pipeline ... data.corpus=fineweb` with no shard on disk yet: the checks before the run accept the
    corpus the run will download (data.fineweb_shards), and the tokenizer stage fetches it; with
    data.fineweb_shards=0 the same run is refused at once."""
    from nanorl.cli import main

    monkeypatch.setenv("NANORL_FINEWEB_URL", server.url)
    args = ["pipeline", "--preset", "tiny", "--only", "tokenizer", "data.corpus=fineweb", "model.vocab_size=300"]
    with pytest.raises(SystemExit) as e:
        main([*args, "data.fineweb_shards=0"])
    assert e.value.code == 1 and "no FineWeb-EDU shards" in capsys.readouterr().err and not server.requests
    code = 0
    try:
        main([*args, "data.fineweb_shards=2"])
    except SystemExit as e:
        code = e.code
    assert code in (0, None), capsys.readouterr().err
    assert [p.name for p in fineweb_shards()] == [shard_name(0), shard_name(1)]


def test_fineweb_shards_zero_downloads_nothing(server, monkeypatch):
    from nanorl.config import resolve
    from nanorl.data import open_run_corpus

    monkeypatch.setenv("NANORL_FINEWEB_URL", server.url)
    with pytest.raises(NanorlError, match="no FineWeb-EDU shards") as err:
        open_run_corpus(resolve(overrides=["data.corpus=fineweb", "data.fineweb_shards=0"]), None)
    assert "data.fineweb_shards" in err.value.hint and not server.requests


@pytest.mark.parametrize("var,value", [("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "true")])
def test_offline_variables_stop_a_hub_download_at_once(var, value, tmp_path, monkeypatch, capsys):
    """HF_HUB_OFFLINE / HF_DATASETS_OFFLINE (any true value): no request to the hub, no retries, one error saying
    how to go on (unset it, or put the shards where data.corpus=fineweb reads them); the shards on disk still do."""
    import io
    import urllib.request

    from rich.console import Console

    from nanorl.config import resolve
    from nanorl.data import fineweb_dir, open_run_corpus

    def no_network(*args, **kwargs):
        raise AssertionError("a request was made while offline")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.delenv("NANORL_FINEWEB_URL", raising=False)  # the hub's URL
    for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv(var, value)
    with pytest.raises(NanorlError, match=f"needs the network, and {var}={value}") as err:
        download_fineweb(2, retries=5, backoff=10.0)  # retried, this would take minutes
    assert f"unset {var}" in err.value.hint and str(fineweb_dir()) in err.value.hint
    assert not fineweb_dir().exists()  # refused before anything was made
    with pytest.raises(NanorlError, match="needs the network"):  # one shard, asked for directly
        download_shard(f"https://huggingface.co/x/{shard_name(0)}", tmp_path / shard_name(0), retries=5, backoff=10.0)
    # a run's own fetch (data.fineweb_shards) refuses before it says it is downloading
    cfg = resolve(overrides=["data.corpus=fineweb", "data.fineweb_shards=2"])
    with pytest.raises(NanorlError, match="downloading 2 FineWeb-EDU shards from the Hugging Face hub"):
        open_run_corpus(cfg, None, console=(console := Console(file=io.StringIO())))
    assert "downloading" not in console.file.getvalue()
    # shards already on disk need no network: offline, they are checked and used
    fineweb_dir().mkdir(parents=True)
    for i in range(2):
        (fineweb_dir() / shard_name(i)).write_bytes(_shard_bytes(tmp_path, i))
    assert [p.name for p in download_fineweb(2)] == [shard_name(0), shard_name(1)]
    assert len(list(open_run_corpus(cfg, None).docs())) == 100


def test_offline_variables_leave_a_mirror_of_your_own_alone(server, monkeypatch):
    """The offline variables close the Hugging Face hub, not a base URL of the user's own (a mirror, a local
    server): the conftest sets both, and the shards still come from the local server."""
    assert download_fineweb(1, base_url=server.url, backoff=0.01)[0].name == shard_name(0)
    assert server.requests == [(shard_name(0), None)]


def test_hub_rows_says_offline_for_any_true_value(monkeypatch):
    """hub_rows's error reads the offline variables as the Hugging Face libraries do (1, on, yes, true)."""
    datasets = pytest.importorskip("datasets")  # absent where only carried wheels are (a lent GPU's image)

    from nanorl.taskdata import hf_offline, hub_rows

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "True")
    with pytest.raises(NanorlError, match=r"offline and not cached \(HF_HUB_OFFLINE=True\)") as err:
        hub_rows("org/data", None, "train", hint="give --data-dir")
    assert err.value.hint == "give --data-dir"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert hf_offline() is None
    with pytest.raises(NanorlError, match="ConnectionError: Couldn't reach the hub"):
        hub_rows("org/data", None, "train", hint="give --data-dir")


def test_a_tasks_corpus_gets_the_data_folder_when_it_takes_one():
    """`data.corpus=task` passes `--data-dir` to a task's corpus(split, data_dir); a plugin written against the
    older corpus(split) keeps working (called without it), and so does one taking **kwargs."""
    from nanorl.api import Task
    from nanorl.data import open_corpus

    class Old(Task):
        name = "old"

        def corpus(self, split="train"):
            return iter([f"old {split}"])

    class New(Task):
        name = "new"

        def corpus(self, split="train", data_dir=None):
            return iter([f"new {split} {data_dir}"])

    class Kw(Task):
        name = "kw"

        def corpus(self, split="train", **kw):
            return iter([f"kw {split} {kw}"])

    docs = {t.name: list(open_corpus("task", task=t, split="dev", data_dir="/d").docs()) for t in (Old(), New(), Kw())}
    assert docs == {"old": ["old dev"], "new": ["new dev /d"], "kw": ["kw dev {'data_dir': '/d'}"]}
