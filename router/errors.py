"""Errors the router answers with, each mapped to an HTTP status and OpenAI's error body.

OpenAI's shape: `{"error": {"message": str, "type": str, "param": str|null, "code": str|null}}`.
"""

from __future__ import annotations

from typing import Any


class RouterError(Exception):
    """An error with an HTTP status; `body()` is what the client sees."""

    status_code = 500
    error_type = "server_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.param, self.code)

    def headers(self) -> dict[str, str]:
        return {}


class InvalidRequest(RouterError):
    """The request itself is wrong; retrying it unchanged cannot succeed."""

    status_code = 400
    error_type = "invalid_request_error"


class ModelNotFound(InvalidRequest):
    # OpenAI answers 404 for an unknown model; issue 4's acceptance asks for 400 (vLLM's old
    # behaviour), so the status is 400 and the code is OpenAI's `model_not_found`.
    def __init__(self, model: str, served: str) -> None:
        super().__init__(
            f"The model `{model}` does not exist; this server serves `{served}`.",
            param="model",
            code="model_not_found",
        )


class Unauthorized(RouterError):
    """No or a wrong bearer token (the API key of /v1/*, the admin key of /admin/*)."""

    status_code = 401
    error_type = "authentication_error"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class PayloadTooLarge(InvalidRequest):
    status_code = 413


class ServiceUnavailable(RouterError):
    """No worker can take the request now; the client should retry later."""

    status_code = 503
    error_type = "service_unavailable"

    def __init__(
        self, message: str, retry_after_s: int = 1, code: str = "service_unavailable"
    ) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class Overloaded(ServiceUnavailable):
    """Every healthy decode worker is saturated (router/admission.py): shed, retry later."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message, retry_after_s, code="overloaded")


class WorkerFailed(RouterError):
    """A worker failed the request after it was dispatched (gRPC status in the message)."""

    status_code = 502
    error_type = "server_error"


class DeadlineExceeded(RouterError):
    status_code = 504
    error_type = "timeout"


def error_body(
    message: str, error_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}
