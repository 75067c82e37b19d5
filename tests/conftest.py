"""Test setup shared by every test: offline, isolated from the user's home, deterministic."""

import os

# Never reach the Hugging Face hub or wandb's servers from a test (wandb with a key and no mode hangs ~100 s).
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Every test gets its own NANORL_HOME, and the process-wide plugin set is rebuilt afterwards."""
    monkeypatch.setenv("NANORL_HOME", str(tmp_path / "nanorl-home"))
    yield
    from nanorl.plugins import reset_plugins

    reset_plugins()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(monkeypatch, env: dict[str, str] | None = None) -> tuple[str, subprocess.Popen]:
    """A moto S3 server on 127.0.0.1 in its own process (`env`: its extra environment, e.g.
    INITIAL_NO_AUTH_ACTION_COUNT=0 to check credentials), with this process's AWS settings pointed at it.
    Returns its URL and process; the caller stops it (`stop_moto`)."""
    pytest.importorskip("moto")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("moto server did not start")
    for k, v in {
        "NANORL_S3_ENDPOINT": url,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(k, v)
    return url, proc


def stop_moto(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def moto_server(monkeypatch):
    url, proc = start_moto(monkeypatch)
    yield url
    stop_moto(proc)


@pytest.fixture
def moto_factory(monkeypatch):
    """`start(env=None) -> (url, process)`: moto servers a test starts (and may kill) itself; stopped after it."""
    procs = []

    def start(env: dict[str, str] | None = None) -> tuple[str, subprocess.Popen]:
        url, proc = start_moto(monkeypatch, env)
        procs.append(proc)
        return url, proc

    yield start
    for proc in procs:
        stop_moto(proc)
