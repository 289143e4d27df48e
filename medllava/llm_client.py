"""Client for OpenAI-compatible chat-completions endpoints, built for long batch runs.

Used by the teacher-written instruction sets and by the evaluation judge: the caller hands over
many requests and gets each result as it finishes, while the client keeps a fixed number in
flight, retries transient failures, and appends every reply to an on-disk cache so a killed run
resumes without paying for any reply twice.

This file holds the configuration, the request and result types, and the scheduling: concurrency,
de-duplication, retries with backoff, usage totals. One HTTP attempt and the sorting of its failures
is `medllava.llm_http`; the reply cache is `medllava.llm_cache`.

The API key is read from the environment variable whose *name* is configured. It is only ever put
in the Authorization header: it is not stored in the config, the cache, logs, reprs or error
messages. Server error text, and every reply (a model can echo the key), is scrubbed of it, whole
or in part, before it is shown, cached or handed to the caller.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import logging
import os
import random
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from medllava.llm_cache import ResponseCache, request_hash
from medllava.llm_http import Endpoint, EndpointError, RejectedError, TransientError, parse_reply, parse_retry_after

__all__ = ["ChatClient", "ChatRequest", "ChatResult", "ClientConfig", "EndpointError", "ResponseCache",
           "UsageStats", "parse_reply", "parse_retry_after", "request_hash"]

log = logging.getLogger(__name__)


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
    """Requests that reached the endpoint at least once (whatever came of them)."""
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


class _Cancelled(Exception):
    """The run was stopped while this request waited to retry (`sent`: after at least one attempt)."""

    def __init__(self, sent: bool):
        super().__init__()
        self.sent = sent


class ChatClient:
    """Sends chat-completions requests concurrently, with retries, a reply cache and usage totals.

        with ChatClient(ClientConfig(base_url=url, model="gpt-4o"), cache_path="replies.jsonl") as client:
            for result in client.run(ChatRequest(r["id"], build_messages(r)) for r in records):
                ...  # result.text, or result.error for a request that failed on its own
    """

    def __init__(self, config: ClientConfig, cache_path: str | os.PathLike | None = None):
        self.config = config
        self._endpoint = Endpoint(config.url, self._read_key(config.api_key_env), config.api_key_env,
                                  config.timeout_s)
        self.cache = ResponseCache(cache_path) if cache_path else None
        self.stats = UsageStats(price_prompt_per_1k=config.price_prompt_per_1k,
                                price_completion_per_1k=config.price_completion_per_1k)
        self._stats_lock = threading.Lock()  # workers count their attempts as they make them

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
                        # Scrubbed again: a cache written before replies were scrubbed may hold the key.
                        yield _result_from(req.key, self._scrub_reply(hit), cached=True)
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
                self.stats.failed += len(keys)
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
                error = None if future.cancelled() else future.exception()
                if isinstance(error, EndpointError) or (isinstance(error, _Cancelled) and error.sent):
                    self.stats.failed += len(keys)  # sent, and no reply will come
                elif not future.cancelled() and error is None:
                    yield from self._account(future.result(), keys)
            pending.clear()
            raise fatal

    def _account(self, result: ChatResult, keys: list[str]) -> Iterator[ChatResult]:
        # `sent` and `retries` were counted by the worker as it made each attempt.
        self.stats.cached += len(keys) - 1
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
                raise _Cancelled(sent=attempt > 1)
            self._count_attempt(attempt)
            try:
                reply = self._scrub_reply(parse_reply(self._endpoint.post(body)))
            except RejectedError as e:
                return ChatResult(req.key, attempts=attempt, error=str(e))
            except TransientError as e:
                last = str(e)
                if attempt == cfg.max_attempts:
                    break
                delay = self._delay(attempt, e.retry_after)
                log.debug("request %s: %s; retry %d/%d in %.2fs", req.key, last, attempt, cfg.max_attempts - 1, delay)
                if stop.wait(delay):
                    raise _Cancelled(sent=True) from None
                continue
            if self.cache is not None:
                self.cache.put(h, req.key, reply)
            return _result_from(req.key, reply, cached=False, attempts=attempt)
        raise EndpointError(f"endpoint {cfg.url} is down or failing: request {req.key!r} failed "
                            f"{cfg.max_attempts} attempts, last: {last}")

    def _count_attempt(self, attempt: int) -> None:
        """Counted when made, so a run stopped by a failing endpoint still reports what it sent."""
        with self._stats_lock:
            if attempt == 1:
                self.stats.sent += 1
            else:
                self.stats.retries += 1

    def _scrub_reply(self, reply: dict) -> dict:
        """The reply with the API key masked in its text (a model may echo what it was sent)."""
        return {**reply, **{k: self._endpoint.scrub(v) for k, v in reply.items()
                            if k in ("text", "finish_reason") and isinstance(v, str)}}

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        cfg = self.config
        if retry_after is not None:
            return min(retry_after, cfg.retry_after_max_s)
        # Jitter spreads retries of requests that failed together so they do not collide again.
        return min(cfg.backoff_max_s, cfg.backoff_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


def _result_from(key: str, reply: dict, cached: bool, attempts: int = 0) -> ChatResult:
    return ChatResult(key, text=reply["text"], prompt_tokens=int(reply.get("prompt_tokens", 0)),
                      completion_tokens=int(reply.get("completion_tokens", 0)),
                      finish_reason=reply.get("finish_reason"), cached=cached, attempts=attempts)
