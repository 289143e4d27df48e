"""Figure extraction from PMC OA articles (loose and packaged), PMC-15M rows and LLaVA-Med records."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from medllava.curation import extract
from medllava.curation.jats import UnsafeXMLError, parse_article, split_sentences
from medllava.curation.sources import detokenize

ASSETS = Path(__file__).parent / "assets" / "curation"
PLOS = ASSETS / "pone.0046493.nxml"
BMC = ASSETS / "1472-6831-8-11.nxml"


def _args(out: Path, jats=(), pmc15m=(), llava_med=(), images_out=None, workers=1):
    class Args:
        pass

    a = Args()
    a.jats, a.pmc15m, a.llava_med, a.images_out, a.out = list(jats), list(pmc15m), list(llava_med), images_out, out
    a.workers = workers
    return a


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _jpeg(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, "JPEG")
    return buf.getvalue()


def make_package(path: Path, nxml: Path, folder: str, images: dict[str, bytes]) -> Path:
    """An OA-style package: <folder>/<article>.nxml plus image files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in images.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        tar.add(nxml, arcname=f"{folder}/{nxml.name}")  # after the images, as packages often are
    return path


def test_real_jats_article_figures_and_mentions():
    article = parse_article(PLOS.read_bytes())
    assert (article.pmcid, article.pmid, article.licence) == ("PMC3460867", "23029536", "CC BY")
    assert [f.label for f in article.figures] == ["Figure 1", "Figure 2", "Figure 3", "Figure 4"]
    assert [f.href for f in article.figures] == [f"pone.0046493.g00{i}" for i in range(1, 5)]
    first = article.figures[0]
    assert first.caption.startswith("Chemical structure of inhibitors. Chemical structures of A, THL and B, MmPPOX.")
    assert "<" not in first.caption and "  " not in first.caption
    # 10 figure citations: Figure 1A and 1B sit in one sentence, the other 8 in 8 sentences.
    assert [len(f.mentions) for f in article.figures] == [1, 3, 4, 1]
    assert "(Figure 3A–C)" in article.figures[2].mentions[0]
    assert article.figures[3].mentions == [
        "As shown in Figure 4, MmPPOX was also found to inhibit the growth of M. tuberculosis and M. bovis BCG "
        "with MIC values of about 25 and between 10–20 µg/mL, respectively."]


def test_real_2007_nlm_article_without_figures():
    article = parse_article(BMC.read_bytes())
    assert (article.pmcid, article.pmid, article.licence) == ("PMC2329613", "18405359", "CC BY")
    assert article.figures == []


def test_sentence_splitting_keeps_abbreviations_and_initials():
    text = "Reisine et al. [2] used it (Fig. 2). M. tuberculosis grew. Next one! (Last) sentence."
    spans = [text[s:e] for s, e in split_sentences(text)]
    assert spans == ["Reisine et al. [2] used it (Fig. 2).", "M. tuberculosis grew.", "Next one!", "(Last) sentence."]


JATS_1X = b"""<?xml version="1.0"?>
<article xmlns="http://jats.nlm.nih.gov" xmlns:xlink="http://www.w3.org/1999/xlink" xmlns:ali="http://www.niso.org/schemas/ali/1.0/">
<front><article-meta><article-id pub-id-type="pmcid">PMC900001</article-id>
<permissions><license><ali:license_ref>https://creativecommons.org/licenses/by-nc/4.0/</ali:license_ref></license></permissions>
</article-meta></front>
<body><sec><p>Both panels show the lesion (<xref ref-type="fig" rid="f1 f2">Figures 1 and 2</xref>). The group
is summarised in <xref ref-type="fig" rid="g1">Figure 3</xref>. Unrelated sentence.</p>
<p>A panel reference to <xref ref-type="fig" rid="f1">Figure 1B</xref> here.
<fig id="f1"><label>Figure 1.</label><caption><title>Axial CT</title><p>Mass in the <italic>left</italic> lobe.</p></caption>
<alternatives><graphic xlink:href="img-f1"/><graphic xlink:href="img-f1-alt"/></alternatives></fig></p>
<graphic id="f2" xlink:href="img-f2"><label>Figure 2</label><caption><p>Standalone graphic with a caption.</p></caption></graphic>
<fig-group id="g1"><caption><title>Shared caption.</title></caption>
<fig id="g1a"><label>Figure 3a</label><graphic xlink:href="img-g1a"/></fig>
<fig id="g1b"><label>Figure 3b</label><graphic xlink:href="img-g1b"/></fig></fig-group>
<table-wrap id="t1"><graphic xlink:href="table-1"/></table-wrap>
</sec></body>
<floats-group><fig id="f9"><label>Figure 4</label><caption><p>Floating figure.</p></caption><graphic xlink:href="img-f9"/></fig></floats-group>
</article>"""


