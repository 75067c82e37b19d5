"""The run store (`checkpoint.store`, `nanorl runs push/pull/list`, `eval --checkpoint s3://`) when things go wrong:
a bad configuration stops a pipeline at its preflight in one line; a store that fails mid-run leaves the mirror
behind (a warning) without stopping training, and catches up; a pull never hands over a checkpoint whose files
disagree with its state.json; a stage run afresh loses its DONE in the store first. S3 is moto's server."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from testkit import SMALL, cli_here

from nanorl import checkpoint as ckpt
from nanorl.api import NanorlError
from nanorl.config import resolve, run_dir
from nanorl.store import LocalStore, open_store
from nanorl.store import runs as store_runs
from nanorl.store.runs import checkpoint_mismatch, pull_run, push_run, run_files


def _free_port() -> int:  # (not conftest's: with the plugins' tests collected too, `conftest` is another module)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(name: str, *extra: str):
    return resolve(preset="tiny", overrides=[*SMALL, f"name={name}", "eval.samples=0", "rl.kl_every=0", *extra])


def _cli(*args: str, timeout: int = 120):
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "nanorl", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def _bucket(endpoint: str, name: str = "runs") -> None:
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)


def _fake_credentials(monkeypatch) -> None:
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(k, "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


def _fake_checkpoint(folder: Path, data: bytes = b"weights", step: int = 1) -> None:
    """A stage folder as a checkpoint looks to a store: model.safetensors and the state.json naming its sha256."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(data)
    files = {"model.safetensors": hashlib.sha256(data).hexdigest()}
    (folder / "state.json").write_text(json.dumps({"format": ckpt.FORMAT, "files": files, "step": step}))


# ---- 1. bad configuration: refused at the preflight, in one line, in seconds --------------------------------------
def test_store_urls_without_a_usable_bucket_are_refused_before_any_request():
    for url in ("s3://", "s3:///x", "s3://my bucket/x", "s3://b/x", "s3://bucket:9000/x"):
        with pytest.raises(NanorlError, match="invalid store URL") as e:
            open_store(url)
        assert e.value.exit_code == 2 and "s3://bucket/prefix" in e.value.hint
    for url, prefix in (("s3://bucket", ""), ("s3://bucket/", ""), ("s3://bucket/a/b/", "a/b")):
        assert open_store(url).prefix == prefix  # the bucket's root is a store too


def test_a_mistyped_s3_url_is_refused_not_taken_for_a_local_folder(tmp_path, monkeypatch):
    """`s3:/bucket/p` (one slash) was a relative folder `s3:/bucket/p`: `runs push` "pushed" there, and a pipeline
    on a rented machine mirrored to the disk that is deleted with it. Now one line saying what is wrong, exit 2."""
    monkeypatch.chdir(tmp_path)
    for url in ("s3:/bucket/p", "S3:/bucket/p", "s3//bucket/p", "s3:bucket", "gs:/bucket/p"):
        with pytest.raises(NanorlError, match="looks like a mistyped URL") as e:
            open_store(url)
        assert e.value.exit_code == 2 and "s3://bucket/prefix" in e.value.hint
    for url in ("store", "./s3/x", str(tmp_path / "a:b"), f"file://{tmp_path}/x"):  # folders stay folders
        assert isinstance(open_store(url), LocalStore)

    (run_dir("mine")).mkdir(parents=True)
    (run_dir("mine") / "run.toml").write_text("")
    for args in (("push", "mine", "s3:/runs/team"), ("pull", "s3//runs/team/mine", "--name", "x")):
        r = _cli("runs", *args)
        assert r.returncode == 2 and "looks like a mistyped URL" in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nanorl-home"]  # no folder `s3:` made


def _refused(cfg, match: str, hint: str) -> NanorlError:
    from nanorl.stages.runner import run_pipeline

    t0 = time.time()
    with pytest.raises(NanorlError, match=match) as e:
        run_pipeline(cfg)
    assert hint in (e.value.hint or ""), e.value
    assert "\n" not in str(e.value) and time.time() - t0 < 15
    assert not run_dir(cfg.name).exists()  # refused before run.toml, let alone a stage
    return e.value


