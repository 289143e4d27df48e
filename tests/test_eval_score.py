"""Prediction files, pairing (by id, by position, refusals) and `medllava eval score` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medllava.cli import main
from medllava.io import DataError

from medllava.eval.predictions import PredictionLog, pair_predictions, read_predictions
from medllava.eval.tasks import load_task

ASSETS = Path(__file__).parent / "assets" / "eval"
VQA_RAD = ASSETS / "vqa_rad"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def task():
    return load_task("vqa-rad", VQA_RAD, "test")


def llava_med_answers(examples, ids, texts=None) -> list[dict]:
    """Rows as LLaVA-Med's model_vqa_med.py writes them: prompt = question + "\\n<image>"."""
    texts = texts or [ex.answer for ex in examples]
    return [{"question_id": i, "prompt": f"{ex.question}\n<image>", "text": t, "answer_id": "a", "model_id": "m",
             "metadata": {}} for i, ex, t in zip(ids, examples, texts)]


# -- reading and pairing -------------------------------------------------------------------

def test_bad_prediction_rows_are_skipped_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"qid": 11, "prediction": "yes"},
        "{not json",
        {"qid": "13"},
        {"qid": "11", "prediction": "no"},
        {"question_id": 14, "text": "yes"},
        {"qid": "14", "prediction": 4},
    ])
    preds = read_predictions(path)
    assert preds.format == "medllava"
    assert [(p.id, p.text) for p in preds.rows] == [("11", "yes"), ("14", "4")]
    assert len(preds.skipped) == 4
    assert "p.jsonl:2: not a valid JSON object" in preds.skipped[0]
    assert "p.jsonl:4: duplicate id '11'" in preds.skipped[2]
    assert "p.jsonl:5: a llava-med row in a medllava prediction file" in preds.skipped[3]


def test_a_prediction_log_holds_what_reading_the_file_would_give(tmp_path, caplog):
    path = write_jsonl(tmp_path / "predictions.jsonl", [
        {"qid": "11", "prediction": "yes", "question": "q"},
        "{not json",
        {"qid": "13"},
        {"question_id": 14, "text": "yes"},
        "",
        {"qid": "11", "prediction": "no"},
    ])
    path.write_text(path.read_text() + '{"qid": "12", "predic')  # a half-written last line, as a kill leaves
    with PredictionLog(path) as log:
        # Any JSON object row counts as answered; the question of the unreadable line is asked again.
        assert {"11", "13"} <= log.answered() and "12" not in log.answered()
        assert len(log.unreadable) == 1 and "predictions.jsonl:2: not a valid JSON object" in log.unreadable[0]
        log.append({"qid": "12", "prediction": "left", "question": "q2"})
        log.append({"qid": "15", "prediction": 3})
        held = log.predictions()
    assert "12" in log.answered() and path.read_text().endswith('"prediction": 3}\n')
    from_disk = read_predictions(path)
    assert (held.path, held.format, held.rows, held.skipped) == (from_disk.path, "medllava", from_disk.rows,
                                                                  from_disk.skipped)
    assert [(p.id, p.text, p.where) for p in held.rows][-2:] == [("12", "left", f"{path}:7"), ("15", "3", f"{path}:8")]
    assert "predictions.jsonl:4: a llava-med row in a medllava prediction file" in held.skipped[2]


def test_pairing_by_id_scores_missing_as_empty(task, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"qid": "733", "prediction": "left"}, {"qid": 11, "prediction": "yes"}])
    pairing = pair_predictions(task.examples, read_predictions(path))
    assert pairing.method == "id"
    assert pairing.texts[0] == "yes" and pairing.texts[-1] == "left"
    assert len(pairing.missing) == 14 and pairing.texts[1] == ""


