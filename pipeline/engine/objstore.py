"""An S3-compatible bucket, through obstore (Rust's object_store): the handful of calls the
store's remote tier makes (engine/remote.py).

Why obstore over fsspec/s3fs: each call the tier needs (streamed multipart put with a SHA-256
checksum per part that the server verifies, create-if-absent, HEAD, one-GET streamed download,
list, delete) is one call with typed errors; it is one small wheel with no botocore pin to fight
torch's stack or the test server's boto3; and it stays memory-flat on large files (16 MiB parts,
two in flight). Credentials: the standard AWS chain through boto3 when it is installed
(environment, profiles, SSO, container and instance roles), else obstore's own (environment,
web identity, container, instance). Nothing here logs or returns a credential; errors name the
bucket URL only.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from pipeline.engine.errors import KilnError

PART = 16 << 20       # multipart part size; also the download chunk
PARTS_IN_FLIGHT = 2   # memory of a transfer ~ PART x PARTS_IN_FLIGHT
# s3://bucket[/prefix]: S3 bucket naming rules, and a prefix of plain path segments (no '..',
# no empty segment, nothing a shell or URL would reinterpret)
URL = re.compile(r"s3://(?P<bucket>[a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(?P<prefix>[A-Za-z0-9_.=-]+(?:/[A-Za-z0-9_.=-]+)*))?/?")


class RemoteUnavailable(KilnError):
    """The bucket cannot be reached or refuses us (down, wrong endpoint, no credentials)."""


@dataclass(frozen=True)
class Listed:
    key: str            # relative to the bucket URL's prefix
    size: int
    modified: datetime


def parse_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of an s3:// URL, or a KilnError saying what a valid one looks like."""
    m = URL.fullmatch(url)
    if not m or ".." in (m["prefix"] or "").split("/"):
        raise KilnError(f"remote store URL {url[:200]!r} is not s3://bucket[/prefix] (bucket: 3-63 of a-z 0-9 . -; "
                        "prefix: path segments of A-Z a-z 0-9 _ . = -)")
    return m["bucket"], m["prefix"] or ""


class Bucket:
    """The objects under one s3://bucket/prefix. Keys given to its methods are relative to the prefix.
    A missing object is None (size, read) or FileNotFoundError (stream)."""

    def __init__(self, url: str, endpoint: str | None = None, timeout_s: float = 30.0, retries: int = 2):
        try:
            from obstore.store import S3Store
        except ImportError:
            raise KilnError(f"remote store {url[:200]}: the S3 client is not installed (setup.sh installs "
                            "pyproject's `remote` extra: obstore, boto3)") from None
        self.url = url.rstrip("/")
        bucket, self.prefix = parse_url(url)
        options: dict[str, Any] = {"timeout": f"{timeout_s:g}s", "connect_timeout": "5s"}
        config: dict[str, Any] = {"checksum_algorithm": "sha256"}
        if endpoint:
            if not re.fullmatch(r"https?://[A-Za-z0-9.-]+(:\d{1,5})?/?", endpoint):
                raise KilnError(f"S3 endpoint {endpoint[:200]!r} is not http(s)://host[:port]")
            config["endpoint"] = endpoint.rstrip("/")
            options["allow_http"] = endpoint.startswith("http://")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            config["region"] = region
        self._store = S3Store(bucket, prefix=self.prefix or None, config=config, client_options=options,
                              retry_config={"max_retries": retries, "retry_timeout": timedelta(seconds=timeout_s),
                                            "backoff": {"init_backoff": timedelta(milliseconds=100),
                                                        "max_backoff": timedelta(seconds=2), "base": 2}},
                              credential_provider=_credentials())

    # --- reads ---
    def size(self, key: str) -> int | None:
        """The object's size, or None when there is none."""
        import obstore

        try:
            return int(self._call(obstore.head, key)["size"])
        except FileNotFoundError:
            return None

    def read(self, key: str) -> bytes | None:
        """A small object's bytes (records, manifests), or None when there is none."""
        import obstore

        try:
            return bytes(self._call(obstore.get, key).bytes())
        except FileNotFoundError:
            return None

    def stream(self, key: str) -> Iterator[bytes]:
        """A large object in chunks of about PART bytes, from one GET (never the whole in memory)."""
        import obstore

        for chunk in self._call(obstore.get, key).stream(min_chunk_size=PART):
            yield bytes(chunk)

    def listing(self, prefix: str = "") -> Iterator[Listed]:
        import obstore

        base = f"{self.prefix}/" if self.prefix else ""
        for batch in self._call(obstore.list, prefix or None, chunk_size=1000):
            for meta in batch:
                yield Listed(meta["path"].removeprefix(base), int(meta["size"]), meta["last_modified"])

    # --- writes ---
    def upload(self, key: str, path: Path) -> None:
        """A file, streamed: multipart above PART bytes, every part SHA-256-checked by the server.
        A multipart upload the server no longer knows (NoSuchUpload: a completion whose reply was
        lost and was retried, or an upload aborted server-side) is RemoteUnavailable: the caller
        looks at what the bucket holds and tries again."""
        import obstore

        with open(path, "rb") as f:
            try:
                self._call(obstore.put, key, f, chunk_size=PART, max_concurrency=PARTS_IN_FLIGHT)
            except FileNotFoundError:
                raise RemoteUnavailable(f"remote store {self.url}: the multipart upload of {key} was lost "
                                        "(NoSuchUpload)") from None

    def create(self, key: str, data: bytes) -> bool:
        """Write `data` unless the key exists (the server decides: If-None-Match); False when it did."""
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        try:
            self._call(obstore.put, key, data, mode="create")
            return True
        except (AlreadyExistsError, PreconditionError):
            return False

    def delete(self, key: str) -> None:
        import obstore

        try:
            self._call(obstore.delete, key)
        except FileNotFoundError:
            pass

    def _call(self, fn, *args, **kwargs):
        """Run an obstore call; connection failures and refusals become RemoteUnavailable, naming
        the bucket URL (obstore's message can carry request details, never shown)."""
        from obstore.exceptions import (
            AlreadyExistsError,
            BaseError,
            PermissionDeniedError,
            PreconditionError,
            UnauthenticatedError,
        )

        try:
            return fn(self._store, *args, **kwargs)
        except (FileNotFoundError, AlreadyExistsError, PreconditionError):  # answers, not failures
            raise
        except (PermissionDeniedError, UnauthenticatedError) as e:
            raise RemoteUnavailable(f"remote store {self.url}: access refused ({type(e).__name__}); check the "
                                    "credentials in the environment or AWS profile") from None
        except (BaseError, OSError) as e:
            raise RemoteUnavailable(f"remote store {self.url}: {_reason(e)}") from None


def _reason(error: BaseException) -> str:
    """A short cause without request details (URLs with signatures, headers)."""
    text = str(error)
    for needle, reason in (("Connection refused", "connection refused"), ("dns error", "host not found"),
                           ("timed out", "timed out"), ("NoSuchBucket", "no such bucket"),
                           ("InvalidAccessKeyId", "unknown access key"),
                           ("SignatureDoesNotMatch", "credentials rejected")):
        if needle.lower() in text.lower():
            return reason
    return f"request failed ({type(error).__name__})"


def _credentials() -> Any:
    """boto3's whole credential chain when boto3 is installed; else None (obstore's own chain)."""
    try:
        import boto3
        from obstore.auth.boto3 import Boto3CredentialProvider
    except ImportError:
        return None
    session = boto3.Session()
    if session.get_credentials() is None:
        return None  # let obstore report the missing credentials on first use
    return Boto3CredentialProvider(session)
