"""A fake Lambda Cloud API (v1) on 127.0.0.1 for the tests: no test may reach the real service.

It follows the contract in shared/reference/lambda-cloud-api.md, errors included: the `{"data": ...}` envelope,
`{"error": {"code", "message", "suggestion"}}` with the documented statuses, Bearer (or Basic `<key>:`) auth,
launch validation (exactly one SSH key, name <= 64 chars, user_data <= 1 MB, capacity per region).

Tests drive it through plain attributes: the catalogue (`instance_types`, `ssh_keys`), the `instances` it holds,
every request it saw (`requests`), queued forced failures (`fail_next`) for retry tests, and how long a new
instance stays invisible (`not_found_polls`) and booting (`boot_polls`) while it is polled. The contract's one
launch per 12 s is enforced when a test sets `launch_interval_s` (off by default, so that tests launch freely):
a launch sooner is answered 429, with `Retry-After` unless `rate_limit_retry_after` is off; `clock` is what
measures the interval, so a test can move time on instead of waiting.

    with FakeLambda() as fake:
        client = LambdaClient(api_key="test-key", base_url=fake.url)
        ...
        assert fake.instances["inst-0001"]["status"] == "terminated"
"""

from __future__ import annotations

import base64
import copy
import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

API_PREFIX = "/api/v1"

# Region names from the contract; the descriptions are only for display, so unknown ones fall back to the name.
REGIONS = {
    "us-west-1": "California, USA",
    "us-west-2": "Arizona, USA",
    "us-west-3": "Utah, USA",
    "us-east-1": "Virginia, USA",
    "us-east-2": "Washington DC, USA",
    "us-east-3": "Washington DC, USA",
    "us-south-1": "Texas, USA",
    "us-south-2": "North Texas, USA",
    "us-south-3": "Central Texas, USA",
    "us-midwest-1": "Illinois, USA",
    "us-midwest-2": "Ohio, USA",
    "europe-central-1": "Germany",
    "asia-south-1": "India",
    "asia-northeast-1": "Tokyo, Japan",
    "asia-northeast-2": "Seoul, South Korea",
    "australia-east-1": "Australia",
    "me-west-1": "Israel",
}

# The launch body's fields in this API version; anything else (a `quantity`, say) is refused, so a backend that
# sends a field the real API does not know fails here rather than in production.
LAUNCH_FIELDS = {
    "region_name",
    "instance_type_name",
    "ssh_key_names",
    "name",
    "hostname",
    "image",
    "user_data",
    "file_system_names",
    "tags",
}
NAME_LIMIT = 64
# "1 MB" is read as the stricter 10**6 bytes of UTF-8, so a backend that stays under it is safe either way.
USER_DATA_LIMIT = 1_000_000


def _region(name: str) -> dict[str, str]:
    return {"name": name, "description": REGIONS.get(name, name)}


def _instance_type(
    name: str, gpu: str, gpus: int, cents: int, vcpus: int, memory: int, storage: int, regions: list[str]
) -> dict[str, Any]:
    return {
        "instance_type": {
            "name": name,
            "description": f"{gpus}x {gpu}",
            "gpu_description": gpu,
            "price_cents_per_hour": cents,
            "specs": {"vcpus": vcpus, "memory_gib": memory, "storage_gib": storage, "gpus": gpus},
        },
        "regions_with_capacity_available": [_region(r) for r in regions],
    }


def default_instance_types() -> dict[str, dict[str, Any]]:
    """A fresh copy of the default catalogue: one cheap type, one single H100, and an 8x H100 with no capacity."""
    return {
        "gpu_1x_a10": _instance_type(
            "gpu_1x_a10", "A10 (24 GB PCIe)", 1, 75, 30, 200, 1400, ["us-east-1", "us-west-1"]
        ),
        "gpu_1x_h100_pcie": _instance_type(
            "gpu_1x_h100_pcie", "H100 (80 GB PCIe)", 1, 249, 26, 200, 1000, ["us-west-3"]
        ),
        "gpu_8x_h100_sxm5": _instance_type("gpu_8x_h100_sxm5", "H100 (80 GB SXM5)", 8, 2392, 208, 1800, 22000, []),
    }


