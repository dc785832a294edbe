"""Errors the service raises for bad input or missing things; the HTTP layer maps them
to status codes and ``{"error": {"message", "type", "param", "code", "request_id"}}``
bodies."""

from __future__ import annotations

import errno


class ServiceError(Exception):
    status = 500
    kind = "internal_error"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidInputError(ServiceError):
    status = 400
    kind = "invalid_request_error"


class InvalidParameterError(InvalidInputError):
    status = 422


class PromptTooLongError(InvalidInputError):
    kind = "prompt_too_long"


class UnsupportedTypeError(InvalidInputError):
    status = 415
    kind = "unsupported_media_type"


class PayloadTooLargeError(InvalidInputError):
    status = 413
    kind = "payload_too_large"


class NotFoundError(ServiceError):
    status = 404
    kind = "not_found"


class ConflictError(ServiceError):
    status = 409
    kind = "conflict"


class DataDirError(ServiceError):
    """A data directory that this model or embedder cannot use."""

    kind = "data_dir_mismatch"


class StorageFullError(ServiceError):
    """A write the data directory had no room for: the disk or an LMDB map is full."""

    status = 507
    kind = "insufficient_storage"


class StorageBusyError(ServiceError):
    """Too many concurrent reads of a store; the same request may succeed shortly."""

    status = 503
    kind = "service_unavailable"
    retry_after_s = 1


_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def storage_failure(error: BaseException) -> ServiceError | None:
    """The error a user can act on for a storage failure (disk full, LMDB map full,
    LMDB readers exhausted), or None when ``error`` is none of these."""
    import lmdb

    if isinstance(error, lmdb.MapFullError):
        return StorageFullError(
            "a store in the data directory reached its LMDB map size (MDB_MAP_FULL); "
            "delete corpora or documents that are no longer needed, or clear the chunk "
            "cache (ragcache cache clear), then retry"
        )
    disk_full = isinstance(error, lmdb.DiskError) or (
        isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS
    )
    if disk_full:
        return StorageFullError(
            f"the disk holding the data directory is full ({error}); free space on it "
            "or move data_dir to a larger disk, then retry"
        )
    if isinstance(error, lmdb.ReadersFullError):
        return StorageBusyError(
            "too many reads of the data directory are in flight; retry in a moment"
        )
    return None
