"""The chat-completions client against a real HTTP server on loopback."""

from __future__ import annotations

import json
import logging
import time

import pytest

from chat_completions_server import ChatServer, Reply, completion, use_loopback
from medllava.llm_client import (
    ChatClient,
    ChatRequest,
    ClientConfig,
    EndpointError,
    parse_retry_after,
    request_hash,
)

KEY = "sk-test-5ecret-do-not-leak-0123456789"


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    use_loopback(monkeypatch, "TEACHER_KEY", KEY)


def config(server: ChatServer, **kw) -> ClientConfig:
    base = dict(base_url=server.url, model="teacher-1", api_key_env="TEACHER_KEY", concurrency=1,
                timeout_s=2.0, max_attempts=3, backoff_s=0.01, backoff_max_s=0.05)
    return ClientConfig(**{**base, **kw})


def req(key: str, text: str = "hello", **params) -> ChatRequest:
    return ChatRequest(key, [{"role": "user", "content": text}], params)


def echo(n, seen):
    prompt = seen.json["messages"][-1]["content"]
    return Reply(body=completion(f"reply to {prompt}", prompt_tokens=100, completion_tokens=40))


def test_normal_reply_usage_cost_and_headers(tmp_path):
    with ChatServer(echo) as server:
        cfg = config(server, price_prompt_per_1k=0.01, price_completion_per_1k=0.03)
        with ChatClient(cfg, tmp_path / "cache.jsonl") as client:
            results = list(client.run([req("a", "one", temperature=0.2, max_tokens=64), req("b", "two")]))
    assert sorted((r.key, r.text) for r in results) == [("a", "reply to one"), ("b", "reply to two")]
    assert all(r.ok and not r.cached and r.attempts == 1 for r in results)
    first = server.seen[0]
    assert first.headers["authorization"] == f"Bearer {KEY}"
    assert first.json == {"model": "teacher-1", "messages": [{"role": "user", "content": "one"}],
                          "temperature": 0.2, "max_tokens": 64}
    s = client.stats
    assert (s.requests, s.sent, s.cached, s.failed, s.retries) == (2, 2, 0, 0, 0)
    assert (s.prompt_tokens, s.completion_tokens) == (200, 80)
    assert s.cost == pytest.approx(200 * 0.01 / 1000 + 80 * 0.03 / 1000)


def test_malformed_replies_are_counted_failures_not_retried_or_cached(tmp_path):
    bodies = [b"{not json", {"id": "x", "object": "chat.completion"}, {"choices": [{"message": {"content": None}}]}]
    with ChatServer(lambda n, seen: Reply(body=bodies[n])) as server:
        with ChatClient(config(server), tmp_path / "cache.jsonl") as client:
            results = {r.key: r for r in client.run([req("bad-json", "1"), req("no-choices", "2"), req("null", "3")])}
    assert len(server.seen) == 3  # one attempt each
    assert "not JSON" in results["bad-json"].error
    assert "no choices" in results["no-choices"].error
    assert "not a string" in results["null"].error
    assert client.stats.failed == 3 and client.stats.sent == 3
    assert (tmp_path / "cache.jsonl").read_text() == ""


def test_429_with_retry_after_is_honoured_then_succeeds(tmp_path):
    def respond(n, seen):
        if n == 0:
            return Reply(status=429, body={"error": {"message": "rate limited"}}, headers={"Retry-After": "1"})
        return echo(n, seen)

    with ChatServer(respond) as server:
        with ChatClient(config(server), tmp_path / "cache.jsonl") as client:
            (result,) = list(client.run([req("a")]))
    assert result.ok and result.attempts == 2 and result.text == "reply to hello"
    # The backoff alone would retry after ~0.01 s; the server asked for 1 s.
    assert server.seen[1].at - server.seen[0].at >= 0.95
    assert client.stats.retries == 1


def test_timeout_then_retry(tmp_path):
    def respond(n, seen):
        return Reply(body=completion("late"), delay=1.5) if n == 0 else Reply(body=completion("on time"))

    with ChatServer(respond) as server:
        with ChatClient(config(server, timeout_s=0.3), tmp_path / "cache.jsonl") as client:
            start = time.monotonic()
            (result,) = list(client.run([req("a")]))
    assert result.ok and result.text == "on time" and result.attempts == 2
    assert time.monotonic() - start < 1.2  # did not wait for the slow reply
    assert len(server.seen) == 2


def test_5xx_until_attempts_run_out_names_the_last_status(tmp_path):
    with ChatServer(lambda n, seen: Reply(status=503, body={"error": "overloaded"})) as server:
        with ChatClient(config(server), tmp_path / "cache.jsonl") as client:
            with pytest.raises(EndpointError, match=r"down or failing.*3 attempts.*HTTP 503"):
                list(client.run([req("a")]))
    assert len(server.seen) == 3


def test_endpoint_down_keeps_finished_work(tmp_path):
    # The third request finds the port closed: connection refused on every attempt.
    def respond(n, seen):
        return Reply(body=completion(f"answer {n}"), stop_listening=(n == 1))

    cache = tmp_path / "cache.jsonl"
    requests = [req(k, k) for k in "abcd"]
    got = []
    with ChatServer(respond) as server:
        with ChatClient(config(server), cache) as client:
            with pytest.raises(EndpointError, match=r"down or failing.*3 attempts.*connection failed.*refused"):
                for result in client.run(requests):
                    got.append(result)
    assert [r.key for r in got] == ["a", "b"] and all(r.ok for r in got)
    assert [json.loads(line)["key"] for line in cache.read_text().splitlines()] == ["a", "b"]

    # A rerun while the endpoint is still down serves the finished replies from the cache first.
    with ChatClient(config(server, max_attempts=1), cache) as client:
        again = []
        with pytest.raises(EndpointError):
            for result in client.run(requests):
                again.append(result)
    assert [(r.key, r.cached) for r in again] == [("a", True), ("b", True)]
    assert len(server.seen) == 2


