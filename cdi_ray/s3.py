"""The S3 client: one per process, configured from the environment only, and its errors as OSErrors.

boto3's retries do the waiting: throttling (SlowDown, 503), other 5xx and dropped connections are
retried with exponential backoff and client-side rate limiting (botocore's "adaptive" mode);
403 and 404 are not retried. :func:`cdi_ray.storage` builds on this. This module imports no Ray.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager

#: Attempts per S3 request, the first included (``AWS_MAX_ATTEMPTS`` overrides).
S3_MAX_ATTEMPTS = 8
#: botocore's per-connection timeouts (seconds): connecting, and waiting on a socket read (a
#: whole read is bounded by :data:`cdi_ray.sources.reading.READ_TIMEOUT_S` on top).
S3_CONNECT_TIMEOUT_S, S3_READ_TIMEOUT_S = 10, 60

# ----------------------------------------------------------------------------------------------
_client_lock = threading.Lock()
_client: tuple[int, object] | None = None


def s3_client():
    """The process's boto3 S3 client, configured from the environment only."""
    global _client
    with _client_lock:
        if _client is None or _client[0] != os.getpid():
            import boto3
            from botocore.config import Config

            attempts = int(os.environ.get("AWS_MAX_ATTEMPTS") or S3_MAX_ATTEMPTS)
            cfg = Config(retries={"total_max_attempts": attempts, "mode": "adaptive"}, max_pool_connections=32,
                         connect_timeout=S3_CONNECT_TIMEOUT_S, read_timeout=S3_READ_TIMEOUT_S)
            _client = (os.getpid(), boto3.session.Session().client("s3", config=cfg))
        return _client[1]


def reset_client() -> None:
    """Forget the cached client (tests that change the endpoint between runs)."""
    global _client
    with _client_lock:
        _client = None


def _is_missing(exc: Exception) -> bool:
    return _code(exc) in _MISSING


_MISSING = ("404", "NoSuchKey", "NotFound", "NoSuchBucket")
_DENIED = ("403", "AccessDenied", "Forbidden", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch")


def _code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


class StorageError(OSError):
    """An S3 request that failed after boto3's retries (throttling, 5xx, connection resets are
    retried with exponential backoff first); the message names the URI and the S3 error."""


@contextmanager
def _s3_errors(uri: str):
    """Turn botocore's errors into OSErrors that say what to do: ``FileNotFoundError`` (404),
    ``PermissionError`` (403: the environment's credentials lack the permission), else
    :class:`StorageError` — so callers handle storage failures as the OSErrors they are."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as exc:
        code = _code(exc)
        if code in _MISSING:
            raise FileNotFoundError(f"{uri} does not exist") from None
        if code in _DENIED:
            raise PermissionError(f"{uri}: access denied ({code}) — grant the environment's credentials "
                                  "s3:GetObject / s3:ListBucket on it (s3:PutObject to write there)") from None
        raise StorageError(f"{uri}: S3 error {code or type(exc).__name__} after retries — {exc}") from None
    except BotoCoreError as exc:  # connection refused/reset, timeouts (after retries), checksum mismatch
        raise StorageError(f"{uri}: S3 request failed after retries — {type(exc).__name__}: {exc}") from None
