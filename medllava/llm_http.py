"""One chat-completions exchange over HTTP, and how each way it can fail is classified.

`Endpoint.post` makes a single attempt and sorts its failures for the client's retry loop
(`medllava.llm_client`): `TransientError` is worth retrying (rate limits, server errors, timeouts,
dropped connections), `RejectedError` is a failure of this one request, `EndpointError` means no
request can succeed (bad key, no access, wrong URL or model).

Why the standard library (urllib) and not the `openai` SDK: a chat-completions call is one JSON
POST, and the behaviour that matters here (which failures are retried, how long to wait, when to
give up, what is cached) has to be exact and testable against a loopback server. The SDK brings
its own retry loop with fixed backoff constants and its own timeout and error classes that differ
between versions, so we would have to switch most of it off and wrap the rest; with urllib every
one of those decisions is in this file or the client's, and there is no dependency to add.

The API key only ever goes into the Authorization header. Anything the server sends back (error text,
replies) is scrubbed of it, whole or in part, before it is shown, cached or written (`scrub_secret`).
"""

from __future__ import annotations

import email.utils
import http.client
import json
import socket
import time
import urllib.error
import urllib.request

# Statuses worth retrying: rate limits, request timeouts, conflicts and server-side errors.
RETRY_STATUSES = frozenset({408, 409, 429})
# Statuses after which no request can succeed (bad key, no access, wrong URL or model).
FATAL_STATUSES = frozenset({401, 403, 404})
_MAX_ERROR_CHARS = 300
# Error bodies are read well past the shown length so the key is masked before the text is cut:
# cutting first could leave the start of a key at the cut, where masking no longer recognises it.
_READ_ERROR_BODY = 1 << 16
_READ_CHUNK = 1 << 16
# A run of this many characters of the key is masked wherever it appears (a key cut or split by a
# server); shorter runs carry too little of the key to matter and would mask ordinary text.
MIN_SECRET_FRAGMENT = 8


class EndpointError(ConnectionError):
    """The endpoint is down, keeps failing, or refuses every request (bad key, wrong URL or model)."""


class TransientError(Exception):
    """A failure worth retrying; `retry_after` is the server's requested wait in seconds, if any."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.retry_after = retry_after


class RejectedError(Exception):
    """A failure of this request only (malformed reply, 4xx): counted, not retried, not cached."""


def scrub_secret(text: str, secret: str | None, min_fragment: int = MIN_SECRET_FRAGMENT) -> str:
    """`text` with `secret` masked as ***, and with every run of `min_fragment` or more of its
    characters (a cut or partial key) masked too."""
    if not secret or not text:
        return text
    m = min(min_fragment, len(secret))
    grams = {secret[i:i + m] for i in range(len(secret) - m + 1)}
    out, start, i = [], 0, 0
    while i <= len(text) - m:
        if text[i:i + m] not in grams:
            i += 1
            continue
        j = i + m
        while j < len(text) and text[i:j + 1] in secret:
            j += 1
        out += [text[start:i], "***"]
        start = i = j
    out.append(text[start:])
    return "".join(out)


def parse_retry_after(headers, now: float | None = None) -> float | None:
    """Seconds to wait from `retry-after-ms`, or `Retry-After` as seconds or an HTTP date."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        try:
            return max(0.0, float(headers[name]) / scale)
        except (KeyError, TypeError, ValueError):
            pass
    value = headers.get("retry-after")
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def parse_reply(raw: bytes) -> dict:
    """The fields we use from a chat-completions reply; raises RejectedError when they are missing."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise RejectedError(f"malformed reply: not JSON ({e})") from None
    choices = obj.get("choices") if isinstance(obj, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise RejectedError("malformed reply: no choices")
    message = choices[0].get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str):
        raise RejectedError("malformed reply: choices[0].message.content is not a string")
    usage = obj.get("usage") if isinstance(obj.get("usage"), dict) else {}
    return {"text": content,
            "prompt_tokens": _count(usage.get("prompt_tokens")),
            "completion_tokens": _count(usage.get("completion_tokens")),
            "finish_reason": choices[0].get("finish_reason")}


def _count(value) -> int:
    """A token count from `usage`; servers that omit or garble it count as zero, not as a failure."""
    try:
        return max(0, int(value or 0))
    except (TypeError, ValueError):
        return 0


class Endpoint:
    """POSTs JSON bodies to one chat-completions URL, one attempt per call.

    `api_key` (None for an endpoint without authentication) goes only into the Authorization header;
    `api_key_env` is its variable's name, used in the hint of a refused-key error.
    """

    def __init__(self, url: str, api_key: str | None, api_key_env: str | None, timeout_s: float):
        self.url = url
        self.timeout_s = timeout_s
        self._api_key = api_key
        self._api_key_env = api_key_env
        # Proxies come from http(s)_proxy / no_proxy as usual; redirects are refused, since
        # following one would resend the Authorization header to wherever it points.
        self._opener = urllib.request.build_opener(_NoRedirect)

    def __repr__(self) -> str:
        return f"Endpoint(url={self.url!r}, api_key_env={self._api_key_env!r})"

    def scrub(self, text: str) -> str:
        """`text` with the API key (whole or any run of 8+ of its characters) masked, for anything
        that is shown, logged, cached or written."""
        return scrub_secret(text, self._api_key)

    def post(self, body: bytes) -> bytes:
        """One HTTP attempt; returns the 2xx body or raises TransientError / RejectedError / EndpointError."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        deadline = time.monotonic() + self.timeout_s
        try:
            with self._opener.open(request, timeout=self.timeout_s) as response:
                return _read_until(response, deadline)
        except urllib.error.HTTPError as e:
            self._raise_for_status(e)
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise TransientError(f"timed out after {self.timeout_s}s") from None
            raise TransientError(f"connection failed: {self.scrub(str(reason))}") from None
        except (TimeoutError, socket.timeout):
            raise TransientError(f"timed out after {self.timeout_s}s") from None
        except (OSError, http.client.HTTPException) as e:  # refused, reset, TLS failures, bad status lines
            raise TransientError(f"connection failed: {type(e).__name__}: {self.scrub(str(e))}") from None

    def _raise_for_status(self, e: urllib.error.HTTPError):
        try:
            detail = e.read(_READ_ERROR_BODY).decode("utf-8", "replace")
        except (OSError, http.client.HTTPException):
            detail = ""
        finally:
            e.close()
        # Scrub the whole body, then cut: a substring of scrubbed text holds no run of the key either.
        detail = self.scrub(detail).strip()[:_MAX_ERROR_CHARS].strip()
        status = f"HTTP {e.code}" + (f": {detail}" if detail else "")
        if e.code in RETRY_STATUSES or e.code >= 500:
            raise TransientError(status, parse_retry_after(e.headers)) from None
        if e.code in FATAL_STATUSES or 300 <= e.code < 400:
            hint = ""
            if e.code in (401, 403):
                hint = f" (check the key in ${self._api_key_env})"
            elif e.code < 400:
                hint = " (redirects are not followed: give the final URL as the base URL)"
            raise EndpointError(f"endpoint {self.url} refused the request: {status}{hint}") from None
        raise RejectedError(f"request rejected: {status}") from None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # urllib then raises HTTPError with the 3xx status


def _read_until(response, deadline: float) -> bytes:
    """Read the body in chunks so a server that trickles bytes still hits the per-request limit."""
    chunks = []
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError("reply not finished before the deadline")
        chunk = response.read(_READ_CHUNK)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