def test_pairing_by_position_after_checking_questions(task, tmp_path):
    # LLaVA-Med numbers its own questions; some of those numbers are also VQA-RAD qids.
    ids = list(range(len(task)))
    path = write_jsonl(tmp_path / "answers.jsonl", llava_med_answers(task.examples, ids))
    pairing = pair_predictions(task.examples, read_predictions(path))
    assert pairing.method == "position"
    assert pairing.texts == [ex.answer for ex in task.examples]
    assert "prediction ids are not task qids" in pairing.note and "all 16 prompts contain their question" in pairing.note


def test_ids_that_look_like_qids_but_ask_other_questions_fall_back_to_position(task, tmp_path):
    examples = task.examples
    rows = llava_med_answers(examples, [ex.qid for ex in reversed(examples)])  # right ids, wrong order
    pairing = pair_predictions(examples, read_predictions(write_jsonl(tmp_path / "a.jsonl", rows)))
    assert pairing.method == "position" and "questions disagree" in pairing.note


def test_position_pairing_refused_when_questions_disagree(task, tmp_path):
    rows = llava_med_answers(task.examples, range(1000, 1000 + len(task)))
    rows[2], rows[3] = rows[3], rows[2]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    with pytest.raises(DataError, match=r"pairing by position refused: 2 of 16 prompts do not contain their question: "
                                        r".*a\.jsonl:3: prompt 'How is the patient oriented\?\\n<image>' "
                                        r"does not contain question 14 'Is this an axial plane\?'"):
        pair_predictions(task.examples, read_predictions(path))


def test_position_pairing_refused_on_count_or_missing_prompts(task, tmp_path):
    short = write_jsonl(tmp_path / "short.jsonl", llava_med_answers(task.examples[:5], range(900, 905)))
    with pytest.raises(DataError, match="refused: 5 predictions for 16 questions"):
        pair_predictions(task.examples, read_predictions(short))
    bare = write_jsonl(tmp_path / "bare.jsonl", [{"qid": f"x{i}", "prediction": "yes"} for i in range(len(task))])
    with pytest.raises(DataError, match="refused: 16 rows carry no prompt or question to check"):
        pair_predictions(task.examples, read_predictions(bare))


# -- the command line ----------------------------------------------------------------------

