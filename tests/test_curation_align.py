"""The stage-1 alignment set: one seeded instruction per figure, the caption as the answer."""

from __future__ import annotations

import json
from pathlib import Path

from medllava.curation import align
from medllava.records import normalize_record


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class _Args:
    def __init__(self, **kw):
        self.seed, self.style = 0, "mixed"
        self.__dict__.update(kw)


SHORT = "Axial CT of the chest."
LONG = " ".join(["word"] * 40)


def _figures(n: int = 30) -> list[dict]:
    return [{"id": f"PMC{i}_F1", "caption": SHORT if i % 2 else LONG, "image": f"PMC{i}/f1.jpg"} for i in range(n)]


def test_records_are_valid_conversations_with_caption_answers(tmp_path):
    out = tmp_path / "align.jsonl"
    align.run(_Args(inp=_write(tmp_path / "in.jsonl", _figures()), out=out))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 30
    for row in rows:
        assert normalize_record(row) == row
        human, gpt = row["conversations"]
        assert human["value"].startswith("<image>\n") and human["value"].count("<image>") == 1
        instruction = human["value"].split("\n", 1)[1]
        # mixed: short captions get concise requests, long ones detailed
        assert instruction in (align.CONCISE if gpt["value"] == SHORT else align.DETAILED)


def test_draw_is_deterministic_per_id_and_seed_and_order_free(tmp_path):
    figs = _figures()
    a, b, c = (tmp_path / n for n in ("a.jsonl", "b.jsonl", "c.jsonl"))
    align.run(_Args(inp=_write(tmp_path / "in.jsonl", figs), out=a, style="concise"))
    align.run(_Args(inp=_write(tmp_path / "rev.jsonl", figs[::-1]), out=b, style="concise"))
    align.run(_Args(inp=tmp_path / "in.jsonl", out=c, style="concise", seed=1))
    by_id = lambda p: {r["id"]: r for r in map(json.loads, p.read_text().splitlines())}  # noqa: E731
    assert by_id(a) == by_id(b)
    assert by_id(a) != by_id(c)
    used = {r["conversations"][0]["value"] for r in by_id(a).values()}
    assert len(used) > 3  # the pool is actually sampled, not one fixed phrasing


def test_styles_pick_pools():
    assert align.pool_for(LONG, "concise") is align.CONCISE
    assert align.pool_for(SHORT, "detailed") is align.DETAILED
    assert align.draw(0, "x", align.CONCISE) == align.draw(0, "x", align.CONCISE)


def test_empty_captions_and_missing_images_are_skipped_and_counted(tmp_path, capsys):
    rows = _figures(2) + [{"id": "e", "caption": "  ", "image": "e.jpg"}, {"id": "n", "caption": "CT", "image": None}]
    out = tmp_path / "align.jsonl"
    align.run(_Args(inp=_write(tmp_path / "in.jsonl", rows), out=out))
    assert len(out.read_text().splitlines()) == 2
    printed = capsys.readouterr().out
    assert "4 records read, 2 written, 2 skipped" in printed
    assert "skipped 1: empty caption" in printed and "skipped 1: no image" in printed
