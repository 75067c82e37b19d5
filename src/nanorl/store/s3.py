"""An S3 bucket (or any S3-compatible service: MinIO, R2, moto) as a store, through boto3.

Every failure is one `NanorlError` line naming the bucket and what to check (credentials, the bucket, the
endpoint), never a botocore traceback. Timeouts and retries are bounded: a request is tried 3 times (boto3's
standard mode: backoff, transient errors only) with a 5 s connect and a 30 s read timeout, so a dead endpoint
fails in seconds and a silent one in under two minutes; `check` (the pipeline's preflight) waits less.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from nanorl.api import NanorlError

# The preflight check's timeouts (two tries of each at most): a silent endpoint is reported in ~20 s
CHECK_CONNECT_TIMEOUT_S = 3
CHECK_READ_TIMEOUT_S = 10

CREDENTIAL_CODES = {
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden", "ExpiredToken",
    "InvalidToken", "TokenRefreshRequired", "InvalidClientTokenId",
}  # fmt: skip
ENDPOINT_ERRORS = {
    "EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ReadTimeoutError",
    "ConnectionError", "ProxyConnectionError", "SSLError",
}  # fmt: skip


def _cause(e: BaseException) -> BaseException:
    """The botocore error behind `e` (boto3's S3UploadFailedError wraps a ClientError without chaining it)."""
    seen = e
    for _ in range(8):  # a chain is short; bounded all the same
        if seen is None:
            break
        if isinstance(getattr(seen, "response", None), dict) or type(seen).__name__ in ENDPOINT_ERRORS:
            return seen
        seen = seen.__cause__ or seen.__context__
    return e


def _code(e: BaseException) -> str:
    """The S3 error code of `e` ('NoSuchBucket', 'InvalidAccessKeyId', '404', ...), or ''."""
    err = getattr(e, "response", None)
    if isinstance(err, dict):
        return str(err.get("Error", {}).get("Code", ""))
    m = re.search(r"An error occurred \((\w+)\)", str(e))
    return m.group(1) if m else ""


class S3Store:
    def __init__(self, bucket: str, prefix: str = ""):
        import boto3
        from botocore.config import Config

        self.bucket, self.prefix = bucket, prefix
        self.url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self._endpoint = os.environ.get("NANORL_S3_ENDPOINT") or None  # else boto3's AWS_ENDPOINT_URL, else AWS
        config = Config(retries={"total_max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=30)
        # a session of its own: boto3's default one keeps the credentials and settings it found first
        self._session = boto3.session.Session()
        self.client = self._session.client("s3", endpoint_url=self._endpoint, config=config)
        self.endpoint = self.client.meta.endpoint_url

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _hint(self, e: BaseException) -> str:
        name, code = type(e).__name__, _code(e)
        if name in ("NoCredentialsError", "PartialCredentialsError"):
            return "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or configure ~/.aws/credentials)"
        if name in ENDPOINT_ERRORS:
            return f"is the endpoint {self.endpoint} up? (NANORL_S3_ENDPOINT or AWS_ENDPOINT_URL); check the network"
        if code == "NoSuchBucket":
            return f"create the bucket {self.bucket} (aws s3 mb s3://{self.bucket}) or fix the store URL"
        if code in CREDENTIAL_CODES:
            return (
                f"the credentials were refused for bucket {self.bucket}: check AWS_ACCESS_KEY_ID,"
                " AWS_SECRET_ACCESS_KEY (AWS_SESSION_TOKEN) and the bucket's permissions"
            )
        if code in ("PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException"):
            return "the bucket is in another region: set AWS_DEFAULT_REGION to it"
        return f"check the bucket name {self.bucket}, its region, your credentials and the endpoint {self.endpoint}"

    def _fail(self, what: str, e: BaseException) -> NanorlError:
        cause = _cause(e)
        code = _code(cause)
        response = getattr(cause, "response", None)
        err = response.get("Error", {}) if isinstance(response, dict) else {}
        reason = f"{code}: {err.get('Message') or code}" if code else f"{type(cause).__name__}: {cause}"
        reason = " ".join(str(reason).split())  # one line
        return NanorlError(f"S3 {what} failed ({self.url}): {reason}", hint=self._hint(cause))

    def check(self) -> None:
        """Fail now, and fast, with what to fix when the bucket cannot be listed: no credentials, refused ones,
        no such bucket, an endpoint that is down (the pipeline calls it before anything is trained)."""
        from botocore.config import Config

        # two quick tries: a wrong endpoint is reported in seconds, before anything starts
        quick = Config(
            retries={"total_max_attempts": 2, "mode": "standard"},
            connect_timeout=CHECK_CONNECT_TIMEOUT_S,
            read_timeout=CHECK_READ_TIMEOUT_S,
        )
        try:
            client = self._session.client("s3", endpoint_url=self._endpoint, config=quick)
            client.list_objects_v2(Bucket=self.bucket, Prefix=self._key(""), MaxKeys=1)
        except Exception as e:
            raise self._fail("access", e) from None

    def put(self, local: str | Path, key: str) -> None:
        # upload_file goes multipart above 8 MB (parts retried on their own); boto3 >= 1.36 checksums each part
        try:
            self.client.upload_file(str(local), self.bucket, self._key(key))
        except Exception as e:
            raise self._fail(f"upload of {key}", e) from None

    def get(self, key: str, local: str | Path) -> None:
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(local.name + ".tmp")
        try:
            self.client.download_file(self.bucket, self._key(key), str(tmp))
        except Exception as e:
            tmp.unlink(missing_ok=True)
            raise self._fail(f"download of {key}", e) from None
        os.replace(tmp, local)

    def delete(self, key: str) -> None:
        try:  # (S3 answers a missing key with success too)
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as e:
            raise self._fail(f"deletion of {key}", e) from None

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except Exception as e:
            if _code(e) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._fail(f"lookup of {key}", e) from None

    def list(self, prefix: str = "") -> list[str]:
        keys = []
        strip = len(self.prefix) + 1 if self.prefix else 0
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._key(prefix))
            for page in pages:
                keys += [obj["Key"][strip:] for obj in page.get("Contents", [])]
        except Exception as e:
            raise self._fail("listing", e) from None
        return sorted(keys)