def default_ssh_keys() -> list[dict[str, str]]:
    return [{"id": "key-1", "name": "laptop", "public_key": "ssh-ed25519 AAAA test"}]


def _actions(available: bool) -> dict[str, dict[str, Any]]:
    """An instance's `actions`: every one the contract names, each available or not."""
    return {a: {"available": available} for a in ("migrate", "rebuild", "restart", "cold_reboot", "terminate")}


def _public(value: Any) -> Any:
    """A deep copy without the private `_` keys, which are for tests only (`_user_data`) and never served."""
    if isinstance(value, dict):
        return {k: _public(v) for k, v in value.items() if not (isinstance(k, str) and k.startswith("_"))}
    if isinstance(value, list):
        return [_public(v) for v in value]
    return value


class ApiError(Exception):
    """An error answer: raised anywhere in a handler, turned into the contract's error body."""

    def __init__(
        self, status: int, code: str, message: str, suggestion: str | None = None, headers: dict | None = None
    ):
        super().__init__(message)
        self.status, self.code, self.message, self.suggestion = status, code, message, suggestion
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        error = {"code": self.code, "message": self.message}
        if self.suggestion:
            error["suggestion"] = self.suggestion
        return {"error": error}


def _invalid(message: str) -> ApiError:
    return ApiError(400, "global/invalid-parameters", message)


def _not_found(message: str) -> ApiError:
    return ApiError(404, "global/object-does-not-exist", message)


