"""An S3 bucket (or any S3-compatible service: MinIO, R2, moto) as a store, through boto3."""

from __future__ import annotations

import os
from pathlib import Path

from nanorl.api import NanorlError


def _hint(e: Exception) -> str:
    name = type(e).__name__
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or configure ~/.aws/credentials)"
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError"):
        return "check the endpoint (NANORL_S3_ENDPOINT / AWS_ENDPOINT_URL) and the network"
    return "check the bucket name, its region and your credentials"


class S3Store:
    def __init__(self, bucket: str, prefix: str = ""):
        import boto3
        from botocore.config import Config

        self.bucket, self.prefix = bucket, prefix
        endpoint = os.environ.get("NANORL_S3_ENDPOINT") or None
        # a few quick retries, bounded timeouts: a dead endpoint fails in seconds, not minutes
        config = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=60)
        self.client = boto3.client("s3", endpoint_url=endpoint, config=config)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _fail(self, what: str, e: Exception) -> NanorlError:
        return NanorlError(
            f"S3 {what} failed (s3://{self.bucket}/{self.prefix}): {type(e).__name__}: {e}", hint=_hint(e)
        )

    def put(self, local: str | Path, key: str) -> None:
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
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._fail(f"lookup of {key}", e) from None
        except Exception as e:
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
