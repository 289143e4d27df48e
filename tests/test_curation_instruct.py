"""`medllava curate instruct`: reply parsing and cleaning, prompts, and whole runs against a
chat-completions server on loopback (including a run killed with SIGKILL and resumed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from chat_completions_server import ChatServer, Reply, completion, use_loopback
from medllava.curation import teacher_messages as P
from medllava.curation.instruct import InstructOptions, select_figures
from medllava.curation.instruct_parse import clean_pairs, parse_caption_qa, parse_dialogue, to_record
from medllava.curation.common import StepReport
from medllava.cli import main
from medllava.io import DataError, read_jsonl
from medllava.records import normalize_record

ASSETS = Path(__file__).parent / "assets" / "instruct"
FIGURES = ASSETS / "figures.jsonl"
ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-instruct-test-key-7f3a9"


@pytest.fixture(autouse=True)
def env(monkeypatch):
    use_loopback(monkeypatch, "TEACHER_KEY", KEY)


# ---- parsing and cleaning -------------------------------------------------------------------

@pytest.mark.parametrize("reply", [
    "User: What is shown?\nAssistant: A chest X-ray.\nUser: Any effusion?\nAssistant: Yes, on the left.",
    "Here is a conversation:\n\nHuman: What is shown?\nGPT: A chest X-ray.\n\n"
    "Human: Any effusion?\nGPT: Yes, on the left.",
    "**User:** What is shown?\n**Assistant:** A chest X-ray.\n**User**: Any effusion?\n**Assistant**: Yes, on the left.",
    "Q: What is shown?\nA: A chest X-ray.\nQ: Any effusion?\nA: Yes, on the left.\nQ: And the heart?",
    # Full-width colons, as some teachers write after switching language.
    "- USER\uff1a What is shown?\n- ASSISTANT\uff1a A chest X-ray.\n"
    "- USER\uff1a Any effusion?\n- ASSISTANT\uff1a Yes, on the left.",
])
def test_parse_dialogue_styles(reply):
    assert parse_dialogue(reply) == [("What is shown?", "A chest X-ray."), ("Any effusion?", "Yes, on the left.")]


def test_parse_dialogue_multiline_turns_and_unparseable():
    reply = "User: Describe it.\nAssistant: Two findings:\n1) an effusion\n2) a shifted trachea\nUser: Thanks."
    assert parse_dialogue(reply) == [("Describe it.", "Two findings:\n1) an effusion\n2) a shifted trachea")]
    assert parse_dialogue("The figure shows a chest X-ray with an effusion.") is None
    assert parse_dialogue("Assistant: It is a CT scan.") is None
    assert parse_dialogue("User: What is this?") is None


@pytest.mark.parametrize("question,answer,reason", [
    ("What is shown?", "I'm sorry, but I cannot see the image.", "refusal"),
    ("What is shown?", "As an AI, I can only go by the description.", "refusal"),
    ("What is shown?", "I don\u2019t have access to the actual image.", "refusal"),
    ("What does the caption say?", "A CT scan of the chest.", "mentions the caption or context"),
    ("What is shown?", "As mentioned in the text, a CT of the chest.", "mentions the caption or context"),
    ("What is shown?", "According to the figure legend, a CT of the chest.", "mentions the caption or context"),
    ("What is shown?", "Based on the context provided, a chest CT.", "mentions the caption or context"),
    ("What is shown?", "The description states it is a chest CT.", "mentions the caption or context"),
    ("What is shown?", "", "empty turn"),
    ("What is shown?", "A chest CT; in the context of fever, the opacity suggests pneumonia.", None),
    ("What is shown?", "A chest CT. Additional information such as the history would help.", None),
    ("Can you see a mass?", "I cannot determine its nature from the image alone; it is well defined.", None),
])
def test_drop_reasons(question, answer, reason):
    dropped = Counter()
    kept = clean_pairs([(question, answer)], dropped)
    assert (kept == []) == (reason is not None)
    assert dropped == (Counter({reason: 1}) if reason else Counter())


def test_cleaning_strips_lead_ins_stray_image_tags_and_puts_image_once():
    dropped = Counter()
    pairs = clean_pairs([("<image> What is shown?", "Sure! This is an   axial CT <image>."),
                         ("**Where** is the lesion?", 'Certainly, "it is in the liver."')], dropped)
    assert pairs == [("What is shown?", "This is an axial CT."), ("Where is the lesion?", "It is in the liver.")]
    record = to_record("f1", "PMC1/f1.jpg", pairs)
    assert normalize_record(record) == record
    values = [t["value"] for t in record["conversations"]]
    assert values[0].startswith("<image>\n") and sum(v.count("<image>") for v in values) == 1


def test_parse_caption_qa():
    want = {"caption": "An axial CT.", "question": "Where is the lesion?", "answer": "In the liver."}
    assert parse_caption_qa(json.dumps(want)) == want
    assert parse_caption_qa("```json\n" + json.dumps(want, indent=2) + "\n```") == want
    assert parse_caption_qa("**Caption:** An axial CT.\n**Question:** Where is the lesion?\n**Answer:** In the liver.") == want
    assert parse_caption_qa('{"caption": "An axial CT.", "question": ""}') is None
    assert parse_caption_qa("An axial CT of the abdomen.") is None


# ---- prompts --------------------------------------------------------------------------------

def test_shipped_prompts_and_few_shot_load():
    shots = P.load_few_shot()
    assert len(shots) >= 3 and all(s.caption and s.mentions and len(s.pairs) >= 2 for s in shots)
    for name, keys in [("llava_med.yaml", {"system", "caption_header", "mentions_header", "few_shot"}),
                       ("allava.yaml", {"system", "user", "caption_instructions"})]:
        assert keys <= set(P.load_prompts(name))


def test_few_shot_in_llava_med_format_and_bad_files(tmp_path):
    shots = P.load_few_shot(ASSETS / "few_shot_llava_med_format.json")
    assert [len(s.pairs) for s in shots] == [2, 2]
    assert shots[0].mentions == ("Non-contrast CT of the head revealed an acute haemorrhage in the right "
                                 "frontal lobe (Figure 1).",)
    assert shots[1].mentions == ("The cut surface showed a golden-yellow mass (Figure 3).",)

    bad = tmp_path / "few.json"
    bad.write_text(json.dumps([{"fig_caption": "x", "conversations": [{"from": "human", "value": "q"}]}]))
    with pytest.raises(DataError, match=r"few\.json: example 0: .*pair"):
        P.load_few_shot(bad)
    bad.write_text(json.dumps([{"fig_caption": "x", "conversations": [
        {"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]}]))
    with pytest.raises(DataError, match="example 0: turn 0 is from gpt"):
        P.load_few_shot(bad)
    bad.write_text("[{not json")
    with pytest.raises(DataError, match="few.json"):
        P.load_few_shot(bad)


def test_released_llava_med_few_shot_file_loads(shared_data):
    shots = P.load_few_shot(shared_data / "llava_med" / "instruct_few_shot_examples.json")
    assert len(shots) == 8 and all(s.pairs and s.mentions for s in shots)


def test_variants_decide_whether_mentions_are_shown():
    figure = next(obj for _, obj in read_jsonl(FIGURES, skip_bad=True))
    prompts, shots = P.load_prompts("llava_med.yaml"), P.load_few_shot()
    with_im = P.llava_med_messages(figure, True, prompts, shots)
    without = P.llava_med_messages(figure, False, prompts, shots)
    assert [m["role"] for m in with_im] == ["system"] + ["user", "assistant"] * len(shots) + ["user"]
    assert figure["caption"] in with_im[-1]["content"] and figure["caption"] in without[-1]["content"]
    assert "Tetrahydrolipstatin" in with_im[-1]["content"] and "Tetrahydrolipstatin" not in without[-1]["content"]
    assert shots[0].mentions[0] in with_im[1]["content"] and shots[0].mentions[0] not in without[1]["content"]
    assert with_im[2]["content"].startswith("User: ")


def test_select_figures_sizes_skips_and_seeded_sampling(tmp_path):
    report = StepReport("instruct", unit="figures")
    figures = select_figures(FIGURES, InstructOptions(variant="10k"), report)
    assert [f["id"] for f in figures] == [f"PMC3460867_F{i}" for i in range(1, 5)]
    assert report.skipped == Counter({"not a JSON object": 1, "no image": 1})

    many = tmp_path / "many.jsonl"
    many.write_text("".join(json.dumps({"id": f"f{i}", "caption": f"c{i}", "image": f"i{i}.png"}) + "\n"
                            for i in range(50)))
    draw = lambda seed: [f["id"] for f in select_figures(many, InstructOptions(limit=7, seed=seed), StepReport("s"))]
    assert draw(1) == draw(1) and draw(1) != draw(2) and len(draw(3)) == 7
    assert draw(1) == sorted(draw(1), key=lambda s: int(s[1:]))  # input order kept


# ---- whole runs against a loopback endpoint ---------------------------------------------------

def figure_of(seen) -> str:
    """The caption's first words, from the last user message of a request."""
    content = seen.json["messages"][-1]["content"]
    text = content if isinstance(content, str) else content[0]["text"]
    return text.split("\n")[1][:40]


