"""A real chat-completions HTTP endpoint on 127.0.0.1 for the LLM client and instruct tests.

Each POST is answered by a `respond(n, request)` function chosen by the test (n counts requests
from 0), so a test scripts exactly what the endpoint does: normal replies, malformed JSON, 429
with Retry-After, a reply slower than the client's timeout, or closing its listening socket.
The server is bounded: it answers at most `max_requests` and stops itself after `max_seconds`.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


@dataclass
class Reply:
    status: int = 200
    body: dict | bytes | None = None
    headers: dict = field(default_factory=dict)
    delay: float = 0.0
    """Seconds to wait before answering (to outlast a client timeout)."""
    stop_listening: bool = False
    """Close the listening socket before answering, so later connections are refused."""


def use_loopback(monkeypatch, key_env: str, key: str) -> None:
    """Put the API `key` in the variable `key_env` and keep any proxy the environment names away from
    the loopback server."""
    monkeypatch.setenv(key_env, key)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")


def completion(text: str, prompt_tokens: int = 10, completion_tokens: int = 5) -> dict:
    """A well-formed chat-completions reply body."""
    return {"id": "chatcmpl-test", "object": "chat.completion", "model": "teacher",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


@dataclass
class Seen:
    """One request as the server read it."""

    body: bytes
    headers: dict
    at: float

    @property
    def json(self) -> dict:
        return json.loads(self.body)


class ChatServer:
    """Serve chat completions on a free loopback port while used as a context manager."""

    def __init__(self, respond: Callable[[int, Seen], Reply], max_requests: int = 100, max_seconds: float = 30.0):
        self.respond = respond
        self.max_requests = max_requests
        self.max_seconds = max_seconds
        self.seen: list[Seen] = []
        self.answered = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._admit_limit: int | None = None
        self._admitted = 0
        self._release = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._listening = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def hold_after(self, n: int | None) -> None:
        """Answer `n` more requests; later ones wait unread until `release()`, then get no reply.

        None answers every request again.
        """
        with self._lock:
            self._admit_limit, self._admitted = n, 0

    def release(self) -> None:
        self._release.set()

    def stop_listening(self) -> None:
        """Stop accepting connections (later connects are refused); open ones carry on."""
        with self._lock:
            if not self._listening:
                return
            self._listening = False
        self._httpd.shutdown()
        self._httpd.socket.close()

    def __enter__(self) -> "ChatServer":
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self._timer = threading.Timer(self.max_seconds, self.stop_listening)
        self._timer.daemon = True
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()
        self.release()
        self.stop_listening()

    def _admit(self) -> bool:
        with self._lock:
            if self._admit_limit is None:
                return True
            if self._admitted < self._admit_limit:
                self._admitted += 1
                return True
            return False

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                if not server._admit():
                    server._release.wait(server.max_seconds)
                    self.close_connection = True
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with server._lock:
                    n = len(server.seen)
                    seen = Seen(body, {k.lower(): v for k, v in self.headers.items()}, time.monotonic())
                    server.seen.append(seen)
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    if n >= server.max_requests:
                        reply = Reply(status=503, body={"error": {"message": "test server request limit"}})
                    else:
                        reply = server.respond(n, seen)
                    self._answer(reply)
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def _answer(self, reply: Reply):
                if reply.stop_listening:
                    server.stop_listening()
                if reply.delay:
                    time.sleep(reply.delay)
                data = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body or {}).encode()
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in reply.headers.items():
                        self.send_header(k, str(v))
                    self.end_headers()
                    self.wfile.write(data)
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    return  # the client gave up (timed out) first
                with server._lock:
                    server.answered += 1

        return Handler