def test_eval_score_cli_end_to_end(task, tmp_path, capsys):
    preds = [{"qid": ex.qid, "prediction": ex.answer} for ex in task.examples]
    preds[0]["prediction"] = "It looks normal"  # truth "yes": wrong in both families
    preds[4]["prediction"] = "Yes, no doubt"     # truth "yes": right in both
    pred_path = write_jsonl(tmp_path / "preds.jsonl", preds)
    out = tmp_path / "out"
    rc = main(["eval", "score", "--task", "vqa-rad", "--root", str(VQA_RAD), "--pred", str(pred_path),
               "--json", str(out / "m.json"), "--report", str(out / "r.md"), "--items", str(out / "items.jsonl"),
               "--bootstrap", "200", "--seed", "3"])
    assert rc == 0
    res = json.loads((out / "m.json").read_text())
    assert (res["task"], res["split"], res["n"], res["n_closed"], res["n_open"]) == ("vqa-rad", "test", 16, 10, 6)
    assert res["pairing"]["method"] == "id" and res["pairing"]["missing"] == []
    assert res["strict"]["closed_accuracy"]["value"] == pytest.approx(0.9)
    assert res["llava_med"]["closed_accuracy"]["value"] == pytest.approx(0.9)
    assert res["strict"]["open_exact_match"]["value"] == 1.0 and res["llava_med"]["open_recall"]["value"] == 1.0
    lo, hi = res["strict"]["closed_accuracy"]["ci95"]
    assert lo < 0.9 <= hi and res["bootstrap"] == {"n_boot": 200, "seed": 3, "level": 0.95}
    assert set(res["breakdowns"]) == {"answer type", "question type", "organ"}
    assert res["breakdowns"]["organ"]["HEAD"]["n"] == 2
    assert res["breakdowns"]["question type"]["PRES"]["n"] == 5  # "SIZE, PRES" counts under both
    assert res["confusion"]["rows"] == ["yes", "1", "left"]  # "one" normalizes to "1"
    assert len(list((out / "items.jsonl").read_text().splitlines())) == 16

    report = (out / "r.md").read_text()
    assert "| closed | 10 | 90.00 [" in report and "## By organ" in report and "open recall" in report
    for name in ("r_answer_type.png", "r_question_type.png", "r_organ.png", "r_confusion.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({name})" in report
    assert "LLaVA-Med closed accuracy: 90.00" in capsys.readouterr().out

    # Same seed, same file: identical numbers, intervals included.
    main(["eval", "score", "--task", "vqa-rad", "--root", str(VQA_RAD), "--pred", str(pred_path),
          "--json", str(out / "again.json"), "--bootstrap", "200", "--seed", "3"])
    again = json.loads((out / "again.json").read_text())
    assert again["strict"] == res["strict"] and again["llava_med"] == res["llava_med"]


def test_eval_score_llava_med_files_with_conversation_ground_truth(task, tmp_path):
    gt = [{"id": f"rad-{i}", "image": ex.image, "answer_type": ex.answer_type.upper(),
           "conversations": [{"from": "human", "value": f"{ex.question}\n<image>"}, {"from": "gpt", "value": ex.answer}]}
          for i, ex in enumerate(task.examples)]
    (tmp_path / "test.json").write_text(json.dumps(gt))
    texts = [ex.answer for ex in task.examples]
    texts[0] = "The eyes look fine"  # truth "yes": LLaVA-Med finds "yes" inside "eyes"
    answers = write_jsonl(tmp_path / "answers.jsonl", llava_med_answers(task.examples, [g["id"] for g in gt], texts))
    rc = main(["eval", "score", "--task", "vqa-rad", "--gt", str(tmp_path / "test.json"), "--pred", str(answers),
               "--json", str(tmp_path / "m.json"), "--bootstrap", "50"])
    assert rc == 0
    res = json.loads((tmp_path / "m.json").read_text())
    assert res["prediction_format"] == "llava-med" and res["pairing"]["method"] == "id"
    assert res["source"] == str(tmp_path / "test.json")
    assert res["llava_med"]["closed_accuracy"]["value"] == 1.0
    assert res["strict"]["closed_accuracy"]["value"] == pytest.approx(0.9)


def test_eval_score_quirk_file_with_candidates(tmp_path):
    quirks = ASSETS / "quirks"
    rc = main(["eval", "score", "--task", "inhouse", "--root", str(quirks), "--pred", str(quirks / "predictions.jsonl"),
               "--candidates", str(quirks / "candidates.json"), "--json", str(tmp_path / "m.json"),
               "--report", str(tmp_path / "r.md"), "--bootstrap", "0"])
    assert rc == 0
    res = json.loads((tmp_path / "m.json").read_text())
    assert res["pairing"]["missing"] == ["o7"]
    assert res["llava_med"]["open_candidate_accuracy"] == {"value": 0.625, "ci95": None, "n": 8}
    report = (tmp_path / "r.md").read_text()
    assert "missing predictions: 1 questions scored as empty answers" in report
    assert "| yes/no accuracy, run_eval.py gate | 66.67 | 7 (6 scored) |" in report


def test_eval_score_refuses_mismatched_files_with_one_clear_line(task, tmp_path, capsys):
    rows = llava_med_answers(task.examples, range(500, 500 + len(task)))
    rows[0]["prompt"] = "What is this?\n<image>"
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    rc = main(["eval", "score", "--task", "vqa-rad", "--root", str(VQA_RAD), "--pred", str(path),
               "--json", str(tmp_path / "m.json")])
    assert rc == 1 and not (tmp_path / "m.json").exists()
    err = capsys.readouterr().err
    assert "medllava: error:" in err and "pairing by position refused" in err and "a.jsonl:1: prompt" in err