def cli(*args: str) -> int:
    return main(["curate", "instruct", *args])


def test_llava_med_run_cleans_counts_and_never_leaks_the_key(tmp_path, capsys, caplog):
    replies = {
        "Chemical structure of inhibitors.": "User: What kind of figure is this?\nAssistant: Sure! A chemical "
        "structure diagram of two molecules.\nUser: What does the caption say?\nAssistant: It lists them.\n"
        "User: What do the arrows mark?\nAssistant: The sites attacked by the enzyme.",
        "Inhibition of Lip-HSL proteins by MmPP": "I'm afraid I can only write prose about this figure.",
        "Protein-inhibitor adducts studies usin": "User: What is shown?\nAssistant: I'm sorry, I cannot see images.",
        "Antimycobacterial activity of MmPPOX a": "User: What kind of figure is this?\nAssistant: A chemical "
        "structure diagram of two molecules.\nUser: What do the arrows mark?\nAssistant: The sites attacked by the enzyme.",
    }
    def respond(n, seen):
        return Reply(body=completion(next(v for k, v in replies.items() if figure_of(seen).startswith(k))))

    with ChatServer(respond) as server:
        out = tmp_path / "conv.jsonl"
        args = ["--in", str(FIGURES), "--out", str(out), "--base-url", server.url, "--model", "teacher",
                "--api-key-env", "TEACHER_KEY", "--variant", "60k-im", "--price-prompt", "1", "--price-completion", "2"]
        assert cli(*args) == 0
        first = capsys.readouterr().out
        assert len(server.seen) == 4
        assert cli(*args) == 0  # a rerun is served from the cache
        second = capsys.readouterr().out
        assert len(server.seen) == 4
    records = [obj for _, obj in read_jsonl(out)]
    assert len(records) == 1
    (record,) = records
    assert record["id"] == "PMC3460867_F1" and record["image"] == "PMC3460867/pone.0046493.g001.jpg"
    assert [t["value"] for t in record["conversations"]] == [
        "<image>\nWhat kind of figure is this?", "A chemical structure diagram of two molecules.",
        "What do the arrows mark?", "The sites attacked by the enzyme."]
    for line in ["instruct: 6 figures read, 1 written", "skipped 1: unparseable reply", "skipped 1: no usable turn left",
                 "skipped 1: duplicate conversation", "skipped 1: no image", "skipped 1: not a JSON object",
                 "question-answer pairs dropped (refusal): 1",
                 "question-answer pairs dropped (mentions the caption or context): 1",
                 "requests 4 (sent 4, from cache 0, failed 0, retries 0); tokens prompt 40, completion 20; "
                 "estimated cost 0.0800"]:
        assert line in first
    assert "requests 4 (sent 0, from cache 4" in second
    cache = out.with_name("conv.cache.jsonl")
    assert all(s.headers["authorization"] == f"Bearer {KEY}" for s in server.seen)
    assert not any(KEY in text for text in [first, second, caplog.text, out.read_text(), cache.read_text()])


