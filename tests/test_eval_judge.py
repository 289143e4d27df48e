"""The LLaVA-Med chat benchmark: reading its files, the judge protocol against a loopback
chat-completions server, lenient score parsing and the relative scores (hand-checked)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chat_completions_server import ChatServer, Reply, completion, use_loopback
from medllava.cli import main

from medllava.eval.judge import load_captions, load_questions, parse_scores, summarize

ASSETS = Path(__file__).parent / "assets" / "judge"
KEY = "judge-key-0123456789"

# Scripted judge: the reply for each question, found by a phrase of the question.
SCRIPT = {
    "What is the organ in the image?": "8 6\nAnswer 1 names the tissue and explains it.",
    "Winnie and wild-type": "Answer 1: 9, Answer 2: 9\nBoth describe the goblet cells.",
    "depressed": "I cannot rate these answers.",
    "Describe the image in detail.": "**10** **5**\nAnswer 2 misses the left lung.",
}


@pytest.fixture(autouse=True)
def env(monkeypatch):
    use_loopback(monkeypatch, "JUDGE_KEY", KEY)


def scripted(n, seen):
    user = seen.json["messages"][-1]["content"]
    question = user.split("[Question]\n", 1)[1].split("\n", 1)[0]
    reply = next(text for phrase, text in SCRIPT.items() if phrase in question)
    return Reply(body=completion(reply))


def judge_cli(server, out: Path, *extra: str) -> int:
    return main(["eval", "chat-judge", "--questions", str(ASSETS / "questions.jsonl"),
                 "--answers", str(ASSETS / "answers.jsonl"), "--base-url", server.url, "--model", "judge-1",
                 "--api-key-env", "JUDGE_KEY", "--concurrency", "2", "--out", str(out), *extra])


@pytest.mark.parametrize("reply, scores", [
    ("8 7\nexplanation", (8.0, 7.0)),
    ("8, 7", (8.0, 7.0)),
    ("\n\n 7.5 6.", (7.5, 6.0)),
    ("Assistant 1: 9  Assistant 2: 4", (9.0, 4.0)),
    ("8/10 3/10", (8.0, 3.0)),
    ("**6** **2**", (6.0, 2.0)),
    ("Scores: 10 1", (10.0, 1.0)),
])
def test_scores_are_read_from_the_first_line(reply, scores):
    assert parse_scores(reply) == scores


@pytest.mark.parametrize("reply", ["", "Both answers are fine.", "8", "8 7 6", "11 3", "0 5",
                                   "Answer 2 is better\n8 7"])
def test_replies_without_two_scores_in_range_are_unparseable(reply):
    assert parse_scores(reply) is None


def test_relative_score_is_a_ratio_of_means_with_the_mean_of_ratios_beside_it():
    reviews = [
        {"type": "conversation", "domain": "mri", "scores": [8, 4]},
        {"type": "conversation", "domain": "ct_scan", "scores": [4, 4]},
        {"type": "detailed_description", "domain": "mri", "scores": [10, 5]},
        {"type": "conversation", "domain": "mri", "scores": None},  # unparseable: left out
    ]
    s = summarize(reviews)
    assert s["overall"]["n"] == 3
    assert s["overall"]["relative_score"] == pytest.approx(100 * (13 / 3) / (22 / 3))
    assert s["overall"]["mean_of_ratios"] == pytest.approx(100 * (0.5 + 1.0 + 0.5) / 3)
    assert s["conversation"]["relative_score"] == pytest.approx(100 * 8 / 12)
    assert s["mri"]["relative_score"] == pytest.approx(100 * 9 / 18)
    assert s["ct_scan"] == {"n": 1, "reference_mean": 4, "candidate_mean": 4, "relative_score": 100.0,
                            "mean_of_ratios": 100.0}


def test_questions_read_in_the_release_format():
    captions = load_captions(ASSETS / "fig_captions.json")
    questions, skipped = load_questions(ASSETS / "questions.jsonl", captions)
    assert [q.qid for q in questions] == ["0", "3", "6", "100"]
    assert len(skipped) == 1 and "questions.jsonl:5: no figure caption for question 101" in skipped[0]
    q0 = questions[0]
    assert q0.question == "What is the organ in the image?"  # the <image> placeholder is dropped
    assert q0.domain == "histology"  # flags histology and gross: LLaVA-Med's order picks histology
    assert q0.type == "conversation" and q0.label == "Fig. 3"
    assert q0.mentions[0].startswith("Inflammatory cells were not found")
    assert q0.reference.startswith("The organ in the image is the conjunctiva")
    assert questions[3].type == "detailed_description" and questions[3].domain == "chest_xray"


def test_captions_file_takes_precedence_over_the_question_row(tmp_path):
    records = json.loads((ASSETS / "fig_captions.json").read_text())
    records["histology"][0]["fig_caption"] = "A replaced caption."
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(records))
    questions, _ = load_questions(ASSETS / "questions.jsonl", load_captions(path))
    by_id = {q.qid: q for q in questions}
    assert by_id["3"].caption == "A replaced caption."
    assert by_id["0"].caption.startswith("The gross histopathologic finding")  # not in the captions file


def test_judge_protocol_end_to_end(tmp_path, capsys):
    out = tmp_path / "chat.json"
    with ChatServer(scripted) as server:
        assert judge_cli(server, out, "--captions", str(ASSETS / "fig_captions.json")) == 0
    assert len(server.seen) == 4  # question 101 has no caption and is not sent
    first = next(s for s in server.seen if "What is the organ" in s.json["messages"][1]["content"])
    assert first.headers["authorization"] == f"Bearer {KEY}"
    body = first.json
    assert body["model"] == "judge-1" and body["temperature"] == 0.0
    system, user = body["messages"][0], body["messages"][1]["content"]
    assert system["role"] == "system"
    assert "Fig. 3: The gross histopathologic finding" in user
    assert "- Inflammatory cells were not found in the vicinity" in user
    # The reference is answer 1, the candidate answer 2.
    reference = user.index("The organ in the image is the conjunctiva")
    candidate = user.index("The organ shown is the conjunctiva.")
    assert user.index("[Answer 1]") < reference < user.index("[Answer 2]") < candidate

    result = json.loads(out.read_text())
    assert (result["n_questions"], result["n_judged"], result["n_scored"]) == (4, 4, 3)
    assert result["unparseable"] == ["6"] and result["failed"] == [] and result["no_answer"] == []
    assert len(result["skipped_question_rows"]) == 1
    s = result["scores"]
    assert s["overall"]["relative_score"] == pytest.approx(100 * (6 + 9 + 5) / (8 + 9 + 10))
    assert s["conversation"]["relative_score"] == pytest.approx(100 * 15 / 17)
    assert s["detailed_description"]["relative_score"] == pytest.approx(50.0)
    assert s["histology"]["n"] == 2 and s["chest_xray"]["candidate_mean"] == 5
    reviews = [json.loads(line) for line in out.with_name("chat.reviews.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in reviews] == ["0", "3", "6", "100"]
    assert reviews[2]["scores"] is None and reviews[2]["review"] == "I cannot rate these answers."
    assert "relative %" in capsys.readouterr().out


def test_a_rerun_is_answered_from_the_cache(tmp_path):
    out = tmp_path / "chat.json"
    with ChatServer(scripted) as server:
        assert judge_cli(server, out) == 0
        sent = len(server.seen)
        assert judge_cli(server, out) == 0
    assert sent == 4 and len(server.seen) == 4
    assert json.loads(out.read_text())["n_scored"] == 3


def test_reference_file_replaces_the_gpt4_answers_and_missing_answers_are_counted(tmp_path):
    reference = tmp_path / "reference.jsonl"
    reference.write_text("".join(json.dumps({"question_id": i, "text": f"reference answer {i}"}) + "\n"
                                 for i in (0, 3, 100)))
    out = tmp_path / "chat.json"
    with ChatServer(scripted) as server:
        assert judge_cli(server, out, "--reference", str(reference)) == 0
    users = [s.json["messages"][1]["content"] for s in server.seen]
    assert len(users) == 3 and all("reference answer" in u for u in users)
    assert not any("The organ in the image is the conjunctiva" in u for u in users)
    assert json.loads(out.read_text())["no_reference"] == ["6"]


def test_a_refused_key_is_one_clear_error(tmp_path, capsys):
    with ChatServer(lambda n, seen: Reply(status=401, body={"error": {"message": "bad key"}})) as server:
        assert judge_cli(server, tmp_path / "chat.json") == 1
    assert "refused the request: HTTP 401" in capsys.readouterr().err


def test_the_real_sample_files_read(shared_data):
    folder = shared_data / "llava_med"
    captions = load_captions(folder / "llava_med_eval_qa50_fig_captions_sample.json")
    questions, skipped = load_questions(folder / "llava_med_eval_qa50_qa_sample.jsonl", captions)
    assert len(captions) == 10 and len(questions) == 10 and skipped == []
    assert all(q.caption and q.mentions and q.reference and q.domain in {"histology", "ct_scan", "mri"}
               for q in questions)
