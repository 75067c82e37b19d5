"""The `lambda` cloud backend: rent a GPU machine on Lambda Cloud, start a nanorl command on it, follow it, end it.

What `launch` does, in order, so that a mistake fails before anything is billed:
1. reads the instance types: the type must exist and have capacity in the region asked (or, with no region, in
   some region, the first of which is taken); otherwise the error names the regions that have it now;
2. picks the SSH key: the one named, or the account's only key (the API takes exactly one);
3. launches with a cloud-init script (`user_data`) that writes the run's environment to `~/.nanorl.env` (mode
   600), writes `~/nanorl-run.sh` (the setup, then the command, all output to `~/nanorl.log`), and starts it in
   tmux (nohup where tmux is missing);
4. waits until the API shows the new instance (a just-launched id can be unknown for a few seconds); from the
   launch's answer on, every error names the instance, which is billed until terminated.

A machine can end itself (`--end-when-done`, `--end-after HOURS`): the launch tags it with a random run tag, and
`~/nanorl-end.py` (standard-library Python, with the API's URL, the key and the tag in it, mode 700) terminates
the instance that carries the tag: from the run script once the command has ended, or from a watchdog that
cloud-init starts, after the time limit. Lambda bills a machine until it is terminated, shut down or not, which
is why this goes through the API, and why the key must travel to the machine for it.

`logs` reads the end of `~/nanorl.log` over SSH (the machine's user is `ubuntu`; your key must be in the agent or
`~/.ssh`). The environment travels in the user data, which Lambda keeps with the instance: pass short-lived
tokens.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import shlex
import subprocess
import time
import urllib.parse
from typing import Any

from nanorl.api import CloudBackend, Estimate, Instance, InstanceType, LaunchSpec, NanorlError
from nanorl_lambda.client import LambdaAPIError, LambdaClient

USER = "ubuntu"  # the login of Lambda's default image
LOG = "~/nanorl.log"
LOG_LINES = 200
NAME_MAX = 64  # the API's limit on an instance name
USER_DATA_MAX = 1_000_000  # the API's limit on user_data, in bytes
ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# how long launch waits for a new id to become visible, and between looks
VISIBLE_TIMEOUT_S, VISIBLE_POLL_S = 60.0, 2.0
# a launch whose outcome is unknown (interrupted, or an answer without an id): the machine may exist
MAYBE_LAUNCHED = "a machine may have been launched all the same: check `nanorl cloud list` (billed until terminated)"
RUN_TAG = "nanorl-run"  # the tag by which a machine that ends itself finds its own instance id
END_CALL = f"python3 ~/nanorl-end.py '{{why}}' >> {LOG} 2>&1"  # (why: a fixed text of ours, no quotes)
# ~/nanorl-end.py: standard-library Python 3 that terminates the instance carrying this run's tag. It retries for
# ten minutes (rate limits, a network blip) and says in the log what it did, or that the user must.
END_SCRIPT = """#!/usr/bin/env python3
# written by `nanorl cloud launch`: ends this machine through Lambda's API (why: argv[1])
import json, sys, time, urllib.request

URL, KEY, TAG, RETRY_S = {url!r}, {key!r}, {tag!r}, {retry_s!r}


