"""Client for OpenAI-compatible chat-completions endpoints, built for long batch runs.

Used by the teacher-written instruction sets and by the evaluation judge: the caller hands over
many requests and gets each result as it finishes, while the client keeps a fixed number in
flight, retries transient failures, and appends every reply to an on-disk cache so a killed run
resumes without paying for any reply twice.

Why the standard library (urllib) and not the `openai` SDK: a chat-completions call is one JSON
POST, and the behaviour that matters here (which failures are retried, how long to wait, when to
give up, what is cached) has to be exact and testable against a loopback server. The SDK brings
its own retry loop with fixed backoff constants and its own timeout and error classes that differ
between versions, so we would have to switch most of it off and wrap the rest; with urllib every
one of those decisions is in this file, and there is no dependency to add.

The API key is read from the environment variable whose *name* is configured. It is only ever put
in the Authorization header: it is not stored in the config, the cache, logs, reprs or error
messages (server error text is scrubbed of it before being shown).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import email.utils
import hashlib
import http.client
import json
import logging
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from medllava.io import JsonlLog, read_jsonl

log = logging.getLogger(__name__)

# Statuses worth retrying: rate limits, request timeouts, conflicts and server-side errors.
RETRY_STATUSES = frozenset({408, 409, 429})
# Statuses after which no request can succeed (bad key, no access, wrong URL or model).
FATAL_STATUSES = frozenset({401, 403, 404})
_MAX_ERROR_BODY = 300
_READ_CHUNK = 1 << 16


@dataclass(frozen=True)
class ClientConfig:
    """Where and how to call the endpoint. Holds the key's variable name, never the key."""

    base_url: str
    """Endpoint root, e.g. https://api.openai.com/v1 (`/chat/completions` is appended)."""
    model: str
    """Model name sent with every request."""
    api_key_env: str | None = "OPENAI_API_KEY"
    """Name of the environment variable holding the API key; empty or None sends no key."""
    concurrency: int = 4
    """Requests in flight at once."""
    timeout_s: float = 120.0
    """Per-attempt limit on the whole exchange (connect, send, read the reply)."""
    max_attempts: int = 6
    """Attempts per request before the endpoint is declared down."""
    backoff_s: float = 1.0
    """First retry delay; doubles on each retry, with random jitter."""
    backoff_max_s: float = 60.0
    """Ceiling for the exponential backoff."""
    retry_after_max_s: float = 300.0
    """Longest server-requested wait (Retry-After) that is honoured."""
    price_prompt_per_1k: float = 0.0
    """Price of 1000 prompt tokens, for the cost estimate."""
    price_completion_per_1k: float = 0.0
    """Price of 1000 completion tokens, for the cost estimate."""

    def __post_init__(self):
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base URL must start with http:// or https://, got {self.base_url!r}")
        if self.concurrency < 1 or self.max_attempts < 1 or self.timeout_s <= 0:
            raise ValueError("concurrency and max_attempts must be >= 1 and timeout_s > 0")

    @property
    def url(self) -> str:
        root = self.base_url.rstrip("/")
        return root if root.endswith("/chat/completions") else root + "/chat/completions"


@dataclass(frozen=True)
class ChatRequest:
    """One chat-completions request. `key` is the caller's name for it (a record id)."""

    key: str
    messages: list[dict]
    params: dict = field(default_factory=dict)
    """Sampling parameters sent as-is (temperature, max_tokens, ...)."""


@dataclass
class ChatResult:
    """The reply to one request (or why it failed), with its token usage."""

    key: str
    text: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    cached: bool = False
    attempts: int = 0
    error: str | None = None
    """Why this request failed (a malformed reply, a rejected request); None when it succeeded."""

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class UsageStats:
    """Running totals for one client; tokens and cost count only replies paid for in this run."""

    requests: int = 0
    sent: int = 0
    cached: int = 0
    failed: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    price_prompt_per_1k: float = 0.0
    price_completion_per_1k: float = 0.0

    @property
    def cost(self) -> float:
        return (self.prompt_tokens * self.price_prompt_per_1k
                + self.completion_tokens * self.price_completion_per_1k) / 1000.0

    def summary(self) -> str:
        return (f"requests {self.requests} (sent {self.sent}, from cache {self.cached}, failed {self.failed}, "
                f"retries {self.retries}); tokens prompt {self.prompt_tokens}, completion "
                f"{self.completion_tokens}; estimated cost {self.cost:.4f}")


class EndpointError(ConnectionError):
    """The endpoint is down, keeps failing, or refuses every request (bad key, wrong URL or model)."""


