"""A small client for Lambda Cloud's public API (v1): auth, the `{"data": ...}` envelope, errors, retries.

Standard library only (urllib). The base URL is configurable (`LAMBDA_API_URL`), which is how the tests point it
at a local fake server. Every failure becomes a `NanorlError` that says what to do:

- 429 (rate limit: about 1 request a second, one launch per 12 s) and 5xx (transient) are retried with
  exponential backoff, `Retry-After` honoured (seconds or a date; a wait over a minute is reported instead), up
  to `attempts` tries;
- the API's own errors (`{"error": {"code", "message", "suggestion"}}`) keep their message, and the codes a
  user can act on get a hint (a wrong key, an inactive account, the quota);
- an unreachable server says which URL it tried.
"""

from __future__ import annotations

import datetime
import email.utils
import http.client
import json
import math
import os
import re
import time
import urllib.error
import urllib.request
from typing import Any

from nanorl.api import NanorlError

DEFAULT_URL = "https://cloud.lambda.ai/api/v1"
KEY_HINT = "export LAMBDA_API_KEY=<key> (create one at https://cloud.lambda.ai/api-keys)"
# the longest `Retry-After` honoured by waiting (silently); a longer one ends the command with the wait in the hint
RETRY_AFTER_MAX_S = 60.0
HINTS = {
    "global/invalid-api-key": f"the key in LAMBDA_API_KEY is wrong or revoked: {KEY_HINT}",
    "global/account-inactive": "the Lambda account is inactive: check its billing at https://cloud.lambda.ai",
    "global/quota-exceeded": "terminate instances you no longer need (`nanorl cloud list`), or ask Lambda for more",
}


class LambdaAPIError(NanorlError):
    """An error answer of the API, with its code (`global/object-does-not-exist`, ...) and HTTP status."""

    def __init__(self, status: int, code: str, message: str, hint: str | None = None):
        # a 400 (a bad field) or 404 (no such instance, key or type) is the user's input: exit code 2
        super().__init__(f"Lambda API: {message} ({code})", hint=hint, exit_code=2 if status in (400, 404) else 1)
        self.status, self.code, self.detail = status, code, message