def test_jats_1x_variants_namespaces_groups_and_standalone_graphics():
    article = parse_article(JATS_1X)
    assert article.pmcid == "PMC900001" and article.licence == "CC BY-NC"
    figs = {f.figure_id: f for f in article.figures}
    assert list(figs) == ["f1", "f2", "g1a", "g1b", "f9"]  # the table graphic is not a figure
    assert figs["f1"].label == "Figure 1" and figs["f1"].href == "img-f1"
    assert figs["f1"].caption == "Axial CT. Mass in the left lobe."
    assert figs["f2"].caption == "Standalone graphic with a caption."
    assert figs["g1a"].caption == figs["g1b"].caption == "Shared caption."
    # "rid='f1 f2'" cites both; the fig-group citation reaches both members.
    assert figs["f1"].mentions == ["Both panels show the lesion (Figures 1 and 2).",
                                   "A panel reference to Figure 1B here."]
    assert figs["f2"].mentions == ["Both panels show the lesion (Figures 1 and 2)."]
    assert figs["g1a"].mentions == figs["g1b"].mentions == ["The group is summarised in Figure 3."]
    assert figs["f9"].mentions == [] and figs["f9"].caption == "Floating figure."


NLM_2007 = b"""<!DOCTYPE article PUBLIC "-//NLM//DTD Journal Archiving and Interchange DTD v2.3 20070202//EN" "archivearticle.dtd">
<article xmlns:xlink="http://www.w3.org/1999/xlink"><front><article-meta>
<article-id pub-id-type="pmid">111</article-id><article-id pub-id-type="pmc">222</article-id>
<permissions><license license-type="open-access" xlink:href="http://creativecommons.org/licenses/by/2.0"/></permissions>
</article-meta></front><body><sec><p>The scan (<xref ref-type="fig" rid="F1">Figure 1B</xref>) was repeated.
<fig id="F1" position="float"><label>Figure 1.</label><caption><p>Sagittal T2-weighted MRI.</p></caption></fig>
<graphic xlink:href="1471-2342-1-1-1"/></p></sec></body></article>"""


def test_nlm_2007_figure_inside_paragraph_with_its_graphic_beside_it():
    article = parse_article(NLM_2007)
    assert (article.pmcid, article.pmid, article.licence) == ("PMC222", "111", "CC BY")
    (fig,) = article.figures
    assert (fig.figure_id, fig.label, fig.href) == ("F1", "Figure 1", "1471-2342-1-1-1")
    assert fig.caption == "Sagittal T2-weighted MRI."
    assert fig.mentions == ["The scan (Figure 1B) was repeated."]  # the caption inside <p> is not body text


def test_entity_declarations_are_refused():
    bomb = (b'<?xml version="1.0"?><!DOCTYPE article [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;">]>'
            b"<article>&b;</article>")
    with pytest.raises(UnsafeXMLError):
        parse_article(bomb)
    external = (b'<?xml version="1.0"?><!DOCTYPE article [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
                b"<article>&x;</article>")
    with pytest.raises(UnsafeXMLError):
        parse_article(external)


def test_package_images_resolved_by_stem_preferring_jpeg(tmp_path):
    png, eps = io.BytesIO(), b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n%%EOF\n"
    Image.new("RGB", (16, 16), "blue").save(png, "PNG")
    # Only the copied ones (the best-ranked per figure) must be real images: extract checks them.
    images = {"pone.0046493.g001.tif": b"tif", "pone.0046493.g001.jpg": _jpeg("red"),
              "pone.0046493.g002.gif": b"gif", "pone.0046493.g002.png": png.getvalue(), "pone.0046493.g003.eps": eps,
              "pone.0046493.pdf": b"pdf"}
    make_package(tmp_path / "in" / "PMC3460867.tar.gz", PLOS, "PMC3460867", images)
    out = tmp_path / "figs.jsonl"
    extract.run(_args(out, jats=[tmp_path / "in"]))
    rows = _rows(out)
    assert [r["image"] for r in rows] == ["PMC3460867/pone.0046493.g001.jpg", "PMC3460867/pone.0046493.g002.png",
                                         "PMC3460867/pone.0046493.g003.eps", None]
    assert rows[0]["id"] == "PMC3460867_pone-0046493-g001" and rows[0]["source"] == "jats"
    assert set(rows[0]) == {"id", "pmcid", "pmid", "figure_id", "label", "caption", "image", "licence", "mentions",
                            "source"}

    images_out = tmp_path / "images"
    extract.run(_args(out, jats=[tmp_path / "in"], images_out=images_out))
    first = _rows(out)[0]
    assert first["image"] == "PMC3460867/pone.0046493.g001.jpg"
    assert (images_out / first["image"]).read_bytes() == images["pone.0046493.g001.jpg"]
    assert sorted(p.name for p in (images_out / "PMC3460867").iterdir()) == [
        "pone.0046493.g001.jpg", "pone.0046493.g002.png", "pone.0046493.g003.eps"]


