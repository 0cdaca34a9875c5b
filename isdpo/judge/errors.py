"""The judge's failures; no message ever holds the API key."""
from __future__ import annotations


class JudgeError(RuntimeError):
    """Base class of judge failures. Messages never contain the API key."""


class JudgeHTTPError(JudgeError):
    """A non-retryable HTTP status (4xx other than 429): bad request, auth, unknown model."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class JudgeRetryError(JudgeError):
    """Retries exhausted on 429 / 5xx / connection errors / timeouts."""


class JudgeResponseError(JudgeError):
    """A 200 response that is not a chat-completions JSON object."""