class _Transient(Exception):
    """A failure worth retrying; `retry_after` is the server's requested wait in seconds, if any."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.retry_after = retry_after


class _Rejected(Exception):
    """A failure of this request only (malformed reply, 4xx): counted, not retried, not cached."""


class _Cancelled(Exception):
    """The run was stopped while this request waited to retry."""


def request_hash(model: str, messages: list[dict], params: dict) -> str:
    """Cache key: SHA-256 of the canonical JSON of what decides the reply (never the API key)."""
    canonical = json.dumps({"model": model, "messages": messages, "params": params},
                           sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


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
    """The fields we use from a chat-completions reply; raises _Rejected when they are missing."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise _Rejected(f"malformed reply: not JSON ({e})") from None
    choices = obj.get("choices") if isinstance(obj, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise _Rejected("malformed reply: no choices")
    message = choices[0].get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str):
        raise _Rejected("malformed reply: choices[0].message.content is not a string")
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


class ResponseCache:
    """Append-only JSONL of successful replies keyed by request hash; survives being killed."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._log = JsonlLog(self.path)  # opening cuts off a half-written last line
        self._rows: dict[str, dict] = {}
        errors: list[str] = []
        for _, row in read_jsonl(self.path, skip_bad=True, errors=errors):
            if isinstance(row.get("hash"), str) and isinstance(row.get("text"), str):
                self._rows.setdefault(row["hash"], row)
        if errors:
            log.warning("cache %s: %d unreadable lines ignored (first: %s)", self.path, len(errors), errors[0])
        self._lock = threading.Lock()

    def get(self, h: str) -> dict | None:
        with self._lock:
            return self._rows.get(h)

    def put(self, h: str, key: str, reply: dict) -> None:
        row = {"hash": h, "key": key, **reply}
        with self._lock:
            if h not in self._rows:
                self._rows[h] = row
                self._log.append(row)

    def close(self) -> None:
        self._log.close()


class ChatClient:
    """Sends chat-completions requests concurrently, with retries, a reply cache and usage totals.

        with ChatClient(ClientConfig(base_url=url, model="gpt-4o"), cache_path="replies.jsonl") as client:
            for result in client.run(ChatRequest(r["id"], build_messages(r)) for r in records):
                ...  # result.text, or result.error for a request that failed on its own
    """

    def __init__(self, config: ClientConfig, cache_path: str | os.PathLike | None = None):
        self.config = config
        self._api_key = self._read_key(config.api_key_env)
        self.cache = ResponseCache(cache_path) if cache_path else None
        self.stats = UsageStats(price_prompt_per_1k=config.price_prompt_per_1k,
                                price_completion_per_1k=config.price_completion_per_1k)
        # Proxies come from http(s)_proxy / no_proxy as usual; redirects are refused, since
        # following one would resend the Authorization header to wherever it points.
        self._opener = urllib.request.build_opener(_NoRedirect)

    def __repr__(self) -> str:
        return (f"ChatClient(url={self.config.url!r}, model={self.config.model!r}, "
                f"api_key_env={self.config.api_key_env!r})")

    @staticmethod
    def _read_key(env_name: str | None) -> str | None:
        if not env_name:
            return None
        key = os.environ.get(env_name)
        if not key:
            raise ValueError(f"environment variable {env_name} (the API key) is not set; "
                             "for an endpoint without authentication pass an empty key variable name")
        return key

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()

    def __enter__(self) -> "ChatClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _scrub(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    def run(self, requests: Iterable[ChatRequest]) -> Iterator[ChatResult]:
        """Yield one ChatResult per request, in completion order (cache hits first, immediately).

        Identical requests in one run are sent once. When a request exhausts its attempts or the
        endpoint refuses the key, the replies already in flight are still yielded (and cached),
        then EndpointError is raised.
        """
        stop = threading.Event()  # set to cut short the retry waits of the workers
        pending: dict[cf.Future, list[str]] = {}
        by_hash: dict[str, cf.Future] = {}
        max_pending = 2 * self.config.concurrency
        with cf.ThreadPoolExecutor(self.config.concurrency, thread_name_prefix="llm") as pool:
            try:
                for req in requests:
                    self.stats.requests += 1
                    h = request_hash(self.config.model, req.messages, req.params)
                    hit = self.cache.get(h) if self.cache is not None else None
                    if hit is not None:
                        self.stats.cached += 1
                        yield _result_from(req.key, hit, cached=True)
                    elif h in by_hash and by_hash[h] in pending:
                        pending[by_hash[h]].append(req.key)
                    else:
                        future = pool.submit(self._send, req, h, stop)
                        pending[future], by_hash[h] = [req.key], future
                    while len(pending) >= max_pending:
                        yield from self._collect(pending, stop)
                while pending:
                    yield from self._collect(pending, stop)
            finally:
                stop.set()
                for future in pending:
                    future.cancel()

    def _collect(self, pending: dict[cf.Future, list[str]], stop: threading.Event) -> Iterator[ChatResult]:
        done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
        fatal = None
        for future in done:
            keys = pending.pop(future)
            try:
                result = future.result()
            except EndpointError as e:
                fatal = fatal or e
                continue
            yield from self._account(result, keys)
        if fatal is not None:
            # Stop retries and queued work, but keep every reply that still arrives.
            stop.set()
            for future in pending:
                future.cancel()
            done, _ = cf.wait(pending)
            for future in done:
                keys = pending.pop(future)
                if not future.cancelled() and future.exception() is None:
                    yield from self._account(future.result(), keys)
            pending.clear()
            raise fatal

    def _account(self, result: ChatResult, keys: list[str]) -> Iterator[ChatResult]:
        self.stats.sent += 1
        self.stats.cached += len(keys) - 1
        self.stats.retries += max(0, result.attempts - 1)
        if result.ok:
            self.stats.prompt_tokens += result.prompt_tokens
            self.stats.completion_tokens += result.completion_tokens
        else:
            self.stats.failed += len(keys)
        for i, key in enumerate(keys):
            # A duplicate of a request sent once in this run is served like a cache hit.
            yield result if i == 0 else dataclasses.replace(result, key=key, cached=True, attempts=0)

    def _send(self, req: ChatRequest, h: str, stop: threading.Event) -> ChatResult:
        """Worker: POST with retries; caches a success before returning it."""
        cfg = self.config
        body = json.dumps({**req.params, "model": cfg.model, "messages": req.messages},
                          ensure_ascii=False).encode("utf-8")
        last = "no attempt made"
        for attempt in range(1, cfg.max_attempts + 1):
            if stop.is_set():
                raise _Cancelled()
            try:
                reply = parse_reply(self._post(body))
            except _Rejected as e:
                return ChatResult(req.key, attempts=attempt, error=str(e))
            except _Transient as e:
                last = str(e)
                if attempt == cfg.max_attempts:
                    break
                delay = self._delay(attempt, e.retry_after)
                log.debug("request %s: %s; retry %d/%d in %.2fs", req.key, last, attempt, cfg.max_attempts - 1, delay)
                if stop.wait(delay):
                    raise _Cancelled() from None
                continue
            if self.cache is not None:
                self.cache.put(h, req.key, reply)
            return _result_from(req.key, reply, cached=False, attempts=attempt)
        raise EndpointError(f"endpoint {cfg.url} is down or failing: request {req.key!r} failed "
                            f"{cfg.max_attempts} attempts, last: {last}")

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        cfg = self.config
        if retry_after is not None:
            return min(retry_after, cfg.retry_after_max_s)
        # Jitter spreads retries of requests that failed together so they do not collide again.
        return min(cfg.backoff_max_s, cfg.backoff_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)

    def _post(self, body: bytes) -> bytes:
        """One HTTP attempt; returns the 2xx body or raises _Transient / _Rejected / EndpointError."""
        cfg = self.config
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(cfg.url, data=body, headers=headers, method="POST")
        deadline = time.monotonic() + cfg.timeout_s
        try:
            with self._opener.open(request, timeout=cfg.timeout_s) as response:
                return _read_until(response, deadline)
        except urllib.error.HTTPError as e:
            self._raise_for_status(e)
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise _Transient(f"timed out after {cfg.timeout_s}s") from None
            raise _Transient(f"connection failed: {self._scrub(str(reason))}") from None
        except (TimeoutError, socket.timeout):
            raise _Transient(f"timed out after {cfg.timeout_s}s") from None
        except (OSError, http.client.HTTPException) as e:  # refused, reset, TLS failures, bad status lines
            raise _Transient(f"connection failed: {type(e).__name__}: {self._scrub(str(e))}") from None

    def _raise_for_status(self, e: urllib.error.HTTPError):
        try:
            detail = e.read(_MAX_ERROR_BODY).decode("utf-8", "replace")
        except (OSError, http.client.HTTPException):
            detail = ""
        finally:
            e.close()
        status = f"HTTP {e.code}" + (f": {self._scrub(detail).strip()}" if detail.strip() else "")
        if e.code in RETRY_STATUSES or e.code >= 500:
            raise _Transient(status, parse_retry_after(e.headers)) from None
        if e.code in FATAL_STATUSES or 300 <= e.code < 400:
            hint = ""
            if e.code in (401, 403):
                hint = f" (check the key in ${self.config.api_key_env})"
            elif e.code < 400:
                hint = " (redirects are not followed: give the final URL as the base URL)"
            raise EndpointError(f"endpoint {self.config.url} refused the request: {status}{hint}") from None
        raise _Rejected(f"request rejected: {status}") from None


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


def _result_from(key: str, reply: dict, cached: bool, attempts: int = 0) -> ChatResult:
    return ChatResult(key, text=reply["text"], prompt_tokens=int(reply.get("prompt_tokens", 0)),
                      completion_tokens=int(reply.get("completion_tokens", 0)),
                      finish_reason=reply.get("finish_reason"), cached=cached, attempts=attempts)