class LambdaClient:
    def __init__(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        attempts: int = 5,
        retry_wait: float = 1.0,
        timeout: float = 30.0,
    ):
        # stripped: a key pasted with its newline, or from an env file with CRLF ends: no HTTP header may hold those
        self.api_key = (api_key or os.environ.get("LAMBDA_API_KEY", "")).strip()
        if not self.api_key:
            raise NanorlError("no Lambda API key", hint=KEY_HINT)
        self.base_url = (base_url or os.environ.get("LAMBDA_API_URL") or DEFAULT_URL).rstrip("/")
        self.attempts, self.retry_wait, self.timeout = attempts, retry_wait, timeout

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: dict[str, Any], once: bool = False) -> Any:
        return self.request("POST", path, body, once=once)

    def request(self, method: str, path: str, body: dict[str, Any] | None = None, once: bool = False) -> Any:
        """The `data` of a successful answer; retries 429 and 5xx; raises LambdaAPIError or NanorlError.

        `once`: a request that must not run twice (a launch rents a machine). Only 429 is retried, which Lambda
        answers before doing anything; a 5xx or a timeout may come after the machine exists, so it is reported
        with that warning instead of sent again."""
        if not self.base_url.startswith(("http://", "https://")):
            raise NanorlError(f"LAMBDA_API_URL is not an http(s) URL: {self.base_url!r}", hint=f"e.g. {DEFAULT_URL}")
        url = f"{self.base_url}{path}"
        maybe_done = "it may have gone through all the same: check `nanorl cloud list` before launching again"
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {self.api_key}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        for attempt in range(1, self.attempts + 1):
            req = urllib.request.Request(url, data=data, method=method, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as e:
                status, retry_after = e.code, e.headers.get("Retry-After")
                try:
                    raw = e.read()
                except (OSError, http.client.HTTPException):  # an error body cut short: the status still says it
                    raw = b""
            # any failure of the connection (refused, reset, timed out, TLS, an answer cut short): never a traceback
            except (OSError, http.client.HTTPException) as e:
                reason = getattr(e, "reason", None) or str(e) or type(e).__name__
                raise NanorlError(
                    f"cannot reach the Lambda API at {self.base_url}: {reason}",
                    hint=maybe_done if once else "check the network, or LAMBDA_API_URL if you set it",
                ) from e
            else:
                try:
                    return _payload(raw)["data"]
                except NanorlError as e:
                    if once:  # an answer we cannot read to a launch: it may have gone through
                        e.hint = maybe_done
                    raise
            if status >= 500 and once:
                err = _error(status, raw)
                raise LambdaAPIError(status, err.code, err.detail, maybe_done)
            asked = _retry_after(retry_after)
            retry = (status == 429 or status >= 500) and attempt < self.attempts
            if retry and (asked is None or asked <= RETRY_AFTER_MAX_S):
                time.sleep(max(self.retry_wait * 2 ** (attempt - 1), asked or 0.0))
                continue
            err = _error(status, raw)
            if asked is not None and asked > RETRY_AFTER_MAX_S:  # longer than we wait unseen: say so, now
                err.hint = f"Lambda asks to wait {asked:.0f} s before the next request: run it again then"
            raise err
        raise AssertionError("unreachable")  # the loop returns or raises


def _retry_after(value: str | None) -> float | None:
    """Seconds a `Retry-After` header asks to wait: delay-seconds, or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:  # ("-0000": UTC)
            when = when.replace(tzinfo=datetime.timezone.utc)
        seconds = (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _payload(raw: bytes) -> dict[str, Any]:
    try:
        out = json.loads(raw)
    except ValueError as e:  # (not JSON, or not UTF-8)
        raise NanorlError(f"the Lambda API answered something that is not JSON: {raw[:200]!r}") from e
    if not isinstance(out, dict) or "data" not in out:
        raise NanorlError(f"the Lambda API answered without `data`: {str(out)[:200]}")
    return out


def _error(status: int, raw: bytes) -> LambdaAPIError:
    try:
        err = json.loads(raw).get("error")
    except (ValueError, AttributeError):  # (not JSON, not UTF-8, not an object)
        err = None
    if not isinstance(err, dict):  # a proxy's or an older API's error body: keep what it says as the message
        err = {"message": err} if isinstance(err, str) else {}
    code = _one_line(err.get("code")) or ("rate-limited" if status == 429 else f"http-{status}")
    message = _one_line(err.get("message")) or _body_text(raw) or f"HTTP {status}"
    hint = HINTS.get(code) or _one_line(err.get("suggestion")) or None
    # not the API's own error (no code): something in front of it, or a wrong URL
    if not err.get("code") and not hint and status < 500 and status != 429:
        hint = KEY_HINT if status == 401 else f"check LAMBDA_API_URL (default {DEFAULT_URL}) and any proxy between"
    if status == 429:
        hint = "Lambda allows about one request a second and one launch per 12 s: wait a moment and run it again"
    elif status >= 500 and not hint:
        hint = "Lambda's side failed repeatedly: try again in a few minutes"
    return LambdaAPIError(status, code, message, hint)


def _one_line(value: Any, limit: int = 300) -> str:
    """A text from the API as one line (an error is printed as one), cut to `limit` characters."""
    text = " ".join(str(value).split()) if value is not None else ""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _body_text(raw: bytes) -> str:
    """What a non-API error body (a gateway's page, plain text) says, as one line: an HTML page's title."""
    text = raw.decode(errors="replace")
    if "<html" in text[:500].lower() or text.lstrip().lower().startswith("<!doctype"):
        title = re.search(r"<title[^>]*>(.*?)</title>", text, re.IGNORECASE | re.DOTALL)
        return _one_line(title.group(1), 200) if title else ""
    return _one_line(text, 200)