def test_allava_run_sends_images_and_writes_caption_and_qa_records(tmp_path, capsys):
    from PIL import Image

    root = tmp_path / "images"
    (root / "PMC3460867").mkdir(parents=True)
    for i in (1, 2, 4):  # figure 3's file is missing
        Image.new("RGB", (64, 48), (40 * i, 90, 160)).save(root / "PMC3460867" / f"pone.0046493.g00{i}.jpg")

    attempts = Counter()

    def respond(n, seen):
        text, image = seen.json["messages"][1]["content"]
        assert image["image_url"]["url"].startswith("data:image/jpeg;base64,")
        assert "Authors' caption" in text["text"]
        topic = figure_of(seen)[:12]
        attempts[topic] += 1
        if topic.startswith("Inhibition"):  # a server error, then a malformed reply
            return Reply(status=500, body={"error": "boom"}) if attempts[topic] == 1 else Reply(body=b"{truncated")
        return Reply(body=completion("```json\n" + json.dumps({
            "caption": f"A detailed view of {topic}.", "question": f"What does {topic} show?",
            "answer": "Sure! It shows the main result."}) + "\n```"))

    out = tmp_path / "allava.jsonl"
    with ChatServer(respond) as server:
        code = cli("--in", str(FIGURES), "--out", str(out), "--base-url", server.url, "--model", "vision",
                   "--api-key-env", "TEACHER_KEY", "--method", "allava", "--image-root", str(root), "--seed", "3")
    printed = capsys.readouterr().out
    assert code == 0
    records = {r["id"]: r for _, r in read_jsonl(out)}
    assert sorted(records) == ["PMC3460867_F1_caption", "PMC3460867_F1_qa", "PMC3460867_F4_caption", "PMC3460867_F4_qa"]
    qa = records["PMC3460867_F4_qa"]["conversations"]
    assert qa[0]["value"] == "<image>\nWhat does Antimycobact show?" and qa[1]["value"] == "It shows the main result."
    assert records["PMC3460867_F1_caption"]["conversations"][1]["value"] == "A detailed view of Chemical str."
    assert all(normalize_record(r) == r for r in records.values())
    assert "skipped 1: image unreadable" in printed and "skipped 1: teacher request failed" in printed
    assert "failed 1, retries 1" in printed


