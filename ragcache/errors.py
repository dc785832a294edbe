"""Errors the service raises for bad input or missing things; the HTTP layer maps them
to status codes and ``{"error": {"message", "type", "param"}}`` bodies."""

from __future__ import annotations


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
