"""The one error type of the server: an HTTP status, a stable code and a message for the client."""

from __future__ import annotations


class ServeError(Exception):
    """A request the server answers with `{"error": {"code": code, "message": message}}` and `status`.

    4xx statuses are the client's mistakes (bad prompt, unknown adapter, oversized image ...); 5xx the server's.
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
