"""Hostile inputs: an endpoint that echoes the API key (whole, cut at the error-body limit, or in
part) in errors and replies; chat-judge and curate instruct runs where requests fail; head.json
files that are malformed or come with pickled weights; config overrides that are not valid YAML."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from chat_completions_server import ChatServer, Reply, completion
from medllava.cli import main
from medllava.config import ConfigError, apply_overrides, load_config
from medllava.heads import HeadError, HeadInfo, load_with_heads, read_head_info, write_head_info
from medllava.llm_client import ChatClient, ChatRequest, ClientConfig, EndpointError
from medllava.llm_http import scrub_secret
from medllava.model import ModelConfig

KEY = "sk-hostile-9f8e7d6c5b4a-KEEP-0UT-of-logs"
ASSETS = Path(__file__).parent / "assets"
SHOWN = 300  # characters of an error body that are shown


@pytest.fixture(autouse=True)
def env(monkeypatch):
    monkeypatch.setenv("HOSTILE_KEY", KEY)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def leaked(text: str, n: int = 8) -> str | None:
    """The first run of `n` characters of the key found in `text`, or None."""
    return next((KEY[i:i + n] for i in range(len(KEY) - n + 1) if KEY[i:i + n] in text), None)


def config(server: ChatServer, **kw) -> ClientConfig:
    base = dict(base_url=server.url, model="m", api_key_env="HOSTILE_KEY", concurrency=1, timeout_s=2.0,
                max_attempts=2, backoff_s=0.01, backoff_max_s=0.02)
    return ClientConfig(**{**base, **kw})


def req(key: str, text: str = "hi") -> ChatRequest:
    return ChatRequest(key, [{"role": "user", "content": text}], {})


# ---- the key in error bodies ----------------------------------------------------------------

@pytest.mark.parametrize("status", [400, 401, 503])
@pytest.mark.parametrize("before_cut", [1, 8, 9, 15, len(KEY) - 1])
def test_a_key_cut_at_the_error_body_limit_is_not_shown(tmp_path, caplog, status, before_cut):
    """The server puts the key so that the 300-character cut falls inside it."""
    caplog.set_level(logging.DEBUG)
    body = ("x" * (SHOWN - before_cut) + KEY + " trailing text").encode()
    with ChatServer(lambda n, seen: Reply(status=status, body=body)) as server:
        with ChatClient(config(server), tmp_path / "cache.jsonl") as client:
            try:
                shown = [r.error for r in client.run([req("a")])]
            except EndpointError as e:
                shown = [str(e), repr(e)]
    assert shown and all(f"HTTP {status}" in s for s in shown)
    for text in [*shown, caplog.text]:
        assert leaked(text) is None, f"{leaked(text)!r} shown"


@pytest.mark.parametrize("echo", [
    KEY[:12],                       # a prefix, as a gateway that shortens keys shows it
    KEY[-10:],                      # its end ("...-of-logs")
    KEY[4:24],                      # a middle run
    f"{KEY[:9]}...{KEY[-9:]}",      # start and end around an ellipsis
    f"{KEY}{KEY}",                  # twice, back to back
])
def test_parts_of_the_key_in_error_text_are_masked(tmp_path, echo):
    body = {"error": {"message": f"Incorrect API key provided: {echo}. See the docs."}}
    with ChatServer(lambda n, seen: Reply(status=400, body=body)) as server:
        with ChatClient(config(server), tmp_path / "cache.jsonl") as client:
            (result,) = list(client.run([req("a")]))
    assert "Incorrect API key provided: ***" in result.error and "See the docs" in result.error
    assert leaked(result.error) is None


def test_scrub_secret_masks_runs_of_eight_and_leaves_the_rest():
    assert scrub_secret(f"a {KEY} b", KEY) == "a *** b"
    assert scrub_secret(f"a {KEY[:8]} b", KEY) == "a *** b"
    assert scrub_secret(f"a {KEY[:7]} b", KEY) == f"a {KEY[:7]} b"  # too short to matter, and common text
    assert scrub_secret("nothing secret here", KEY) == "nothing secret here"
    assert scrub_secret(f"{KEY[:10]}{KEY}", KEY) == "******"
    assert scrub_secret("text", None) == "text" and scrub_secret("", KEY) == ""


# ---- the key in replies: cache, training set, judge reviews ---------------------------------

@pytest.mark.parametrize("reply", [
    f"Your key is {KEY}.",
    f"Your key starts with {KEY[:16]}",
    f"{KEY[10:30]} was in the header",
    f"{KEY}\n{KEY[::-1]}\n{KEY[-12:]}",
])
def test_a_reply_that_echoes_the_key_is_scrubbed_before_it_is_cached(tmp_path, reply):
    cache = tmp_path / "cache.jsonl"
    with ChatServer(lambda n, seen: Reply(body=completion(reply))) as server:
        with ChatClient(config(server), cache) as client:
            (first,) = list(client.run([req("a")]))
        with ChatClient(config(server), cache) as client:
            (again,) = list(client.run([req("a")]))
    assert len(server.seen) == 1 and again.cached
    for text in (first.text, again.text, cache.read_text()):
        assert "***" in text and leaked(text) is None


def test_a_cache_written_before_scrubbing_is_served_scrubbed(tmp_path):
    cache = tmp_path / "cache.jsonl"
    with ChatServer(lambda n, seen: Reply(body=completion("clean"))) as server:
        with ChatClient(config(server), cache) as client:
            list(client.run([req("a")]))
        row = json.loads(cache.read_text())
        cache.write_text(json.dumps({**row, "text": f"old reply with {KEY}"}) + "\n")  # as older code cached it
        with ChatClient(config(server), cache) as client:
            (hit,) = list(client.run([req("a")]))
    assert hit.cached and hit.text == "old reply with ***"


def test_curate_instruct_writes_no_key_in_the_training_set_cache_or_logs(tmp_path, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    echoes = [KEY, KEY[:10], KEY[-9:], f"{KEY[:12]}{KEY}"]

    def respond(n, seen):
        return Reply(body=completion(f"User: What is shown in panel {n}?\n"
                                     f"Assistant: A blot; the header said {echoes[n % len(echoes)]} here."))

    out = tmp_path / "conv.jsonl"
    with ChatServer(respond) as server:
        code = main(["curate", "instruct", "--in", str(ASSETS / "instruct" / "figures.jsonl"), "--out", str(out),
                     "--base-url", server.url, "--model", "teacher", "--api-key-env", "HOSTILE_KEY"])
    std = capsys.readouterr()
    assert code == 0 and len(server.seen) == 4
    written = out.read_text()
    # Every reply made a record; its mask is then thinned by the cleaner's markdown stripping.
    assert written.count("the header said") == len(written.splitlines()) == 4
    for text in (written, out.with_name("conv.cache.jsonl").read_text(), std.out, std.err, caplog.text):
        assert leaked(text) is None


def judge_cli(server, out: Path) -> int:
    return main(["eval", "chat-judge", "--questions", str(ASSETS / "judge" / "questions.jsonl"),
                 "--answers", str(ASSETS / "judge" / "answers.jsonl"), "--base-url", server.url,
                 "--model", "judge-1", "--api-key-env", "HOSTILE_KEY", "--concurrency", "1", "--out", str(out)])


def test_chat_judge_reviews_hold_no_key(tmp_path, capsys):
    replies = [f"8 6\nThe request carried {KEY}.", f"7 7\n{KEY[:20]}", f"9 3\nends {KEY[-8:]}", "5 5\nfine"]
    out = tmp_path / "chat.json"
    with ChatServer(lambda n, seen: Reply(body=completion(replies[n % 4]))) as server:
        assert judge_cli(server, out) == 0
    reviews = out.with_name("chat.reviews.jsonl").read_text()
    assert reviews.count("***") == 3
    std = capsys.readouterr()
    for text in (reviews, out.read_text(), out.with_name("chat.cache.jsonl").read_text(), std.out, std.err):
        assert leaked(text) is None


# ---- what chat-judge and curate instruct report when requests fail --------------------------

@pytest.mark.parametrize("respond, cause", [
    (lambda n, seen: Reply(status=400, body={"error": "context too long"}), "4 failed"),
    (lambda n, seen: Reply(status=422, body={"error": f"bad request for key {KEY}"}), "4 failed"),
    (lambda n, seen: Reply(body=completion("I will not rate these.")), "4 unparseable"),
    (lambda n, seen: Reply(body=completion("8 6") if n % 2 else completion("no")) if n < 2
     else Reply(status=400, body={"error": "context too long"}), "2 failed"),
])
def test_chat_judge_fails_in_one_line_when_nothing_was_scored(tmp_path, capsys, respond, cause):
    out = tmp_path / "chat.json"
    with ChatServer(respond) as server:
        code = judge_cli(server, out)
    std = capsys.readouterr()
    err = std.err
    if cause == "2 failed":  # one reply scored: a result, with the failures counted
        assert code == 0 and json.loads(out.read_text())["n_scored"] == 1
        assert "judged: 1 of 4 questions scored, 2 failed, 1 unparseable" in std.out
        return
    lines = [ln for ln in err.splitlines() if "chat-judge" in ln]
    assert code == 1 and len(lines) == 1
    assert "scored no answer: 0 of 4 questions scored" in lines[0] and cause in lines[0]
    assert leaked(err) is None
    assert json.loads(out.read_text())["n_scored"] == 0  # what happened is still on disk


def test_chat_judge_reports_how_many_failed_when_some_did(tmp_path, capsys):
    def respond(n, seen):
        return Reply(body=completion("8 6")) if n < 3 else Reply(status=400, body={"error": "context too long"})

    with ChatServer(respond) as server:
        assert judge_cli(server, tmp_path / "chat.json") == 0
    out = capsys.readouterr().out
    assert "judged: 3 of 4 questions scored, 1 failed, first failure: request rejected: HTTP 400" in out


@pytest.mark.slow  # the failing endpoints make the client wait out its retries
@pytest.mark.parametrize("respond", [
    lambda n, seen: Reply(status=503, body={"error": "overloaded"}),
    lambda n, seen: Reply(status=401, body={"error": "bad key"}),
    lambda n, seen: Reply(status=500, body={}) if n < 2 else Reply(status=401, body={}),
    lambda n, seen: Reply(status=429, body={}) if n % 2 else Reply(status=403, body={}),
])
def test_curate_instruct_counts_the_requests_it_sent_when_the_endpoint_fails(tmp_path, caplog, respond):
    out = tmp_path / "conv.jsonl"
    with ChatServer(respond) as server:
        code = main(["curate", "instruct", "--in", str(ASSETS / "instruct" / "figures.jsonl"), "--out", str(out),
                     "--base-url", server.url, "--model", "teacher", "--api-key-env", "HOSTILE_KEY",
                     "--concurrency", "1", "--max-attempts", "3"])
    stopped = next(r.getMessage() for r in caplog.records if "stopped after" in r.getMessage())
    counts = re.search(r"\(sent (\d+), from cache 0, failed (\d+), retries (\d+)\)", stopped)
    sent, failed, retries = map(int, counts.groups())
    # A second request may have started before the first one's failure stopped the run.
    distinct = len({s.body for s in server.seen})
    assert code == 1 and sent == failed == distinct >= 1 and sent + retries == len(server.seen)


def test_client_counts_sent_for_requests_that_exhaust_their_attempts(tmp_path):
    with ChatServer(lambda n, seen: Reply(status=503, body={})) as server:
        with ChatClient(config(server, max_attempts=3), tmp_path / "c.jsonl") as client:
            with pytest.raises(EndpointError):
                list(client.run([req("a")]))
    s = client.stats
    assert (s.requests, s.sent, s.failed, s.retries) == (1, 1, 1, 2) and len(server.seen) == 3


# ---- head.json and head weights --------------------------------------------------------------

def head_folder(tmp_path: Path, info, name: str = "head", weights: tuple[str, ...] = ("adapter_model.safetensors",)):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / "head.json").write_text(info if isinstance(info, str) else json.dumps(info))
    for w in weights:
        (folder / w).write_bytes(b"\x80\x04not really weights")
    return folder


@pytest.mark.parametrize("info, field", [
    ({"template": "vicuna_v1"}, "'task' is missing"),
    ([{"task": "vqa-rad"}], "expected a JSON object"),
    ("\"vqa-rad\"", "expected a JSON object"),
    ("{\"task\": \"vqa-rad\",", "not valid JSON"),
    ({"task": "vqa-rad", "closed_options": "yes"}, "'closed_options'"),
    ({"task": "vqa-rad", "closed_options": "yes,no"}, "'closed_options'"),
    ({"task": "vqa-rad", "closed_options": []}, "'closed_options'"),
    ({"task": "vqa-rad", "closed_options": ["yes", 1]}, "'closed_options'"),
    ({"task": "vqa-rad", "closed_options": {"yes": 1}}, "'closed_options'"),
    ({"task": ["vqa-rad"]}, "'task'"),
    ({"task": None}, "'task'"),
    ({"task": "vqa-rad", "template": "vicuna"}, "'template'"),
    ({"task": "vqa-rad", "prompt_style": 3}, "'prompt_style'"),
    ({"task": "vqa-rad", "prompt_style": "llava_med"}, "'prompt_style'"),
    ({"task": "vqa-rad", "metrics": [0.5]}, "'metrics'"),
])
def test_a_bad_head_json_is_one_line_naming_the_file_and_field(tmp_path, info, field):
    folder = head_folder(tmp_path, info)
    with pytest.raises(HeadError, match=field) as e:
        read_head_info(folder)
    assert str(e.value).startswith(str(folder / "head.json")) and "\n" not in str(e.value)


def test_a_good_head_json_reads_and_unknown_fields_are_ignored(tmp_path):
    folder = head_folder(tmp_path, {"task": "slake", "closed_options": ["left", "right"], "prompt_style": "short",
                                    "template": "mistral_instruct", "written_by": "a later version"})
    info = read_head_info(folder)
    assert (info.task, info.closed_options, info.prompt_style) == ("slake", ["left", "right"], "short")


@pytest.mark.parametrize("weights", [
    ("adapter_model.bin",),
    ("adapter_model.bin", "adapter_model.safetensors"),
    ("adapter_model.pt",),
])
def test_pickled_head_weights_are_refused_before_anything_loads(tmp_path, weights):
    folder = head_folder(tmp_path, {"task": "vqa-rad"}, weights=weights)
    with pytest.raises(HeadError, match="pickle adapter weights are refused"):
        read_head_info(folder)
    # The base path does not exist: the head is refused before the base would be loaded.
    with pytest.raises(HeadError, match="pickle"):
        load_with_heads(ModelConfig(name_or_path=str(tmp_path / "no_base")), [folder])


def test_a_head_without_safetensors_weights_is_refused(tmp_path):
    folder = head_folder(tmp_path, {"task": "vqa-rad"}, weights=())
    with pytest.raises(HeadError, match="no adapter_model.safetensors"):
        read_head_info(folder)


def test_a_head_json_that_would_not_read_back_is_not_written(tmp_path):
    with pytest.raises(HeadError, match="'closed_options'"):
        write_head_info(tmp_path, HeadInfo(task="t", closed_options="yes"))
    with pytest.raises(HeadError, match="'prompt_style'"):
        write_head_info(tmp_path, HeadInfo(task="t", prompt_style="verbose"))
    assert not (tmp_path / "head.json").exists()


# ---- config overrides ------------------------------------------------------------------------

@pytest.mark.parametrize("override", [
    "train.epochs=[1, 2", "head.closed_options={yes: 1", "run_dir=\"runs/x", "run_dir=a: b: c",
    "run_dir=@home", "run_dir=*alias", "seed=1\n---\n2", "run_dir=!!python/object:os.system x",
])
def test_an_override_that_is_not_yaml_is_one_config_error_naming_it(override):
    with pytest.raises(ConfigError) as e:
        apply_overrides({}, [override])
    assert repr(override) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("overrides, message", [
    (["train.epochs=3", "train.epochs.x=1"], "train.epochs is 3, not a section"),
    (["seed..x=1"], "not a field name"),
    (["=1"], "not a field name"),
])
def test_override_keys_that_cannot_be_set_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides({}, overrides)


def test_a_bad_override_on_the_command_line_is_one_line_not_a_traceback(tmp_path, capsys):
    code = main(["finetune", "--task", "vqa-rad", "--root", str(tmp_path), "train.epochs=[3"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "override 'train.epochs=[3'" in err
    from medllava.finetune.head_training import FinetuneConfig

    assert load_config(FinetuneConfig, None, ["train.epochs='3'"]).train.epochs == 3.0