def test_cache_resumes_and_identical_requests_are_sent_once(tmp_path):
    cache = tmp_path / "cache.jsonl"
    with ChatServer(echo) as server:
        with ChatClient(config(server, concurrency=2), cache) as client:
            first = list(client.run([req("a", "same"), req("b", "same"), req("c", "other")]))
        assert len(server.seen) == 2
        assert sorted(r.key for r in first) == ["a", "b", "c"]
        assert {r.text for r in first if r.key in "ab"} == {"reply to same"}
        with ChatClient(config(server), cache) as client:
            second = list(client.run([req("a", "same"), req("c", "other"), req("d", "new")]))
        assert len(server.seen) == 3  # only "new" was sent
    assert [(r.key, r.cached) for r in second if r.cached] == [("a", True), ("c", True)]
    assert client.stats.cached == 2 and client.stats.sent == 1
    # A different model or sampling parameter is a different request.
    assert request_hash("m", [], {"temperature": 0}) != request_hash("m", [], {"temperature": 1})
    assert request_hash("m", [], {}) != request_hash("n", [], {})


def test_concurrency_limit_and_results_as_they_finish(tmp_path):
    def respond(n, seen):
        slow = seen.json["messages"][0]["content"] == "slow"
        return Reply(body=completion(seen.json["messages"][0]["content"]), delay=0.6 if slow else 0.1)

    with ChatServer(respond) as server:
        with ChatClient(config(server, concurrency=2), tmp_path / "c.jsonl") as client:
            order = [r.key for r in client.run([req("slow", "slow")] + [req(f"q{i}", f"q{i}") for i in range(5)])]
    assert server.max_in_flight == 2
    assert order[-1] == "slow" and sorted(order) == ["q0", "q1", "q2", "q3", "q4", "slow"]


def test_client_errors_bad_request_is_per_request_bad_key_is_fatal(tmp_path):
    with ChatServer(lambda n, seen: Reply(status=400, body={"error": "context too long"})) as server:
        with ChatClient(config(server), tmp_path / "c.jsonl") as client:
            (result,) = list(client.run([req("a")]))
    assert "HTTP 400" in result.error and len(server.seen) == 1

    with ChatServer(lambda n, seen: Reply(status=401, body={"error": "bad key"})) as server:
        with ChatClient(config(server), tmp_path / "c.jsonl") as client:
            with pytest.raises(EndpointError, match=r"HTTP 401.*\$TEACHER_KEY"):
                list(client.run([req("a", "1"), req("b", "2")]))
    bodies = [s.body for s in server.seen]
    assert len(bodies) == len(set(bodies)) >= 1  # a refused key is never retried

    # Following a redirect would hand the key to another address.
    with ChatServer(lambda n, seen: Reply(status=307, headers={"Location": "http://127.0.0.1:9/v1/chat/completions"})) as server:
        with ChatClient(config(server), tmp_path / "c.jsonl") as client:
            with pytest.raises(EndpointError, match="HTTP 307.*redirects are not followed"):
                list(client.run([req("a")]))
    assert len(server.seen) == 1


def test_api_key_never_leaves_the_header(tmp_path, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    # An endpoint that echoes the key back in its error text, as some gateways do.
    def respond(n, seen):
        if n == 0:
            return Reply(status=429, body={"error": f"slow down {KEY}"})
        if n == 1:
            return Reply(body=completion("fine"))
        return Reply(status=401, body={"error": f"Incorrect API key provided: {KEY}"})

    errors = []
    cache = tmp_path / "cache.jsonl"
    with ChatServer(respond) as server:
        cfg = config(server)
        with ChatClient(cfg, cache) as client:
            list(client.run([req("a")]))
            try:
                list(client.run([req("b", "another")]))
            except EndpointError as e:
                errors.append(e)
    assert len(errors) == 1 and "***" in str(errors[0])
    assert all(s.headers["authorization"] == f"Bearer {KEY}" for s in server.seen)
    out = capsys.readouterr()
    texts = [caplog.text, out.out, out.err, cache.read_text(), repr(client), repr(cfg), str(errors[0]),
             repr(errors[0]), client.stats.summary()]
    assert "slow down ***" in caplog.text  # the retry was logged, scrubbed
    assert not any(KEY in t for t in texts)


def test_missing_key_variable_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TEACHER_KEY")
    with pytest.raises(ValueError, match="TEACHER_KEY"):
        ChatClient(ClientConfig(base_url="http://127.0.0.1:9/v1", model="m", api_key_env="TEACHER_KEY"))
    ChatClient(ClientConfig(base_url="http://127.0.0.1:9/v1", model="m", api_key_env=""))  # no auth wanted
    with pytest.raises(ValueError, match="http"):
        ClientConfig(base_url="file:///etc/passwd", model="m")


def test_parse_retry_after_forms():
    assert parse_retry_after({"retry-after": "7"}) == 7.0
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "7"}) == 0.25
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:30 GMT"}, now=1445412500.0) == 10.0
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None