def test_run_clears_the_temporary_a_killed_run_left(tmp_path, capsys):
    def respond(n, seen):
        return Reply(body=completion(f"User: What is shown?\nAssistant: {figure_of(seen)}"))

    out = tmp_path / "conv.jsonl"
    stale = tmp_path / ".conv.jsonl.0badf00d.tmp"  # how medllava.io names the temporary of conv.jsonl
    stale.write_text('{"id": "half a reco')
    with ChatServer(respond) as server:
        assert cli("--in", str(FIGURES), "--out", str(out), "--base-url", server.url, "--model", "teacher",
                   "--api-key-env", "TEACHER_KEY") == 0
    assert not stale.exists()
    assert "removed 1 temporary files left by an interrupted run" in capsys.readouterr().out
    assert len(list(read_jsonl(out))) == 4


def test_endpoint_down_is_a_clear_error_and_keeps_finished_replies(tmp_path, capsys):
    def respond(n, seen):
        return Reply(body=completion("User: What is shown?\nAssistant: A figure."), stop_listening=(n == 1))

    out = tmp_path / "conv.jsonl"
    with ChatServer(respond) as server:
        code = cli("--in", str(FIGURES), "--out", str(out), "--base-url", server.url, "--model", "teacher",
                   "--api-key-env", "TEACHER_KEY", "--concurrency", "1", "--max-attempts", "2")
    err = capsys.readouterr().err
    assert code == 1 and "down or failing" in err and "refused" in err
    assert not out.exists()
    assert len(out.with_name("conv.cache.jsonl").read_text().splitlines()) == 2


def test_killed_run_resumes_without_sending_any_request_twice(tmp_path):
    n_figures = 12
    figures = tmp_path / "figures.jsonl"
    figures.write_text("".join(json.dumps({"id": f"fig{i}", "caption": f"Axial CT slice number {i} of the chest.",
                                           "image": f"PMC1/fig{i}.jpg"}) + "\n" for i in range(n_figures)))

    def respond(n, seen):
        caption = figure_of(seen)
        return Reply(body=completion(f"User: What is this?\nAssistant: {caption}"))

    out, cache = tmp_path / "conv.jsonl", tmp_path / "conv.cache.jsonl"
    env = {**os.environ, "TEACHER_KEY": KEY, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    with ChatServer(respond) as server:
        command = [sys.executable, "-m", "medllava.cli", "curate", "instruct", "--in", str(figures),
                   "--out", str(out), "--base-url", server.url, "--model", "teacher", "--api-key-env",
                   "TEACHER_KEY", "--concurrency", "2", "--timeout", "20"]
        server.hold_after(5)
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 15
            while not (cache.exists() and len(cache.read_text().splitlines()) == 5):
                assert proc.poll() is None and time.monotonic() < deadline, "the first run did not get 5 replies"
                time.sleep(0.05)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert not out.exists()  # nothing half-written
        server.hold_after(None)
        server.release()
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "from cache 5" in done.stdout
    bodies = Counter(s.body for s in server.seen)
    assert len(bodies) == n_figures and max(bodies.values()) == 1
    records = [obj for _, obj in read_jsonl(out)]
    assert [r["id"] for r in records] == [f"fig{i}" for i in range(n_figures)]
    assert KEY not in done.stdout + done.stderr + out.read_text() + cache.read_text()