class FakeLambda:
    """A fake Lambda Cloud API on 127.0.0.1 (a free port), run in a daemon thread."""

    def __init__(self, api_key: str = "test-key"):
        self.api_key = api_key
        self.url = ""
        # One lock guards all the state below: handler threads take it; a test may too, though between requests
        # plain assignments are safe enough.
        self.lock = threading.Lock()
        self.instance_types: dict[str, dict[str, Any]] = default_instance_types()
        self.ssh_keys: list[dict[str, Any]] = default_ssh_keys()
        self.instances: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str, dict | None, dict]] = []
        # (status, error[, headers]): error is an object for the contract's body, None for a bare text body, a str
        # for that page (a gateway's HTML); headers, e.g. {"Retry-After": "2"}, go with the answer
        self.fail_next: list[tuple[int, dict | str | None]] = []
        self.boot_polls = 1
        self.launch_interval_s = 0.0
        self.rate_limit_retry_after = True
        self.clock = time.monotonic
        self._last_launch: float | None = None
        self.not_found_polls = 0
        self._polls: dict[str, int] = {}  # instance id -> GET /instances/{id} answered so far
        self._launched = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> FakeLambda:
        fake = self

        class Handler(_Handler):
            pass

        Handler.fake = fake
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        # daemon threads: a client that leaves a keep-alive connection open must not hang stop() or pytest's exit
        self._server.daemon_threads = True
        host, port = self._server.server_address[:2]
        self.url = f"http://{host}:{port}{API_PREFIX}"
        # a short poll interval: shutdown() waits for it, once per test that uses the fake
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-lambda", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeLambda:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- request handling (called with the lock held) --------------------------------------------------------

    def _authorized(self, headers: dict[str, str]) -> bool:
        value = next((v for k, v in headers.items() if k.lower() == "authorization"), "")
        scheme, _, credentials = value.partition(" ")
        if scheme.lower() == "bearer":
            return credentials.strip() == self.api_key
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(credentials.strip(), validate=True).decode()
            except (ValueError, UnicodeDecodeError):
                return False
            return decoded == f"{self.api_key}:"
        return False

    def _route(self, method: str, path: str, body: dict | None) -> Any:
        """The `data` payload for one authorized request, or an ApiError."""
        if method == "GET" and path == "/instance-types":
            return copy.deepcopy(self.instance_types)
        if method == "GET" and path == "/ssh-keys":
            return copy.deepcopy(self.ssh_keys)
        if method == "GET" and path == "/instances":
            # every instance, terminated ones too (they stay listed with their status, as the real API's do)
            return list(self.instances.values())
        if method == "GET" and path.startswith("/instances/") and path.count("/") == 2:
            return self._poll(path.removeprefix("/instances/"))
        if method == "POST" and path == "/instance-operations/launch":
            self._launch_rate_limit()
            return self._launch(body)
        if method == "POST" and path == "/instance-operations/terminate":
            return self._terminate(body)
        raise _not_found(f"no such endpoint: {method} {API_PREFIX}{path}")

    def _poll(self, instance_id: str) -> dict[str, Any]:
        instance = self.instances.get(instance_id)
        if instance is None:
            raise _not_found(f"instance {instance_id!r} does not exist")
        polls = self._polls.get(instance_id, 0) + 1
        self._polls[instance_id] = polls
        # a just-launched instance is 404 for a while on the real API; the backend must keep polling through it
        if polls <= self.not_found_polls:
            raise _not_found(f"instance {instance_id!r} does not exist")
        # the first `boot_polls` visible polls answer "booting" without an ip; the next one finds it active
        if instance.get("status") == "booting" and polls - self.not_found_polls > self.boot_polls:
            instance["status"] = "active"
            instance.setdefault("ip", f"192.0.2.{10 + self._ip_suffix(instance_id)}")
            instance.setdefault("private_ip", f"10.0.0.{10 + self._ip_suffix(instance_id)}")
        return instance

    def _ip_suffix(self, instance_id: str) -> int:
        # TEST-NET-1 addresses (192.0.2.0/24) can never be a real host; derived from the id so they stay stable
        digits = "".join(c for c in instance_id if c.isdigit())
        return int(digits) % 240 if digits else 0

    def _launch_rate_limit(self) -> None:
        now = self.clock()
        if self.launch_interval_s > 0 and self._last_launch is not None:
            left = self._last_launch + self.launch_interval_s - now
            if left > 0:
                headers = {"Retry-After": str(math.ceil(left))} if self.rate_limit_retry_after else None
                raise ApiError(429, "global/rate-limited", "Too many launch requests.", headers=headers)
        self._last_launch = now

    def _launch(self, body: dict | None) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise _invalid("the request body must be a JSON object")
        unknown = sorted(set(body) - LAUNCH_FIELDS)
        if unknown:
            raise _invalid(f"unknown field(s): {', '.join(unknown)}")
        for field in ("region_name", "instance_type_name", "ssh_key_names"):
            if field not in body or body[field] in (None, "", []):
                raise _invalid(f"{field} is required")
        for field in ("region_name", "instance_type_name"):
            if not isinstance(body[field], str):
                raise _invalid(f"{field} must be a string")
        keys = body["ssh_key_names"]
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise _invalid("ssh_key_names must be a list of strings")
        if len(keys) != 1:
            raise _invalid(f"ssh_key_names must contain exactly one SSH key name, got {len(keys)}")
        name = body.get("name")
        if name is not None and (not isinstance(name, str) or len(name) > NAME_LIMIT):
            raise _invalid(f"name must be a string of at most {NAME_LIMIT} characters")
        hostname = body.get("hostname")
        if hostname is not None and not isinstance(hostname, str):
            raise _invalid("hostname must be a string")
        user_data = body.get("user_data")
        if user_data is not None and (
            not isinstance(user_data, str) or len(user_data.encode("utf-8")) > USER_DATA_LIMIT
        ):
            raise _invalid(f"user_data must be a string of at most {USER_DATA_LIMIT} bytes")
        image = body.get("image")
        if image is not None and not (isinstance(image, dict) and len(image) == 1 and set(image) <= {"id", "family"}):
            raise _invalid('image must be {"id": ...} or {"family": ...}')
        file_systems = body.get("file_system_names", [])
        if not isinstance(file_systems, list) or not all(isinstance(f, str) for f in file_systems):
            raise _invalid("file_system_names must be a list of strings")
        tags = body.get("tags", [])
        if not isinstance(tags, list) or not all(
            isinstance(t, dict) and set(t) == {"key", "value"} and all(isinstance(v, str) for v in t.values())
            for t in tags
        ):
            raise _invalid('tags must be a list of {"key": str, "value": str}')
        region_name = body["region_name"]
        if region_name not in REGIONS:
            raise _invalid(f"region_name {region_name!r} is not a region")

        type_name = body["instance_type_name"]
        entry = self.instance_types.get(type_name)
        if entry is None:
            raise _not_found(f"instance type {type_name!r} does not exist")
        if not any(k.get("name") == keys[0] for k in self.ssh_keys):
            raise _not_found(f"SSH key {keys[0]!r} does not exist")
        regions = entry.get("regions_with_capacity_available", [])
        region = next((r for r in regions if r.get("name") == region_name), None)
        if region is None:
            elsewhere = ", ".join(r["name"] for r in regions) or "none"
            raise ApiError(
                400,
                "instance-operations/launch/insufficient-capacity",
                f"Not enough capacity to fulfill launch request for {type_name} in {region_name}.",
                f"Regions with capacity for {type_name} now: {elsewhere}.",
            )

        instance_id = self._new_id()
        self.instances[instance_id] = {
            "id": instance_id,
            "status": "booting",
            "ssh_key_names": list(keys),
            "file_system_names": list(file_systems),
            "region": dict(region),
            "instance_type": copy.deepcopy(entry["instance_type"]),
            "tags": copy.deepcopy(tags),
            "actions": _actions(available=True),
            "_user_data": user_data,
        }
        # the optional fields are absent when not set, as the contract has them (never null)
        if name is not None:
            self.instances[instance_id]["name"] = name
        if hostname is not None:
            self.instances[instance_id]["hostname"] = hostname
        return {"instance_ids": [instance_id]}

    def _new_id(self) -> str:
        # skip ids a test put into `instances` by hand
        while True:
            self._launched += 1
            instance_id = f"inst-{self._launched:04d}"
            if instance_id not in self.instances:
                return instance_id

    def _terminate(self, body: dict | None) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise _invalid("the request body must be a JSON object")
        ids = body.get("instance_ids")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
            raise _invalid("instance_ids is required: a non-empty list of instance ids")
        # all or nothing, so a 404 leaves every instance as it was
        missing = [i for i in ids if i not in self.instances]
        if missing:
            raise _not_found(f"instance(s) {', '.join(missing)} do not exist")
        terminated = []
        for instance_id in ids:
            instance = self.instances[instance_id]
            instance["status"] = "terminated"
            instance["actions"] = _actions(available=False)
            terminated.append(instance)
        return {"terminated_instances": terminated}