def call(method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    headers = {{"Authorization": "Bearer " + KEY, "Content-Type": "application/json"}}
    with urllib.request.urlopen(urllib.request.Request(URL + path, data, headers, method=method), timeout=30) as r:
        return json.load(r)["data"]


why = sys.argv[1] if len(sys.argv) > 1 else "asked"
for attempt in range(10):
    try:
        tagged = {{"key": "{run_tag}", "value": TAG}}
        mine = [i["id"] for i in call("GET", "/instances") if tagged in (i.get("tags") or [])]
        if not mine:
            sys.exit("nanorl: no instance carries this run's tag: end this machine yourself (nanorl cloud terminate)")
        call("POST", "/instance-operations/terminate", {{"instance_ids": mine}})
        print("nanorl: ending this machine (" + why + "): " + ", ".join(mine), flush=True)
        sys.exit(0)
    except Exception as e:
        print("nanorl: could not end this machine yet (" + repr(e) + "), trying again", flush=True)
        time.sleep(RETRY_S)
sys.exit("nanorl: gave up ending this machine: end it yourself (nanorl cloud terminate)")
"""


class LambdaBackend(CloudBackend):
    name = "lambda"
    can_end_itself = True

    def __init__(self, client: LambdaClient | None = None):
        self._client = client

    @property
    def client(self) -> LambdaClient:
        # made on first use: `nanorl plugins list` must not need an API key
        if self._client is None:
            self._client = LambdaClient()
        return self._client

    # ---- the CloudBackend interface --------------------------------------------------------------------------
    def types(self) -> list[InstanceType]:
        out = []
        for name, entry in self.client.get("/instance-types").items():
            t = entry["instance_type"]
            regions = [r["name"] for r in entry.get("regions_with_capacity_available", [])]
            gpus = int((t.get("specs") or {}).get("gpus", 0))
            description = t.get("description") or t.get("gpu_description") or name
            out.append(InstanceType(name, description, t["price_cents_per_hour"] / 100, gpus, regions))
        return sorted(out, key=lambda t: (not t.regions_available, t.price_per_hour))

    def estimate(self, spec: LaunchSpec) -> Estimate:
        entry = self._type(spec.instance_type)
        price = entry["instance_type"]["price_cents_per_hour"] / 100
        hours = spec.max_hours if spec.max_hours is not None else 1.0
        regions = [r["name"] for r in entry.get("regions_with_capacity_available", [])]
        return Estimate(spec.instance_type, price, hours, round(price * hours, 2), regions)

    def launch(self, spec: LaunchSpec) -> Instance:
        types = self.client.get("/instance-types")
        entry = self._type(spec.instance_type, types)
        regions = [r["name"] for r in entry.get("regions_with_capacity_available", [])]
        if spec.region and spec.region not in regions:
            where = f"it has capacity in: {', '.join(regions)}" if regions else "it has no capacity anywhere now"
            raise NanorlError(f"no capacity for {spec.instance_type} in {spec.region}", hint=f"{where} (--region)")
        if not regions:
            raise NanorlError(
                f"no capacity for {spec.instance_type} in any region now",
                hint=f"types with capacity now: {', '.join(_with_capacity(types)) or 'none'} (`nanorl cloud types`)",
            )
        if spec.name and len(spec.name) > NAME_MAX:
            raise NanorlError(f"instance name longer than {NAME_MAX} characters: {spec.name!r}", exit_code=2)
        if spec.end_after_hours is not None and spec.end_after_hours <= 0:
            raise NanorlError(f"end after {spec.end_after_hours} hours: give a positive number", exit_code=2)
        ends = spec.end_when_done or spec.end_after_hours is not None
        tag = secrets.token_hex(8) if ends else None
        end = end_script(self.client.base_url, self.client.api_key, tag) if tag else None
        user_data = startup_script(spec, end)
        if len(user_data.encode()) > USER_DATA_MAX:
            raise NanorlError("the start-up script is over Lambda's 1 MB limit: pass less through --env", exit_code=2)
        body: dict[str, Any] = {
            "region_name": spec.region or regions[0],
            "instance_type_name": spec.instance_type,
            "ssh_key_names": [self._ssh_key(spec.ssh_key)],
            "user_data": user_data,
        }
        if spec.name:
            body["name"] = spec.name
        if tag:
            body["tags"] = [{"key": RUN_TAG, "value": tag}]
        if spec.image:
            body["image"] = {"family": spec.image}
        try:
            answer = self.client.post("/instance-operations/launch", body, once=True)
        except LambdaAPIError as e:
            if e.code != "instance-operations/launch/insufficient-capacity":
                raise
            # sold out between our look and the launch: say where it is free now
            try:
                free = self._type(spec.instance_type).get("regions_with_capacity_available", [])
                hint = f"{spec.instance_type} is free in: {', '.join(r['name'] for r in free) or 'nowhere right now'}"
            except NanorlError:  # (that second look failing must not hide the capacity error)
                hint = e.hint or "`nanorl cloud types` shows where each type is free"
            raise NanorlError(f"{e.detail} ({e.code})", hint=hint) from e
        except KeyboardInterrupt as e:  # Ctrl-C, or a signal the CLI raises as one (with its exit code)
            why, code = str(e) or "interrupted", getattr(e, "exit_code", 130)
            raise NanorlError(f"{why} while Lambda was launching", hint=MAYBE_LAUNCHED, exit_code=code) from None
        ids = answer.get("instance_ids") if isinstance(answer, dict) else None
        if not (isinstance(ids, list) and len(ids) == 1 and isinstance(ids[0], str) and ids[0]):
            # the machine may well exist: never drop what the API said
            raise NanorlError(
                f"Lambda's launch answer holds no single instance id: {str(answer)[:300]}", hint=MAYBE_LAUNCHED
            )
        instance_id = ids[0]
        # from here on a machine is rented: whatever goes wrong, the error names it
        billed = f"billed until terminated: nanorl cloud status {instance_id}; nanorl cloud terminate {instance_id}"
        try:
            return self._await_visible(instance_id)
        except KeyboardInterrupt as e:
            why, code = str(e) or "interrupted", getattr(e, "exit_code", 130)
            raise NanorlError(f"{why} after launching {instance_id}", hint=billed, exit_code=code) from None
        except NanorlError as e:
            why = (
                f"Lambda does not show it after {VISIBLE_TIMEOUT_S:g} s"
                if getattr(e, "status", None) == 404
                else e.message
            )
            raise NanorlError(f"launched {instance_id}, but cannot follow it: {why}", hint=billed) from e

    def status(self, instance_id: str) -> Instance:
        # quoted: an id as typed ("inst 1", "x?y") must be asked about as it is, not break or bend the URL
        return to_instance(self.client.get(f"/instances/{urllib.parse.quote(instance_id, safe='')}"))

    def list(self) -> list[Instance]:
        return [to_instance(i) for i in self.client.get("/instances")]

    def logs(self, instance_id: str) -> str:
        inst = self.status(instance_id)
        if not inst.ip:
            raise NanorlError(
                f"instance {instance_id} has no IP address yet ({inst.status})",
                hint=f"wait until it is active: nanorl cloud status {instance_id}",
            )
        ssh = shlex.split(os.environ.get("NANORL_SSH", "ssh"))
        opts = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=accept-new", "-o", "ConnectTimeout=15"]
        cmd = [*ssh, *opts, f"{USER}@{inst.ip}", f"tail -n {LOG_LINES} {LOG}"]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise NanorlError(f"cannot run ssh to read the log: {e}", hint="is an ssh client installed?") from e
        if out.returncode != 0:
            raise NanorlError(
                f"ssh {USER}@{inst.ip} failed ({out.returncode}): {out.stderr.strip()[-300:]}",
                hint=f"the private half of the instance's key ({', '.join(inst.extra.get('ssh_key_names', []))}) "
                "must be in your ssh agent or ~/.ssh; a new machine needs a minute before ssh answers",
            )
        return out.stdout

    def terminate(self, instance_id: str) -> Instance:
        answer = self.client.post("/instance-operations/terminate", {"instance_ids": [instance_id]})
        ended = answer.get("terminated_instances") if isinstance(answer, dict) else None
        mine = [i for i in ended or [] if isinstance(i, dict) and i.get("id") == instance_id]
        if not mine:  # never report an end that Lambda did not confirm: the machine may still be billed
            raise NanorlError(
                f"Lambda did not confirm terminating {instance_id}: {str(answer)[:300]}",
                hint=f"check nanorl cloud status {instance_id}, and terminate it again if it is still up",
            )
        return to_instance(mine[0])

    # ---- helpers ------------------------------------------------------------------------------------------------
    def _type(self, name: str, types: dict[str, Any] | None = None) -> dict[str, Any]:
        types = types if types is not None else self.client.get("/instance-types")
        if name not in types:
            raise NanorlError(
                f"Lambda has no instance type {name!r}",
                hint=f"types with capacity now: {', '.join(_with_capacity(types)) or 'none'} (`nanorl cloud types`)",
                exit_code=2,
            )
        return types[name]

    def _ssh_key(self, name: str | None) -> str:
        keys = [k["name"] for k in self.client.get("/ssh-keys")]
        if name:
            if name not in keys:
                raise NanorlError(f"no SSH key named {name!r} on this account", hint=f"keys: {', '.join(keys)}")
            return name
        if len(keys) == 1:
            return keys[0]
        if not keys:
            raise NanorlError("this Lambda account has no SSH key", hint="add one at https://cloud.lambda.ai/ssh-keys")
        raise NanorlError(f"the account has {len(keys)} SSH keys", hint=f"pick one with --ssh-key: {', '.join(keys)}")

    def _await_visible(self, instance_id: str) -> Instance:
        deadline = time.monotonic() + VISIBLE_TIMEOUT_S
        while True:
            try:
                return self.status(instance_id)
            except LambdaAPIError as e:
                if e.status != 404 or time.monotonic() > deadline:
                    raise
            time.sleep(VISIBLE_POLL_S)


def _with_capacity(types: dict[str, Any]) -> list[str]:
    return sorted(t for t, e in types.items() if e.get("regions_with_capacity_available"))


def to_instance(d: dict[str, Any]) -> Instance:
    itype = d.get("instance_type") or {}
    cents = itype.get("price_cents_per_hour")
    return Instance(
        id=d["id"],
        status=d.get("status", "unknown"),
        instance_type=itype.get("name", ""),
        region=(d.get("region") or {}).get("name"),
        ip=d.get("ip"),
        name=d.get("name"),
        price_per_hour=cents / 100 if cents is not None else None,
        extra={k: d[k] for k in ("ssh_key_names", "hostname", "private_ip") if k in d},
    )


def end_script(url: str, key: str, tag: str) -> str:
    """~/nanorl-end.py for a machine tagged `tag`, calling the API at `url` with `key`."""
    retry_s = float(os.environ.get("NANORL_END_RETRY_S", "60"))  # (tests make it short)
    return END_SCRIPT.format(url=url, key=key, tag=tag, retry_s=retry_s, run_tag=RUN_TAG)


def env_file(spec: LaunchSpec) -> str:
    """~/.nanorl.env: one `KEY='value'` line per variable, shell-quoted, sourced by the run script."""
    for key in spec.env:
        if not ENV_KEY.match(key):
            raise NanorlError(f"not an environment variable name: {key!r}", exit_code=2)
    return "".join(f"{k}={shlex.quote(v)}\n" for k, v in spec.env.items())


def run_script(spec: LaunchSpec) -> str:
    """~/nanorl-run.sh: the environment, then `spec.setup` and `spec.command` with their output appended to
    ~/nanorl.log, which ends with the exit code, so `nanorl cloud logs` shows how the run ended; then, with
    `end_when_done`, ~/nanorl-end.py ends the machine."""
    # each on its own lines under `set -e`: a comment or a line continuation in one cannot swallow the other, and
    # a failed setup stops the run with its exit code
    steps = "\n".join(s for s in (spec.setup, spec.command) if s and s.strip())
    if not steps:
        raise NanorlError("nothing to run: give a command", exit_code=2)
    return f"""#!/bin/bash
set -a; . ~/.nanorl.env; set +a
cd ~
(
set -e
{steps}
) >> {LOG} 2>&1
echo "nanorl: the run ended with exit code $?" >> {LOG}
{END_CALL.format(why="the run ended") if spec.end_when_done else ""}"""


def startup_script(spec: LaunchSpec, end: str | None = None) -> str:
    """The cloud-init script (user_data): it writes the environment file and the run script (and `end`, the
    machine's way to end itself, as ~/nanorl-end.py, with its watchdog for `end_after_hours`), then starts the
    run in tmux (or nohup) as the image's user. The files travel base64-encoded, so no value or command can end
    a here-document early or be read by the root shell that writes them."""
    home = f"/home/{USER}"
    if (spec.end_when_done or spec.end_after_hours is not None) and end is None:
        raise NanorlError("ending the machine from inside needs the end script", exit_code=2)
    files = {".nanorl.env": env_file(spec), "nanorl-run.sh": run_script(spec)}
    if end is not None:
        files["nanorl-end.py"] = end
    writes = "\n".join(
        f"echo '{base64.b64encode(text.encode()).decode()}' | base64 -d > {home}/{name}" for name, text in files.items()
    )
    paths = " ".join(f"{home}/{name}" for name in files)
    watchdog = ""
    if spec.end_after_hours is not None:
        # detached from cloud-init's session, so it outlives it; it dies with a reboot (the docs say so)
        why = END_CALL.format(why=f"the time limit of {spec.end_after_hours:g} h")
        sleep = round(spec.end_after_hours * 3600)
        watchdog = f'su - {USER} -c "setsid nohup bash -c \\"sleep {sleep}; {why}\\" > /dev/null 2>&1 &"\n'
    return f"""#!/bin/bash
# written by `nanorl cloud launch`: the run's environment, then the run, started in tmux as {USER}
set -eu
umask 077
{writes}
chmod 700 {home}/nanorl-run.sh
chown {USER}:{USER} {paths}
{watchdog}if command -v tmux > /dev/null; then
  su - {USER} -c "tmux new-session -d -s nanorl {home}/nanorl-run.sh"
else
  su - {USER} -c "nohup {home}/nanorl-run.sh > /dev/null 2>&1 &"
fi
"""