def test_loose_files_and_malformed_articles_are_skipped_and_counted(tmp_path, capsys):
    art = tmp_path / "in" / "PMC3460867"
    art.mkdir(parents=True)
    (art / PLOS.name).write_bytes(PLOS.read_bytes())
    (art / "pone.0046493.g004.png").write_bytes(b"png")
    (tmp_path / "in" / "broken.nxml").write_bytes(PLOS.read_bytes()[:5000])
    (tmp_path / "in" / "notarticle.nxml").write_bytes(b"<html><body/></html>")
    (tmp_path / "in" / "bad.tar.gz").write_bytes(b"not a tar")
    out = tmp_path / "figs.jsonl"
    extract.run(_args(out, jats=[tmp_path / "in", BMC]))
    rows = _rows(out)
    assert len(rows) == 4 and rows[3]["image"] == "PMC3460867/pone.0046493.g004.png"
    printed = capsys.readouterr().out
    assert "5 articles/rows read, 4 written, 3 skipped" in printed
    assert "broken.nxml" in printed and "articles without figures: 1" in printed
    skipped = _rows(Path(f"{out}.skipped.jsonl"))
    assert sorted(os.path.basename(s["detail"].split(":")[0]) for s in skipped) == [
        "bad.tar.gz", "broken.nxml", "notarticle.nxml"]
    assert {s["reason"] for s in skipped} == {"malformed XML", "unreadable package or file"}


def test_pmc15m_and_llava_med_sources(tmp_path):
    pmc15m = tmp_path / "pmc15m.jsonl"
    pmc15m.write_text(
        json.dumps({"image": "PMC212319_Fig3_4.jpg", "caption": "Axial  CT\nof the chest"}) + "\n"
        + "{broken\n" + json.dumps({"caption": "no image"}) + "\n"
        + json.dumps({"image": "x/PMC5_F1.png", "caption": "MRI", "pmid": 123, "id": "own-id"}) + "\n")
    out = tmp_path / "figs.jsonl"
    extract.run(_args(out, pmc15m=[pmc15m], llava_med=[ASSETS / "llava_med_fig_records_grouped.json"]))
    rows = _rows(out)
    assert [r["id"] for r in rows] == ["PMC212319_Fig3_4", "own-id", "21139713_F0003", "20733967_F3"]
    assert rows[0]["caption"] == "Axial CT of the chest" and rows[0]["pmcid"] == "PMC212319"
    assert rows[1]["pmid"] == "123" and rows[1]["source"] == "pmc15m"
    lm = rows[3]
    assert lm["pmcid"] == "PMC2924565" and lm["label"] == "FIG. 3" and lm["source"] == "llava_med"
    assert lm["mentions"][0].endswith("was 11.5 cm (Fig. 3).")
    skipped = _rows(Path(f"{out}.skipped.jsonl"))
    assert len(skipped) == 2


def test_detokenize():
    assert detokenize("the artery 's diameter ( Fig. 3 ) .") == "the artery's diameter (Fig. 3)."


def test_workers_give_the_same_records_in_the_same_order(tmp_path, capsys):
    for i in range(6):
        make_package(tmp_path / "in" / f"PMC{100 + i}.tar.gz", PLOS if i % 2 else BMC, f"PMC{100 + i}", {})
    (tmp_path / "in" / "broken.nxml").write_bytes(b"<article>")
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    extract.run(_args(one, jats=[tmp_path / "in"]))
    first = capsys.readouterr().out
    extract.run(_args(two, jats=[tmp_path / "in"], workers=2))
    second = capsys.readouterr().out
    assert one.read_text() == two.read_text()
    # Each of the two articles sits in three packages: each is extracted once.
    assert len(_rows(one)) == 4 and "skipped 4: article already extracted" in first
    assert first.replace(str(one), "") == second.replace(str(two), "")


def test_shared_real_samples(tmp_path, shared_data):
    out = tmp_path / "figs.jsonl"
    extract.run(_args(out, jats=[shared_data / "pmc_oa"],
                      llava_med=[shared_data / "llava_med" / "llava_med_eval_qa50_fig_captions_sample.json"]))
    rows = _rows(out)
    assert sum(r["source"] == "jats" for r in rows) == 4 and sum(r["source"] == "llava_med" for r in rows) == 10
    assert sum(len(r["mentions"]) for r in rows if r["source"] == "jats") == 9  # 10 citations, 2 in one sentence
