"""How object-store failures map onto the storage error family, for both backends.

S3 error codes and botocore exceptions, and OS errors from fsspec filesystems, become
`TransientStorageError` (worth retrying), `PermanentStorageError` (report at once, never retry),
`ObjectNotFound` or a plain `StorageError`; messages name the bucket or URL, never credentials.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

from storage.errors import (
    ObjectNotFound,
    PermanentStorageError,
    StorageError,
    TransientStorageError,
)

# S3 codes that retrying cannot fix, with the words a person reads.
PERMANENT_CODES = {
    "AccessDenied": "access denied",
    "AllAccessDisabled": "access to the bucket is disabled",
    "InvalidAccessKeyId": "the access key ID is not known to the server (bad credentials)",
    "SignatureDoesNotMatch": "the request signature does not match (bad secret key)",
    "InvalidToken": "the session token is invalid",
    "ExpiredToken": "the session token has expired",
    "TokenRefreshRequired": "the session token must be refreshed",
    "AccountProblem": "the account has a problem",
    "InvalidBucketName": "the bucket name is invalid",
    "NoSuchBucket": "the bucket does not exist",
    "PermanentRedirect": "the bucket is in another region or endpoint",
    "AuthorizationHeaderMalformed": "the authorization header is malformed (wrong region?)",
}
# S3 codes worth retrying: throttling, server trouble, bytes damaged in transit.
TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "TooManyRequests",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "RequestLimitExceeded",
    "OperationAborted",
    # The server got bytes other than those we hashed: corruption in transit, resend.
    "BadDigest",
    "InvalidDigest",
    "XAmzContentSHA256Mismatch",
    # Our multipart upload vanished (aborted by a stale-upload sweep): upload the file again.
    "NoSuchUpload",
}
# How a server answers a conditional header it does not implement.
UNSUPPORTED_CODES = {"NotImplemented", "InvalidArgument", "InvalidRequest"}


def upload_gone(exc: Exception) -> bool:
    """Whether ``exc``, raised by an abort of a multipart upload, says the upload is gone.

    For an abort that is success (completed or aborted meanwhile, by us or a sweep), although
    ``NoSuchUpload`` on a part upload is transient (the file must be uploaded again).
    """
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return False
    code = exc.response.get("Error", {}).get("Code")
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return bool(code == "NoSuchUpload" or status == 404)


def s3_error(
    exc: Exception, op: str, where: str, *, endpoint_url: str, scrub: Callable[[str], str]
) -> StorageError:
    """Translate a botocore exception on ``op`` of ``where`` into the storage error family.

    ``scrub`` removes the access key from server-supplied text before it reaches a message.
    """
    from botocore import exceptions as bx

    if isinstance(exc, bx.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in PERMANENT_CODES:
            return PermanentStorageError(
                f"{op} {where}: {PERMANENT_CODES[code]} ({code}, HTTP {status}) at {endpoint_url}"
            )
        if code in TRANSIENT_CODES or status >= 500 or status in (408, 429):
            return TransientStorageError(f"{op} {where}: {code or 'error'} (HTTP {status})")
        if status == 403:
            return PermanentStorageError(
                f"{op} {where}: access denied (HTTP 403) at {endpoint_url}; check the "
                "credentials and the bucket policy"
            )
        if code in ("NoSuchKey", "404") or status == 404:
            return ObjectNotFound(f"{op} {where}: not found")
        msg = scrub(str(err.get("Message", "")))
        return PermanentStorageError(f"{op} {where}: {code} (HTTP {status}): {msg}")
    if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        return PermanentStorageError(
            f"{op} {where}: no usable AWS credentials found (environment, profile or instance role)"
        )
    transient = (
        bx.EndpointConnectionError,
        bx.ConnectTimeoutError,
        bx.ReadTimeoutError,
        bx.ConnectionClosedError,
        bx.ConnectionError,
        bx.ResponseStreamingError,
        bx.IncompleteReadError,
        bx.HTTPClientError,
    )
    if isinstance(exc, transient):
        return TransientStorageError(
            f"{op} {where}: {type(exc).__name__} talking to {endpoint_url}"
        )
    if isinstance(exc, OSError):
        # Raw socket errors while streaming a response body.
        return TransientStorageError(f"{op} {where}: {type(exc).__name__}: {exc.strerror or exc}")
    return StorageError(f"{op} {where}: {type(exc).__name__}: {scrub(str(exc))}")


def fsspec_error(exc: OSError, op: str, where: str) -> StorageError:
    """Translate an OS error of an fsspec filesystem on ``op`` of ``where``.

    A missing object is the caller's to report (it knows whether that is an answer or a fault).
    """
    if isinstance(exc, PermissionError):
        return PermanentStorageError(f"{op} {where}: permission denied")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return StorageError(f"{op} {where}: {exc.strerror}")
    return TransientStorageError(f"{op} {where}: {type(exc).__name__}: {exc.strerror or exc}")