class _Handler(BaseHTTPRequestHandler):
    fake: FakeLambda  # set on a per-server subclass by FakeLambda.start
    # HTTP/1.1 keep-alive, as a real client library expects; every answer carries a Content-Length
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the tests' output stays clean

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def _handle(self, method: str) -> None:
        fake = self.fake
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length > 0 else b""
        body: Any = None
        malformed = False
        if raw.strip():
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                malformed = True
        path = urlsplit(self.path).path
        headers = dict(self.headers.items())
        with fake.lock:
            fake.requests.append((method, path, body, headers))
            forced = fake.fail_next.pop(0) if fake.fail_next else None
        if forced is not None:
            status, error, extra = (*forced, {}) if len(forced) == 2 else forced
            if isinstance(error, str):  # a page from something in front of the API (a gateway's HTML), as it is
                self._send(status, None, extra, error)
            else:
                self._send(status, {"error": error} if error is not None else None, extra)
            return
        extra: dict = {}
        with fake.lock:
            try:
                if not fake._authorized(headers):
                    raise ApiError(
                        401,
                        "global/invalid-api-key",
                        "API key was invalid, expired, or deleted.",
                        "Check your API key or create a new one, then try again.",
                    )
                if malformed:
                    raise _invalid("the request body is not valid JSON")
                if not (path == API_PREFIX or path.startswith(API_PREFIX + "/")):
                    raise _not_found(f"no such endpoint: {method} {path}")
                data = fake._route(method, path.removeprefix(API_PREFIX), body)
                status, payload = 200, {"data": _public(data)}
            except ApiError as e:
                status, payload, extra = e.status, e.body(), e.headers
        self._send(status, payload, extra)

    def _send(self, status: int, payload: dict | None, headers: dict | None = None, page: str | None = None) -> None:
        if page is not None:
            data, content_type = page.encode(), "text/html"
        elif payload is None:
            # a forced failure without an error object: a bare body, as a gateway in front of the API would send
            data, content_type = f"{status} {self.responses.get(status, ('error',))[0]}\n".encode(), "text/plain"
        else:
            data, content_type = json.dumps(payload).encode(), "application/json"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)
