"""The one error hierarchy: each class carries its HTTP status and a one-line reason.

    ProxyError (500)
    +-- ClientError (400)
    |   +-- BadRequest (400)           malformed input: multipart, names, versions, digests
    |   +-- FileExists (400)           "File already exists ..." (PyPI's contract, twine matches it)
    |   +-- Unauthorized (401)         missing or invalid credentials
    |   +-- Forbidden (403)            valid token, missing scope; upload collision rejected
    |   +-- NotFound (404)             unknown project or file; reserved names
    |   +-- NotAcceptable (406)        no representation fits the Accept header
    |   +-- RequestTimeout (408)       the client stalled while sending its body
    |   +-- TooLarge (413)             upload over limits.max_upload
    |   +-- TooManyRequests (429)      auth failures rate-limited
    +-- UpstreamUnavailable (502)      upstream down, timing out or broken, nothing stale to serve
    +-- ServiceUnavailable (503)       a check the request needs cannot be made now (fail closed)
    +-- InsufficientStorage (507)      the disk is full

Reasons end up in the HTTP reason phrase (twine prints only that), so they are
forced to one printable ASCII line here, once, for every raiser.
"""

from __future__ import annotations


def one_line(text: str, limit: int = 300) -> str:
    """Printable ASCII on one line: aiohttp answers 500 to CR/LF in a reason phrase."""
    cleaned = "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in text.replace("\n", " "))
    return cleaned[:limit]


def quoted(value: object, limit: int = 100) -> str:
    """Text a client or upstream sent, as it goes inside a reason: in double
    quotes, cut at limit, printable ASCII. Not a Python repr: `'x'` or `"it's"`
    and `\\x00` escapes mean nothing to the person reading twine's output."""
    text = str(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    return '"' + one_line(text).replace('"', "'") + '"'


class ProxyError(Exception):
    status = 500
    reason = "Internal server error"

    def __init__(self, reason: str | None = None) -> None:
        self.reason = one_line(reason if reason is not None else type(self).reason)
        super().__init__(self.reason)


class ClientError(ProxyError):
    status = 400
    reason = "Bad request"


class BadRequest(ClientError):
    status = 400


class FileExists(ClientError):
    status = 400
    reason = "File already exists"


class Unauthorized(ClientError):
    status = 401
    reason = "Authentication required"


class Forbidden(ClientError):
    status = 403
    reason = "Forbidden"


class NotFound(ClientError):
    status = 404
    reason = "Not found"


class NotAcceptable(ClientError):
    status = 406
    reason = "No acceptable content type"


class RequestTimeout(ClientError):
    status = 408
    reason = "Request body stalled; upload cut off"


class TooLarge(ClientError):
    status = 413
    reason = "Upload too large"


class TooManyRequests(ClientError):
    status = 429
    reason = "Too many failed authentication attempts; try again later"


class UpstreamUnavailable(ProxyError):
    status = 502
    reason = "Upstream index unavailable"


class ServiceUnavailable(ProxyError):
    """Refused because a check it depends on cannot be made now; retrying later may pass."""

    status = 503
    reason = "Service temporarily unavailable; try again later"


class InsufficientStorage(ProxyError):
    status = 507
    reason = "Insufficient storage on the proxy"
