"""The Lambda backend and `nanorl cloud` against a fake Lambda API on 127.0.0.1 (fake_lambda.py): requests as
the contract wants them, errors a user can act on, retries, the start-up script run for real, the CLI end to end."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest

from nanorl.api import LaunchSpec, NanorlError
from nanorl_lambda import backend as backend_mod
from nanorl_lambda.backend import LambdaBackend, run_script, startup_script
from nanorl_lambda.client import LambdaAPIError, LambdaClient

sys.path.insert(0, str(Path(__file__).parent))
from fake_lambda import FakeLambda  # noqa: E402


@pytest.fixture
def fake():
    with FakeLambda() as f:
        yield f


@pytest.fixture
def lam(fake, monkeypatch):
    monkeypatch.setattr(backend_mod, "VISIBLE_POLL_S", 0.01)
    return LambdaBackend(LambdaClient(api_key="test-key", base_url=fake.url, retry_wait=0.01))


def _launch_bodies(fake) -> list[dict]:
    return [body for method, path, body, _ in fake.requests if path.endswith("/instance-operations/launch")]


def test_estimate_prices_the_hours_and_names_free_regions(lam):
    est = lam.estimate(LaunchSpec("gpu_1x_a10", command="", max_hours=3))
    assert (est.price_per_hour, est.hours, est.total) == (0.75, 3, 2.25)
    assert est.regions_available == ["us-east-1", "us-west-1"]
    with pytest.raises(NanorlError, match="no instance type 'gpu_9x_b900'") as e:
        lam.estimate(LaunchSpec("gpu_9x_b900", command=""))
    assert "gpu_1x_a10, gpu_1x_h100_pcie" in e.value.hint  # the types that have capacity now


def test_launch_sends_what_the_api_wants_and_waits_until_the_id_is_visible(lam, fake):
    fake.not_found_polls = 2  # a just-launched id is unknown for a moment
    spec = LaunchSpec("gpu_1x_a10", command="nanorl pipeline --task aqua --depth 8", name="run-1",
                      env={"WANDB_API_KEY": "s3cr3t 'quoted'"}, setup="pip install nanorl")  # fmt: skip
    inst = lam.launch(spec)
    assert (inst.id, inst.status, inst.instance_type, inst.region) == (
        "inst-0001",
        "booting",
        "gpu_1x_a10",
        "us-east-1",
    )
    (body,) = _launch_bodies(fake)
    # the first region with capacity; the account's only key, as a list of exactly one; the name
    assert (body["region_name"], body["ssh_key_names"], body["name"]) == ("us-east-1", ["laptop"], "run-1")
    blobs = re.findall(r"echo '([A-Za-z0-9+/=]+)' \| base64 -d", body["user_data"])
    env_file, run_script = (base64.b64decode(b).decode() for b in blobs)
    assert env_file == "WANDB_API_KEY='s3cr3t '\"'\"'quoted'\"'\"''\n"  # shell-quoted, sourced by the run
    assert "pip install nanorl\nnanorl pipeline --task aqua --depth 8\n" in run_script
    auth = {h.lower(): v for h, v in fake.requests[0][3].items()}["authorization"]
    assert auth == "Bearer test-key"


def test_launch_refuses_before_anything_is_billed(lam, fake):
    with pytest.raises(NanorlError, match="no capacity for gpu_1x_a10 in us-west-3") as e:
        lam.launch(LaunchSpec("gpu_1x_a10", command="x", region="us-west-3"))
    assert "us-east-1, us-west-1" in e.value.hint
    with pytest.raises(NanorlError, match="no capacity for gpu_8x_h100_sxm5 in any region") as e:
        lam.launch(LaunchSpec("gpu_8x_h100_sxm5", command="x"))
    assert "gpu_1x_a10" in e.value.hint
    with pytest.raises(NanorlError, match="no SSH key named 'desktop'"):
        lam.launch(LaunchSpec("gpu_1x_a10", command="x", ssh_key="desktop"))
    with pytest.raises(NanorlError, match="not an environment variable name"):
        lam.launch(LaunchSpec("gpu_1x_a10", command="x", env={"BAD-NAME": "1"}))
    with pytest.raises(NanorlError, match="longer than 64"):
        lam.launch(LaunchSpec("gpu_1x_a10", command="x", name="n" * 65))
    fake.ssh_keys.append({"id": "key-2", "name": "desktop", "public_key": "ssh-ed25519 BBBB"})
    with pytest.raises(NanorlError, match="has 2 SSH keys") as e:  # the API takes exactly one: we never guess
        lam.launch(LaunchSpec("gpu_1x_a10", command="x"))
    assert "laptop, desktop" in e.value.hint
    assert _launch_bodies(fake) == [] and fake.instances == {}


def test_a_type_sold_out_between_the_look_and_the_launch_names_where_it_is_free(lam, fake, monkeypatch):
    def sold_out(path, body, once=False):
        raise LambdaAPIError(400, "instance-operations/launch/insufficient-capacity", "Not enough capacity")

    monkeypatch.setattr(lam.client, "post", sold_out)
    with pytest.raises(NanorlError, match="Not enough capacity") as e:
        lam.launch(LaunchSpec("gpu_1x_a10", command="x"))
    assert e.value.hint == "gpu_1x_a10 is free in: us-east-1, us-west-1"

    def sold_out_then_down(path, body, once=False):
        fake.fail_next = [(503, None)] * 5  # the second look at the types fails too: the capacity error stays
        sold_out(path, body, once)

    monkeypatch.setattr(lam.client, "post", sold_out_then_down)
    with pytest.raises(NanorlError, match="Not enough capacity") as e:
        lam.launch(LaunchSpec("gpu_1x_a10", command="x"))
    assert "nanorl cloud types" in e.value.hint


def test_a_launched_machine_is_never_lost_track_of(lam, fake, monkeypatch):
    # Lambda accepted the launch, so the machine is billed: every later failure names it, and says how to end it
    monkeypatch.setattr(backend_mod, "VISIBLE_TIMEOUT_S", 0.05)
    fake.not_found_polls = 10**6  # never shows up within the wait
    with pytest.raises(NanorlError) as e:
        lam.launch(LaunchSpec("gpu_1x_a10", command="x"))
    assert not isinstance(e.value, LambdaAPIError)  # not "does not exist" (a 404 the CLI reads as a wrong id)
    assert "launched inst-0001, but cannot follow it: Lambda does not show it after" in e.value.message
    assert "nanorl cloud terminate inst-0001" in e.value.hint and e.value.exit_code == 1
    fake.not_found_polls = 0

    def down(instance_id):
        raise NanorlError("cannot reach the Lambda API at http://x: timed out")

    monkeypatch.setattr(lam, "status", down)
    with pytest.raises(NanorlError, match="launched inst-0002, but cannot follow it: cannot reach") as e:
        lam.launch(LaunchSpec("gpu_1x_a10", command="x"))
    assert "nanorl cloud terminate inst-0002" in e.value.hint

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lam, "status", interrupted)
    with pytest.raises(NanorlError, match="interrupted after launching inst-0003") as e:
        lam.launch(LaunchSpec("gpu_1x_a10", command="x"))
    assert e.value.exit_code == 130 and "nanorl cloud terminate inst-0003" in e.value.hint
    monkeypatch.setattr(lam.client, "post", interrupted)  # Ctrl-C while the launch itself is under way
    with pytest.raises(NanorlError, match="interrupted while Lambda was launching") as e:
        lam.launch(LaunchSpec("gpu_1x_a10", command="x"))
    assert e.value.exit_code == 130 and "nanorl cloud list" in e.value.hint


@pytest.mark.parametrize("answer", [{}, {"instance_ids": []}, {"instance_ids": ["inst-a", "inst-b"]}, ["inst-a"]])
def test_a_launch_answer_without_one_id_is_reported_not_a_crash(lam, fake, monkeypatch, answer):
    monkeypatch.setattr(fake, "_launch", lambda body: answer)
    with pytest.raises(NanorlError, match="launch answer holds no single instance id") as e:
        lam.launch(LaunchSpec("gpu_1x_a10", command="x"))
    assert "nanorl cloud list" in e.value.hint and str(answer) in e.value.message  # what Lambda said, kept


def test_an_api_error_keeps_its_message_and_gets_a_hint(lam, fake):
    bad = LambdaBackend(LambdaClient(api_key="wrong", base_url=fake.url))
    with pytest.raises(LambdaAPIError) as e:
        bad.list()
    assert (e.value.status, e.value.code) == (401, "global/invalid-api-key") and "LAMBDA_API_KEY" in e.value.hint
    with pytest.raises(LambdaAPIError, match="does not exist") as e:
        lam.status("inst-9999")
    assert e.value.status == 404
    fake.instances["inst-0001"] = {"id": "inst-0001", "status": "active"}
    for typed in ("inst 1", "inst-0001?x", "inst-0001#", "inst-0001/"):  # asked about as typed: no such id
        with pytest.raises(LambdaAPIError, match="does not exist") as e:
            lam.status(typed)
        assert fake.requests[-1][1] == "/api/v1/instances/" + quote(typed, safe="")
    fake.fail_next = [(400, {"code": "global/quota-exceeded", "message": "Quota exceeded for gpu_1x_a10"})]
    with pytest.raises(LambdaAPIError, match="Quota exceeded for gpu_1x_a10") as e:
        lam.list()
    assert "nanorl cloud list" in e.value.hint  # what to do about it


def test_rate_limits_and_server_errors_are_retried_then_reported(fake):
    client = LambdaClient(api_key="test-key", base_url=fake.url, attempts=3, retry_wait=0.01)
    fake.fail_next = [(429, {"code": "global/rate-limited", "message": "slow down"}), (502, None)]
    assert "gpu_1x_a10" in client.get("/instance-types")  # the third try answers
    fake.fail_next = [(503, None)] * 3
    with pytest.raises(LambdaAPIError, match="503") as e:
        client.get("/instance-types")
    assert e.value.status == 503 and "try again in a few minutes" in e.value.hint
    unreachable = LambdaClient(api_key="k", base_url="http://127.0.0.1:9/api/v1")
    with pytest.raises(NanorlError, match="cannot reach the Lambda API at http://127.0.0.1:9"):
        unreachable.get("/instances")
    monkey_env = {k: v for k, v in os.environ.items() if k != "LAMBDA_API_KEY"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "environ", monkey_env)
        with pytest.raises(NanorlError, match="no Lambda API key"):
            LambdaClient()


def test_an_error_is_one_line_whatever_the_body(fake):
    client = LambdaClient(api_key="test-key", base_url=fake.url, attempts=1)
    page = "<!DOCTYPE html>\n<html><head><title>cloud.lambda.ai | 502:\n Bad gateway</title><style>\nb{}</style>"
    fake.fail_next = [
        (502, None),  # a gateway's plain "502 Bad Gateway\n"
        (502, page + "</head><body>\n<h1>Bad gateway</h1>\n" + "x" * 5000 + "</body></html>"),
        (400, {"code": "global/invalid-parameters", "message": "Invalid\n  name", "suggestion": "Use\nfewer."}),
    ]
    messages = []
    for _ in range(3):
        with pytest.raises(LambdaAPIError) as e:
            client.get("/instances")
        messages.append((e.value.message, e.value.hint))
    assert messages[0][0] == "Lambda API: 502 Bad Gateway (http-502)"
    assert messages[1][0] == "Lambda API: cloud.lambda.ai | 502: Bad gateway (http-502)"  # the page's title
    assert messages[2] == ("Lambda API: Invalid name (global/invalid-parameters)", "Use fewer.")
    fake.fail_next = [(403, page.replace("502:\n Bad gateway", "Attention Required!"))]  # a firewall's page
    r = _cli(fake, "list")
    assert r.returncode == 1 and r.stderr.count("\n") == 2 and "Traceback" not in r.stderr  # error, hint
    assert r.stderr.startswith("error: Lambda API: cloud.lambda.ai | Attention Required! (http-403)\nhint: check")


def _slept(monkeypatch, fake=None) -> list[float]:
    """The client's waits, recorded instead of slept; each moves the fake's clock on by as much."""
    import types

    from nanorl_lambda import client as client_mod

    waits, now = [], [0.0]
    if fake is not None:
        fake.clock = lambda: now[0]

    def sleep(seconds):
        waits.append(seconds)
        now[0] += seconds

    monkeypatch.setattr(client_mod, "time", types.SimpleNamespace(sleep=sleep))
    return waits


def test_retry_after_is_honoured_in_every_form_and_a_long_one_reported(fake, monkeypatch):
    from datetime import datetime, timedelta, timezone
    from email.utils import format_datetime

    waits = _slept(monkeypatch)
    client = LambdaClient(api_key="test-key", base_url=fake.url, retry_wait=0.01)
    in_30_s = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    limited = {"code": "global/rate-limited", "message": "slow down"}
    fake.fail_next = [(429, limited, {"Retry-After": "1.5"}), (503, None, {"Retry-After": in_30_s})]
    assert "gpu_1x_a10" in client.get("/instance-types")
    assert waits[0] == 1.5 and 27 < waits[1] <= 30
    waits.clear()
    fake.fail_next = [(429, limited, {"Retry-After": "3600"})]  # an hour: not a silent wait, an error that says so
    with pytest.raises(LambdaAPIError, match="slow down") as e:
        client.get("/instance-types")
    assert waits == [] and "wait 3600 s" in e.value.hint


def test_launches_faster_than_one_per_12_s_wait_their_turn_and_launch_once(fake, monkeypatch):
    fake.launch_interval_s = 12  # the contract's limit
    waits = _slept(monkeypatch, fake)
    lam = LambdaBackend(LambdaClient(api_key="test-key", base_url=fake.url))  # the default backoff (1 s, doubling)
    monkeypatch.setattr(backend_mod, "VISIBLE_POLL_S", 0.01)
    lam.launch(LaunchSpec("gpu_1x_a10", command="x"))
    lam.launch(LaunchSpec("gpu_1x_a10", command="x"))  # at once: refused (429, Retry-After: 12), then accepted
    assert waits == [12] and len(fake.instances) == 2 and len(_launch_bodies(fake)) == 3
    waits.clear()
    fake.rate_limit_retry_after = False  # a 429 without Retry-After: the backoff alone outlasts the 12 s
    lam.launch(LaunchSpec("gpu_1x_a10", command="x"))
    assert waits == [1, 2, 4, 8] and len(fake.instances) == 3


def test_a_launch_is_never_sent_twice(fake):
    # a 5xx or a timeout can come after Lambda created the machine: a retry could rent a second one
    client = LambdaClient(api_key="test-key", base_url=fake.url, retry_wait=0.01)
    body = {"region_name": "us-east-1", "instance_type_name": "gpu_1x_a10", "ssh_key_names": ["laptop"]}
    fake.fail_next = [(502, None)]
    with pytest.raises(LambdaAPIError) as e:
        client.post("/instance-operations/launch", body, once=True)
    assert e.value.status == 502 and "nanorl cloud list" in e.value.hint
    assert len(_launch_bodies(fake)) == 1 and fake.instances == {}
    fake.fail_next = [(429, {"code": "global/rate-limited", "message": "slow down"})]  # refused before acting: retried
    assert client.post("/instance-operations/launch", body, once=True)["instance_ids"] == ["inst-0001"]
    sent = []
    lam = LambdaBackend(client)
    original = client.request
    client.request = lambda *a, **k: sent.append((a[:2], k.get("once", False))) or original(*a, **k)
    lam.launch(LaunchSpec("gpu_1x_a10", command="x"))
    assert (("POST", "/instance-operations/launch"), True) in sent  # the backend asks for it


def test_odd_answers_and_settings_are_clear_errors(fake):
    import http.server
    import threading

    class Proxy(http.server.BaseHTTPRequestHandler):  # an error body from something in front of the API
        def do_GET(self):
            self.send_response(401)
            self.end_headers()
            self.wfile.write(b'{"error": "Unauthorized"}')

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = LambdaClient(api_key="k", base_url=f"http://127.0.0.1:{server.server_address[1]}/api/v1")
        with pytest.raises(LambdaAPIError, match="Unauthorized") as e:
            client.get("/instances")
        assert e.value.status == 401
    finally:
        server.shutdown()
    with pytest.raises(NanorlError, match="LAMBDA_API_URL is not an http"):
        LambdaClient(api_key="k", base_url="cloud.lambda.ai/api/v1").get("/instances")


@pytest.fixture
def raw_server():
    """A server on 127.0.0.1 that answers every request with `answer[0]`: (status, headers, body, bytes to send)."""
    import http.server
    import threading

    answer = [(200, {}, b"", None)]

    class Raw(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            status, headers, body, sent = answer[0]
            self.send_response(status)
            for k, v in {"Content-Length": str(len(body)), **headers}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body[:sent])  # fewer bytes than Content-Length: an answer cut short
            self.close_connection = True

        do_GET = do_POST = _answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Raw)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield LambdaClient(api_key="k", base_url=f"http://127.0.0.1:{server.server_address[1]}/api/v1"), answer
    finally:
        server.shutdown()


def test_a_broken_connection_or_answer_is_a_clear_error(raw_server):
    client, answer = raw_server
    answer[0] = (200, {}, b'{"data": {"instance_ids": ["inst-1"]}}', 10)  # the connection drops mid-answer
    with pytest.raises(NanorlError, match="cannot reach the Lambda API") as e:
        client.get("/instances")
    assert "check the network" in e.value.hint
    with pytest.raises(NanorlError, match="cannot reach the Lambda API") as e:
        client.post("/instance-operations/launch", {}, once=True)
    assert "nanorl cloud list" in e.value.hint  # a launch whose answer was lost may have gone through
    answer[0] = (200, {}, b"<html>maintenance</html>", None)
    with pytest.raises(NanorlError, match="not JSON") as e:
        client.post("/instance-operations/launch", {}, once=True)
    assert "nanorl cloud list" in e.value.hint
    answer[0] = (200, {}, b"\xff\xfe", None)  # not even UTF-8
    with pytest.raises(NanorlError, match="not JSON"):
        client.get("/instances")


def test_a_key_read_from_a_file_works(fake, monkeypatch):
    # a key pasted with its newline, or from an env file with CRLF line ends: no HTTP header may hold either
    monkeypatch.setenv("LAMBDA_API_KEY", "test-key\r\n")
    monkeypatch.setenv("LAMBDA_API_URL", fake.url)
    assert LambdaBackend().list() == []
    monkeypatch.setenv("LAMBDA_API_KEY", " \n")
    with pytest.raises(NanorlError, match="no Lambda API key"):
        LambdaClient()


def test_status_list_terminate(lam, fake):
    fake.boot_polls = 2  # launch's own look is the first
    inst = lam.launch(LaunchSpec("gpu_1x_a10", command="x"))
    assert lam.status(inst.id).status == "booting"
    up = lam.status(inst.id)
    assert (up.status, up.ip, up.price_per_hour) == ("active", "192.0.2.11", 0.75)
    assert [i.id for i in lam.list()] == [inst.id]
    assert lam.terminate(inst.id).status == "terminated"
    assert fake.instances[inst.id]["status"] == "terminated"
    # the fake's instances have the contract's shape: optional fields absent (not null), every action named
    raw = fake.instances[inst.id]
    assert "name" not in raw and "hostname" not in raw and up.name is None
    assert set(raw["actions"]) == {"migrate", "rebuild", "restart", "cold_reboot", "terminate"}


@pytest.mark.parametrize("answer", [{"terminated_instances": []}, {}, {"terminated_instances": [{"id": "inst-9"}]}])
def test_a_terminate_lambda_does_not_confirm_is_an_error(lam, fake, monkeypatch, answer):
    inst = lam.launch(LaunchSpec("gpu_1x_a10", command="x"))
    monkeypatch.setattr(fake, "_terminate", lambda body: answer)
    with pytest.raises(NanorlError, match=f"Lambda did not confirm terminating {inst.id}") as e:
        lam.terminate(inst.id)
    assert f"nanorl cloud status {inst.id}" in e.value.hint


def test_logs_read_the_run_log_over_ssh(lam, fake, tmp_path, monkeypatch):
    fake.boot_polls = 2  # launch's own look is the first
    inst = lam.launch(LaunchSpec("gpu_1x_a10", command="x"))
    with pytest.raises(NanorlError, match="has no IP address yet"):
        lam.logs(inst.id)
    ssh = tmp_path / "fake-ssh"
    ssh.write_text('#!/bin/sh\necho "args: $*"\necho "base 10/100 loss 3.2"\n')
    ssh.chmod(0o755)
    monkeypatch.setenv("NANORL_SSH", str(ssh))
    out = lam.logs(inst.id)  # the second look finds it active
    assert "ubuntu@192.0.2.11 tail -n 200 ~/nanorl.log" in out and "base 10/100 loss 3.2" in out
    ssh.write_text("#!/bin/sh\necho 'Permission denied (publickey)' >&2\nexit 255\n")
    with pytest.raises(NanorlError, match="Permission denied") as e:
        lam.logs(inst.id)
    assert "laptop" in e.value.hint


def test_the_startup_script_runs_setup_then_command_with_the_environment(tmp_path):
    # the environment file and the run script as the start-up script writes them, then the run script run by bash;
    # a value with quotes, a dollar, a newline and the old here-document marker stays one inert value
    value = "a b'c$d\nNANORL_ENV\ntouch pwned"
    spec = LaunchSpec(
        "t", command='echo "cmd sees $TOKEN" && exit 3', setup="echo setting up  # a comment", env={"TOKEN": value}
    )
    script = startup_script(spec)
    # the lines that write the two files, run by bash as they are, into tmp_path instead of /home/ubuntu
    writes = [line.replace("/home/ubuntu", str(tmp_path)) for line in script.splitlines() if line.startswith("echo '")]
    assert len(writes) == 2
    env = {"HOME": str(tmp_path), "PATH": os.environ["PATH"]}
    subprocess.run(["bash", "-c", "\n".join(writes)], env=env, check=True, cwd=tmp_path, timeout=30)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".nanorl.env", "nanorl-run.sh"]
    subprocess.run(["bash", str(tmp_path / "nanorl-run.sh")], env=env, check=True, cwd=tmp_path, timeout=30)
    log = (tmp_path / "nanorl.log").read_text()
    assert log == f"setting up\ncmd sees {value}\nnanorl: the run ended with exit code 3\n"
    assert not (tmp_path / "pwned").exists()
    assert "umask 077" in script and "tmux new-session -d -s nanorl" in script
    failing = run_script(LaunchSpec("t", command="echo never", setup="false"))
    (tmp_path / "nanorl.log").unlink()
    (tmp_path / "nanorl-run.sh").write_text(failing)
    subprocess.run(["bash", str(tmp_path / "nanorl-run.sh")], env=env, check=True, cwd=tmp_path, timeout=30)
    assert (tmp_path / "nanorl.log").read_text() == "nanorl: the run ended with exit code 1\n"
    with pytest.raises(NanorlError, match="nothing to run"):
        startup_script(LaunchSpec("t", command="  "))


def _cli(fake, *args, stdin=None):
    env = {**os.environ, "LAMBDA_API_KEY": "test-key", "LAMBDA_API_URL": fake.url, "NANORL_CLOUD_POLL_S": "0.01",
           "COLUMNS": "200", "FOO": "from-shell"}  # fmt: skip
    return subprocess.run([sys.executable, "-m", "nanorl", "cloud", *args], capture_output=True, text=True,
                          env=env, timeout=60, stdin=stdin)  # fmt: skip


def test_cli_launch_waits_until_up_then_list_and_terminate(fake):
    r = _cli(fake, "types", "--json")
    assert r.returncode == 0, r.stderr
    found = [(t["name"], t["gpus"], t["price_per_hour"], t["regions_available"]) for t in json.loads(r.stdout)]
    assert found == [("gpu_1x_a10", 1, 0.75, ["us-east-1", "us-west-1"]), ("gpu_1x_h100_pcie", 1, 2.49, ["us-west-3"]),
                     ("gpu_8x_h100_sxm5", 8, 23.92, [])]  # fmt: skip
    r = _cli(fake, "types")
    assert r.returncode == 0 and "none now" in r.stdout and "1x H100" in r.stdout
    r = _cli(fake, "estimate", "gpu_1x_h100_pcie", "--hours", "4")
    assert r.returncode == 0 and "$2.49/h x 4 h = $9.96" in r.stdout and "us-west-3" in r.stdout
    r = _cli(fake, "launch", "gpu_1x_a10", "--yes", "-c", "echo hi", "--env", "FOO", "--env", "BAR=2", "--json",
             "--setup", "pip install ./nanorl")  # fmt: skip
    assert r.returncode == 0, r.stderr
    inst = json.loads(r.stdout)
    assert (inst["status"], inst["ip"]) == ("active", "192.0.2.11")
    blobs = re.findall(r"echo '([A-Za-z0-9+/=]+)' \| base64 -d", fake.instances[inst["id"]]["_user_data"])
    env_file, run_script = (base64.b64decode(b).decode() for b in blobs)
    assert env_file == "FOO=from-shell\nBAR=2\n" and "echo hi" in run_script
    r = _cli(fake, "list")
    assert r.returncode == 0 and "inst-0001" in r.stdout and "active" in r.stdout
    r = _cli(fake, "terminate", inst["id"], "--yes", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["status"] == "terminated"


def test_cli_asks_before_billing_and_explains_failures(fake):
    r = _cli(fake, "launch", "gpu_1x_a10", "--yes")
    assert r.returncode == 2 and "say how to install nanorl on the machine" in r.stderr
    r = _cli(fake, "launch", "gpu_1x_a10", "--setup", "true", stdin=subprocess.DEVNULL)  # no terminal, no --yes
    assert r.returncode == 2 and "confirm with --yes" in r.stderr and "Traceback" not in r.stderr
    assert "hint: run the command again with --yes" in r.stderr
    # a machine that would end itself at once: refused before the price is asked about, let alone paid
    asked = len(fake.requests)
    r = _cli(fake, "launch", "gpu_1x_a10", "--setup", "true", "--end-after", "0", stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and "--end-after 0: give a positive number of hours" in r.stderr, r.stderr
    assert len(fake.requests) == asked
    # no capacity (anywhere, or in the region asked for), a bad --env: said before the price is asked about
    r = _cli(fake, "launch", "gpu_8x_h100_sxm5", "--setup", "true", stdin=subprocess.DEVNULL)
    assert r.returncode == 1 and "no capacity for gpu_8x_h100_sxm5 now" in r.stderr, r.stderr
    assert "confirm" not in r.stderr and "nanorl cloud types" in r.stderr
    r = _cli(fake, "launch", "gpu_1x_a10", "--region", "nowhere-1", "--setup", "true", stdin=subprocess.DEVNULL)
    assert r.returncode == 1 and "no capacity for gpu_1x_a10 in nowhere-1 now" in r.stderr, r.stderr
    assert "it is free now in: " in r.stderr and "confirm" not in r.stderr
    r = _cli(fake, "launch", "gpu_1x_a10", "--yes", "--setup", "true", "--env", "NOT_IN_THIS_SHELL_XYZ")
    assert r.returncode == 2 and "no such variable in this shell" in r.stderr
    r = _cli(fake, "launch", "gpu_1x_a10", "--setup", "true", "--env", "1BAD=x", stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and "'1BAD' is not a variable name" in r.stderr and "hint: " in r.stderr
    assert "confirm" not in r.stderr
    assert not any(method == "POST" for method, *_ in fake.requests)  # nothing was launched
    r = _cli(fake, "terminate", "inst-0404", stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and "confirm with --yes" in r.stderr


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_launch_stopped_while_waiting_names_the_billed_machine(fake, sig):
    """Ctrl-C while waiting said "a stage resumes from its last checkpoint"; SIGTERM (`timeout`, a CI job's end)
    ended the command silently, the machine it had rented billed and never named. Both now name it, with the
    command that ends it, and exit as the shell reports the signal."""
    import signal
    import time

    fake.boot_polls = 10**6  # it never comes up
    env = {**os.environ, "LAMBDA_API_KEY": "test-key", "LAMBDA_API_URL": fake.url, "NANORL_CLOUD_POLL_S": "0.05"}
    args = [sys.executable, "-m", "nanorl", "cloud", "launch", "gpu_1x_a10", "--yes", "--setup", "true"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not any(p.startswith("/api/v1/instances/") for _, p, _, _ in fake.requests[-1:]):  # waiting: polling
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=30)
    (inst,) = fake.instances
    assert proc.returncode == 128 + getattr(signal, sig), err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and f"waiting for {inst} to boot" in lines[0], err
    assert lines[1] == f"hint: billed until it is terminated: nanorl cloud terminate {inst}"


def test_waiting_for_a_machine_stops_when_it_dies_or_takes_too_long(lam, fake, monkeypatch):
    from nanorl.cli.cloud_cmd import _wait_active

    monkeypatch.setenv("NANORL_CLOUD_POLL_S", "0.01")
    fake.boot_polls = 10**6  # it never comes up
    inst = lam.launch(LaunchSpec("gpu_1x_a10", command="x"))
    with pytest.raises(NanorlError, match=f"instance {inst.id} is still booting after") as e:
        _wait_active(lam, inst.id, timeout_min=0.002)
    assert "nanorl cloud terminate" in e.value.hint  # it is billed meanwhile
    fake.instances[inst.id]["status"] = "unhealthy"
    with pytest.raises(NanorlError, match=f"instance {inst.id} is unhealthy before it came up"):
        _wait_active(lam, inst.id, timeout_min=1)
    fake.boot_polls = 0
    fake.instances[inst.id]["status"] = "booting"
    assert _wait_active(lam, inst.id, timeout_min=1).status == "active"


def _files(user_data: str, home: Path) -> dict[str, str]:
    """The files the start-up script writes, decoded, and those write lines run by bash into `home`."""
    writes = [ln.replace("/home/ubuntu", str(home)) for ln in user_data.splitlines() if ln.startswith("echo '")]
    env = {"HOME": str(home), "PATH": os.environ["PATH"]}
    subprocess.run(["bash", "-c", "\n".join(writes)], env=env, check=True, cwd=home, timeout=30)
    return {p.name: p.read_text() for p in home.iterdir()}


def test_a_machine_ends_itself_when_the_run_ends_or_time_is_up(lam, fake, tmp_path, monkeypatch):
    import shlex

    monkeypatch.setenv("NANORL_END_RETRY_S", "0.01")
    env = {"HOME": str(tmp_path), "PATH": os.environ["PATH"]}
    # the time limit: cloud-init starts a detached watchdog that sleeps, then runs ~/nanorl-end.py
    inst = lam.launch(LaunchSpec("gpu_1x_a10", command="echo trained", setup="true", end_after_hours=0.5))
    (body,) = _launch_bodies(fake)
    ((tag,),) = [[t["value"] for t in body["tags"] if t["key"] == "nanorl-run"]]
    assert re.fullmatch(r"[0-9a-f]{16}", tag)
    files = _files(body["user_data"], tmp_path)
    assert sorted(files) == [".nanorl.env", "nanorl-end.py", "nanorl-run.sh"]
    assert "nanorl-end.py" not in files["nanorl-run.sh"]  # no end when done: only the limit
    assert "test-key" not in files[".nanorl.env"]  # the key is in the end script only, not in the run's env
    (line,) = [ln for ln in body["user_data"].splitlines() if "setsid" in ln]
    su, inner = shlex.split(line)[:4], shlex.split(line)[4]
    assert su == ["su", "-", "ubuntu", "-c"]
    payload = shlex.split(inner)[4]  # setsid nohup bash -c PAYLOAD > /dev/null 2>&1 &
    assert payload.startswith("sleep 1800; ")
    subprocess.run(["bash", "-c", payload.replace("sleep 1800", "true")], env=env, check=True, cwd=tmp_path)
    assert fake.instances[inst.id]["status"] == "terminated"
    log = (tmp_path / "nanorl.log").read_text()
    assert log == f"nanorl: ending this machine (the time limit of 0.5 h): {inst.id}\n"

    # when the run ends (whatever its exit code): the run script's last step; another machine's tag is not ours
    other = lam.launch(LaunchSpec("gpu_1x_a10", command="x"))
    done = lam.launch(LaunchSpec("gpu_1x_a10", command="echo trained; exit 4", setup="true", end_when_done=True))
    (tmp_path / "nanorl.log").unlink()
    for f in tmp_path.iterdir():
        f.unlink()
    body = _launch_bodies(fake)[-1]
    assert "setsid" not in body["user_data"]  # no time limit: no watchdog
    _files(body["user_data"], tmp_path)
    subprocess.run(["bash", str(tmp_path / "nanorl-run.sh")], env=env, check=True, cwd=tmp_path, timeout=30)
    assert (tmp_path / "nanorl.log").read_text() == (
        f"trained\nnanorl: the run ended with exit code 4\nnanorl: ending this machine (the run ended): {done.id}\n"
    )
    assert fake.instances[done.id]["status"] == "terminated" and fake.instances[other.id]["status"] != "terminated"

    # an API that keeps failing: it retries, then says in the log that the user must end it
    fake.stop()
    r = subprocess.run(["python3", str(tmp_path / "nanorl-end.py"), "why"], capture_output=True, text=True, env=env)
    assert r.returncode == 1 and r.stdout.count("could not end this machine yet") == 10
    assert "gave up ending this machine: end it yourself (nanorl cloud terminate)" in r.stderr


def test_cli_end_flags_price_the_limit_and_warn_when_nothing_is_kept(fake):
    r = _cli(fake, "launch", "gpu_1x_a10", "--yes", "--setup", "true", "-c", "echo hi", "--end-after", "2",
             "--end-when-done", "--no-wait")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "$1.50 for 2 h), ending itself after 2 h, ending itself when the command ends" in r.stdout
    assert "the machine's disk is deleted when it ends" in r.stderr
    (body,) = _launch_bodies(fake)
    assert body["tags"][0]["key"] == "nanorl-run" and "sleep 7200; " in body["user_data"]
    r = _cli(fake, "launch", "gpu_1x_a10", "--yes", "--setup", "true", "--json", "--end-when-done", "--no-wait",
             "-c", "nanorl pipeline --task aqua --depth 8 checkpoint.store=s3://b/p")  # fmt: skip
    assert r.returncode == 0 and json.loads(r.stdout)["id"] and "warning" not in r.stderr