@pytest.mark.slow
def test_a_bad_store_stops_the_pipeline_at_its_preflight(moto_factory, monkeypatch):
    endpoint, _ = moto_factory()
    _bucket(endpoint)
    _refused(_cfg("nob", "checkpoint.store=s3://no-such-bucket/x"), "NoSuchBucket", "create the bucket no-such-bucket")

    # a run of this name in the store, none here: mirroring into it would mix two runs
    store = open_store("s3://runs/team")
    (Path(os.environ["NANORL_HOME"]) / "x.toml").parent.mkdir(parents=True, exist_ok=True)
    (Path(os.environ["NANORL_HOME"]) / "x.toml").write_text("")
    store.put(Path(os.environ["NANORL_HOME"]) / "x.toml", "there/run.toml")
    err = _refused(_cfg("there", "checkpoint.store=s3://runs/team"), "holds a run 'there' already", "runs pull")
    assert err.exit_code == 2
    # eval --checkpoint s3://...: a prefix holding no such run says so (not "no finished model stage")
    from nanorl.cli.train_cmd import pull_stage

    with pytest.raises(NanorlError, match="no run 'nothing' in s3://runs/team") as e:
        pull_stage("s3://runs/team/nothing", Path(os.environ["NANORL_HOME"]) / "pulled")
    assert e.value.hint == "runs there: there"
    with pytest.raises(NanorlError, match="run 'there' in s3://runs/team has no finished model stage"):
        pull_stage("s3://runs/team/there", Path(os.environ["NANORL_HOME"]) / "pulled")

    # refused credentials (moto checking them), then none at all
    auth, _ = moto_factory({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    _refused(_cfg("auth", "checkpoint.store=s3://runs/team"), "InvalidAccessKeyId", "credentials were refused")
    monkeypatch.setenv("NANORL_S3_ENDPOINT", endpoint)
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(Path(os.environ["NANORL_HOME"]) / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(Path(os.environ["NANORL_HOME"]) / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    _refused(_cfg("nocreds", "checkpoint.store=s3://runs/team"), "NoCredentialsError", "set AWS_ACCESS_KEY_ID")

    # an endpoint nothing listens on (AWS_ENDPOINT_URL, boto3's own variable, works as NANORL_S3_ENDPOINT does)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.delenv("NANORL_S3_ENDPOINT")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")
    _refused(_cfg("down", "checkpoint.store=s3://runs/team"), "EndpointConnectionError", "is the endpoint")

    # and at the command line: one error line, one hint, no traceback
    r = _cli("pipeline", "--task", "arith", "--preset", "tiny", "checkpoint.store=s3://runs/team")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert [line.split(":")[0] for line in lines] == ["error", "hint"], r.stderr
    assert "is the endpoint" in lines[1]


@pytest.mark.slow
def test_an_endpoint_that_never_answers_fails_the_check_in_seconds(monkeypatch):
    """A silent endpoint (it accepts connections, then says nothing) failed after ~4 minutes of boto3's retries;
    the preflight's check gives up after two tries of its read timeout (10 s; 1 s here, to keep the test short)."""
    from nanorl.store import s3

    monkeypatch.setattr(s3, "CHECK_READ_TIMEOUT_S", 1)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    held = []
    threading.Thread(target=lambda: [held.append(srv.accept()) for _ in range(16)], daemon=True).start()
    monkeypatch.setenv("NANORL_S3_ENDPOINT", f"http://127.0.0.1:{srv.getsockname()[1]}")
    _fake_credentials(monkeypatch)
    t0 = time.time()
    with pytest.raises(NanorlError, match="ReadTimeoutError") as e:
        open_store("s3://runs/team").check()
    assert time.time() - t0 < 8 and "is the endpoint" in e.value.hint
    srv.close()


# ---- 2. failures mid-run: training goes on, the mirror says it is behind and catches up ------------------------------
class FlakyStore(LocalStore):
    """A folder store whose uploads fail while `fail(key)` says so (a transient error, an outage)."""

    def __init__(self, root, fail):
        super().__init__(root)
        self.fail, self.puts = fail, []

    def put(self, local, key):
        if self.fail(key):
            raise NanorlError(f"upload of {key} failed (simulated)", hint="check the network")
        self.puts.append(key)
        super().put(local, key)


def _pull_all(store, name: str, dest: Path) -> None:
    """Every checkpoint the store holds of run `name` is whole (pull_run checks each against its state.json)."""
    got = pull_run(store, name, dest)
    for folder in {k.rpartition("/")[0] for k in got if k.endswith("/state.json")}:
        assert checkpoint_mismatch(dest / folder) is None


@pytest.mark.slow
def test_a_failed_upload_mid_run_leaves_the_mirror_behind_and_it_catches_up(tmp_path, monkeypatch, capsys):
    from nanorl.stages.runner import run_pipeline

    tries = {"n": 0}

    def fail(key):  # the first checkpoint upload of mid fails twice (two syncs), then the store is fine
        if key.startswith("flaky/mid/") and tries["n"] < 2:
            tries["n"] += 1
            return True
        return False

    store = FlakyStore(tmp_path / "store", fail)
    monkeypatch.setattr("nanorl.store.open_store", lambda url: store)
    monkeypatch.setattr(store_runs.Mirror, "retry_delay", 0.0)
    results = run_pipeline(_cfg("flaky", f"checkpoint.store={tmp_path / 'store'}"))
    assert set(results) >= {"base", "mid", "sft", "rl", "eval"}  # the run went on
    err = capsys.readouterr().err
    assert "is behind: upload of flaky/mid/model.safetensors failed" in err and "caught up" in err
    local = run_dir("flaky")
    assert store.list("flaky/") == sorted(f"flaky/{f}" for f in run_files(local))  # whole again
    _pull_all(store, "flaky", tmp_path / "pulled")


@pytest.mark.slow
def test_a_store_that_goes_away_mid_run_does_not_stop_training(moto_factory, tmp_path, monkeypatch, capsys):
    """The S3 server dies after the tokenizer: every later stage trains all the same, the console says the mirror
    is behind (once, then at each retry), and the finished run fails with the command that completes the mirror;
    what did reach the store is consistent."""
    from nanorl.stages import runner

    endpoint, proc = moto_factory()
    _bucket(endpoint)
    stage_fn = runner._stage_fn

    def killing(stage):
        fn = stage_fn(stage)
        if stage != "base":
            return fn

        def run(ctx):
            proc.kill()
            proc.wait()
            return fn(ctx)

        return run

    monkeypatch.setattr(runner, "_stage_fn", killing)
    t0 = time.time()
    with pytest.raises(NanorlError, match="run gone finished, but its mirror in s3://runs/team is behind") as e:
        runner.run_pipeline(_cfg("gone", "checkpoint.store=s3://runs/team"))
    assert "nanorl runs push gone s3://runs/team" in e.value.hint
    assert time.time() - t0 < 120
    local = run_dir("gone")
    assert all(ckpt.is_done(local / s) for s in ("base", "mid", "sft", "rl", "eval"))  # trained to the end
    err = capsys.readouterr().err
    assert err.count("is behind: S3 upload of") == 1 and "Training goes on" in err


# ---- pull: never a checkpoint whose files disagree -------------------------------------------------------------------
def test_a_pull_refetches_a_checkpoint_caught_mid_upload(tmp_path, monkeypatch):
    monkeypatch.setattr(store_runs, "RETRY_WAITS", (0.0,))
    run = tmp_path / "run"
    (run / "run.toml").parent.mkdir(parents=True)
    (run / "run.toml").write_text("")
    _fake_checkpoint(run / "sft", b"v1", step=1)
    store = LocalStore(tmp_path / "store")
    push_run(run, store, "r")
    _fake_checkpoint(run / "sft", b"v2-longer", step=2)
    store.put(run / "sft" / "model.safetensors", "r/sft/model.safetensors")  # the writer is between its two files

    with pytest.raises(NanorlError, match="sft checkpoint of run 'r' in the store is not whole") as e:
        pull_run(store, "r", tmp_path / "a")
    assert "pull again" in e.value.hint

    class Finishing(LocalStore):  # the writer puts its state.json while the reader waits
        lists = 0

        def list(self, prefix=""):
            self.lists += 1
            if self.lists == 2:
                self.put(run / "sft" / "state.json", "r/sft/state.json")
            return super().list(prefix)

    pull_run(Finishing(tmp_path / "store"), "r", tmp_path / "b", stage="sft")
    assert json.loads((tmp_path / "b" / "sft" / "state.json").read_text())["step"] == 2
    assert checkpoint_mismatch(tmp_path / "b" / "sft") is None

    # a stage whose first checkpoint has not reached the store: said so, not a half folder
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").write_bytes(b"w")
    store.put(tmp_path / "m" / "model.safetensors", "r/rl/model.safetensors")
    with pytest.raises(NanorlError, match="has no rl checkpoint yet"):
        pull_run(store, "r", tmp_path / "c", stage="rl")


def test_runs_pull_replaces_a_run_whole_and_leaves_out_a_half_uploaded_checkpoint(tmp_path, monkeypatch, capsys):
    """`runs pull --force` used to write the pulled files over the local run's, keeping the old run's later
    stages (their DONE): `eval --checkpoint RUN` then took the old rl model. A checkpoint left half uploaded by a
    machine that died made every pull of the run fail ("pull again in a minute"), leaving half a run behind. Now
    --force replaces the run, a failed pull leaves nothing, and the half checkpoint is left out, said so."""
    monkeypatch.setattr(store_runs, "RETRY_WAITS", (0.0,))
    src = tmp_path / "src"
    (src / "run.toml").parent.mkdir(parents=True)
    (src / "run.toml").write_text("# the store's run\n")
    _fake_checkpoint(src / "base", b"base")
    (src / "base" / "DONE").write_text("{}")
    _fake_checkpoint(src / "sft", b"v1", step=1)
    store_dir = tmp_path / "store"
    push_run(src, LocalStore(store_dir), "r")
    _fake_checkpoint(src / "sft", b"v2-longer", step=2)  # the machine died between the two files of step 2
    LocalStore(store_dir).put(src / "sft" / "model.safetensors", "r/sft/model.safetensors")

    local = run_dir("r")  # a local run of that name, further on: its rl must not survive the pull
    _fake_checkpoint(local / "rl", b"old rl")
    (local / "rl" / "DONE").write_text("{}")
    (local / "run.toml").write_text("# the local run\n")
    code, _, err = cli_here(capsys, "runs", "pull", f"{store_dir}/r")
    assert code == 2 and "--force to replace it" in err
    code, out, err = cli_here(capsys, "runs", "pull", f"{store_dir}/r", "--force", "--json")
    assert code == 0, err
    assert json.loads(out)["left_out"] == ["sft"]
    assert "warning: the sft checkpoint in the store is not whole (model.safetensors is not the file" in err
    assert sorted(p.name for p in local.iterdir()) == ["base", "run.toml"]
    assert (local / "run.toml").read_text() == "# the store's run\n" and checkpoint_mismatch(local / "base") is None
    assert [p.name for p in local.parent.iterdir()] == ["r"]  # no temporary folder left

    # a run that a pipeline runs now (it holds run.lock) is not replaced under it
    import fcntl

    with open(local / "run.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 1 on host")
        held.flush()
        code, _, err = cli_here(capsys, "runs", "pull", f"{store_dir}/r", "--force")
        assert code == 1 and "run 'r' is in use by pid 1 on host" in err and (local / "base" / "DONE").is_file()
        # and a push of it says that it sends a snapshot of a run that trains
        code, _, err = cli_here(capsys, "runs", "push", "r", str(tmp_path / "other-store"))
        assert code == 0 and "warning: run 'r' is training now (pid 1 on host): this pushes a snapshot" in err
    (local / "run.lock").unlink()

    # a pull that fails half way (the network goes) leaves the local run as it was, and no temporary folder
    original_get = LocalStore.get

    def get(self, key, local):
        if key.startswith("r/base/"):
            raise NanorlError(f"download of {key} failed (simulated)")
        original_get(self, key, local)

    monkeypatch.setattr(LocalStore, "get", get)
    (store_dir / "r" / "run.toml").write_text("# changed\n")
    code, _, err = cli_here(capsys, "runs", "pull", f"{store_dir}/r", "--force")
    assert code == 1 and "download of r/base/model.safetensors failed" in err
    assert (local / "run.toml").read_text() == "# the store's run\n" and (local / "base" / "DONE").is_file()
    assert [p.name for p in local.parent.iterdir()] == ["r"]


def test_under_torchrun_only_rank_0_downloads_the_checkpoint_nanorl_train_starts_from(tmp_path, monkeypatch):
    """`nanorl train STAGE --checkpoint s3://...` under torchrun: every rank pulling into the one shared folder
    would race; rank 0 downloads, the others get the same path (and wait for rank 0 in the rendezvous)."""
    import nanorl.store
    from nanorl.cli.train_cmd import resolve_checkpoint

    run = tmp_path / "run"
    (run / "run.toml").parent.mkdir(parents=True)
    (run / "run.toml").write_text("")
    _fake_checkpoint(run / "sft", b"v1", step=1)
    (run / "sft" / "DONE").write_text("{}")
    store = LocalStore(tmp_path / "store")
    push_run(run, store, "r")
    monkeypatch.setattr(nanorl.store, "open_store", lambda url: store)
    for spec in ("s3://runs/team/r/sft", "s3://runs/team/r"):  # a stage named, or the last finished one
        work = tmp_path / spec.rsplit("/", 1)[1]
        monkeypatch.setenv("RANK", "1")
        other = resolve_checkpoint(spec, work)
        assert other == work / "r" / "sft" and not work.exists()
        monkeypatch.setenv("RANK", "0")
        assert resolve_checkpoint(spec, work) == other
        assert (other / "model.safetensors").read_bytes() == b"v1" and (work / "r" / "run.toml").is_file()


@pytest.mark.slow
def test_a_stage_run_afresh_loses_its_done_in_the_store_first(tmp_path, monkeypatch):
    """`--from rl` with a store: the store's rl/DONE goes before the new rl checkpoints arrive (else a pull of the
    run in progress would find rl finished, and a resume would skip it); the unchanged stages' checkpoints are not
    sent again."""
    from nanorl.stages.common import Interrupted
    from nanorl.stages.runner import run_pipeline

    url = str(tmp_path / "my store")  # a folder with a space in its name
    run_pipeline(_cfg("again", f"checkpoint.store={url}"))
    store = FlakyStore(url, lambda key: False)
    monkeypatch.setattr("nanorl.store.open_store", lambda u: store)
    with pytest.raises(Interrupted):
        run_pipeline(_cfg("again", f"checkpoint.store={url}"), from_stage="rl", stop_after={"rl": 1})
    assert not store.exists("again/rl/DONE") and ckpt.is_done(run_dir("again") / "sft")
    assert json.loads((Path(url) / "again" / "rl" / "state.json").read_text())["step"] == 1
    assert not [k for k in store.puts if k.endswith(".safetensors") and not k.startswith("again/rl/")]
    _pull_all(store, "again", tmp_path / "pulled")


# ---- runs list URL, and runs whose names prefix others' -------------------------------------------------------------
@pytest.mark.slow
def test_runs_list_shows_a_stores_runs_and_says_when_it_is_unreachable(tmp_path, monkeypatch):
    src = tmp_path / "src"
    for name, stages in (("a", ("base", "sft")), ("ab", ("base",))):
        (src / name).mkdir(parents=True)
        (src / name / "run.toml").write_text("")
        for s in stages:
            _fake_checkpoint(src / name / s)
        (src / name / "base" / "DONE").write_text("{}")
    url = tmp_path / "a store"
    store = open_store(str(url))
    for name in ("a", "ab"):
        push_run(src / name, store, name)
    store.put(src / "a" / "run.toml", "not-a-run/notes.txt")

    r = _cli("runs", "list", str(url), "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [(x["name"], x["done"], x["partial"]) for x in rows] == [("a", ["base"], ["sft"]), ("ab", ["base"], [])]
    r = _cli("runs", "pull", f"{url}/a", "--json")
    assert r.returncode == 0, r.stderr
    assert sorted(json.loads(r.stdout)["files"]) == sorted(run_files(src / "a"))  # none of ab's

    monkeypatch.setenv("NANORL_S3_ENDPOINT", f"http://127.0.0.1:{_free_port()}")
    _fake_credentials(monkeypatch)
    t0 = time.time()
    r = _cli("runs", "list", "s3://runs/team")
    assert r.returncode == 1 and "Traceback" not in r.stderr and time.time() - t0 < 30
    assert "error: S3 access failed (s3://runs/team): EndpointConnectionError" in r.stderr
    assert "hint: is the endpoint" in r.stderr
