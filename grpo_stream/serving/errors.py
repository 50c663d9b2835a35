"""The errors of a call to a vLLM server, and which of them are worth another try.

Every error names the server URL: `ServerHTTPError` (status and body), `ServerResponseError`
(the answer breaks the protocol), `ServerConnectionError` (refused, cut, or no answer by
the call's deadline), `ServerUnavailable` (no /health in time).

    except VLLMError as e:
        if is_transient(e): ...   # connection errors, 5xx, 429: retry, maybe elsewhere
"""

from __future__ import annotations

from grpo_stream.core.errors import UserError


class VLLMError(UserError, RuntimeError):
    """A vLLM server failed a call; the message starts with the server (or route) URL."""

    def __init__(self, message: str, url: str | None = None):
        super().__init__(f"{url}: {message}" if url else message)
        self.url, self.reason = url, message


class ServerHTTPError(VLLMError):
    def __init__(self, url: str, status: int, body: str):
        super().__init__(f"answered HTTP {status}: {body[:500]}", url)
        self.status, self.body = status, body


class ServerResponseError(VLLMError):
    """The server answered, but not with what the protocol promises."""


class ServerConnectionError(VLLMError):
    """No (complete) answer: connection refused or cut, or the call's deadline passed."""


class ServerUnavailable(VLLMError):
    """A vLLM server did not answer /health in time."""


# Errors worth a retry on the same or another server; ServerHTTPError only for 5xx/429
# (vLLM answers 503 to new requests while paused in abort/wait mode).
TRANSIENT_ERRORS: tuple[type[VLLMError], ...] = (ServerConnectionError, ServerHTTPError)


def is_transient(err: BaseException) -> bool:
    if isinstance(err, ServerHTTPError):
        return err.status >= 500 or err.status == 429
    return isinstance(err, TRANSIENT_ERRORS)
